"""``python -m roomcast``: the same CLI as the ``roomcast`` console script."""

from roomcast.cli import main

main()
