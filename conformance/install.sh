#!/usr/bin/env bash
# Install Autobahn|Testsuite's fuzzing client (wstest) for conformance/run.py.
#
# wstest is Python 2.7 code (autobahntestsuite 0.8.2; the 25.10.1 re-release is the same
# Python 2 sources), so it gets a Python 2.7 virtualenv of its own, with the pinned set in
# conformance/requirements-py27.txt. Idempotent: a second run checks a stamp and returns at once.
#
#   bash conformance/install.sh            # -> /opt/autobahn-venv/bin/wstest
#
# Environment:
#   ROOMCAST_PY27            Python 2.7 interpreter (default: pyenv's 2.7.18, else python2.7)
#   ROOMCAST_AUTOBAHN_VENV   where the virtualenv goes (default /opt/autobahn-venv); run.py and
#                            tests/test_conformance.py look there too
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
requirements="$here/requirements-py27.txt"
venv="${ROOMCAST_AUTOBAHN_VENV:-/opt/autobahn-venv}"
stamp="$venv/.roomcast-requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
export PYTHONWARNINGS=ignore  # pip's and cryptography's "Python 2 is unsupported" banners

if [[ -x "$venv/bin/wstest" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
    && "$venv/bin/wstest" -a >/dev/null 2>&1; then
    echo "wstest already installed: $venv/bin/wstest"
    exit 0
fi

py27="${ROOMCAST_PY27:-}"
if [[ -z "$py27" ]]; then
    for candidate in /root/.pyenv/versions/2.7.18/bin/python \
        "${PYENV_ROOT:-$HOME/.pyenv}/versions/2.7.18/bin/python" \
        "$(command -v python2.7 || true)"; do
        if [[ -n "$candidate" && -x "$candidate" ]]; then
            py27="$candidate"
            break
        fi
    done
fi
if [[ -z "$py27" ]] || ! "$py27" -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null
then
    echo "install.sh: no Python 2.7 found (set ROOMCAST_PY27); wstest needs it" >&2
    exit 1
fi

echo "installing wstest into $venv (Python 2.7: $py27)"
# virtualenv (the last releases that run on 2.7) in a throwaway folder, so the 2.7
# interpreter itself is left as it is.
boot="$(mktemp -d)"
trap 'rm -rf "$boot"' EXIT
"$py27" -m pip install --quiet --disable-pip-version-check --target "$boot" \
    'virtualenv<20.22'
rm -rf "$venv"
PYTHONPATH="$boot" "$py27" -m virtualenv --quiet "$venv"
"$venv/bin/python" -m pip install --quiet --requirement "$requirements"
"$venv/bin/wstest" -a
echo "$want" >"$stamp"
echo "wstest installed: $venv/bin/wstest"
