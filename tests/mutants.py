"""Mutation checks: does the suite notice when the code is broken?

Two modes, both stdlib only, each mutant in a throwaway copy of the tree (never the work tree):

``python tests/mutants.py demo``
    The hand-written mutants of docs/testing.md ("Tests that can fail"): for each test that once
    passed with the feature broken, the break it must now catch. Each mutant runs against the
    tests of a git revision (``--old-tests REV``, e.g. the commit before the mend: expect
    ``survived``) and against the work tree's tests (expect ``killed``).

``python tests/mutants.py sweep [AREA ...]``
    Mutants generated from the AST of the named functions (areas: hub, fanout, recovery, origin,
    jwt, size): comparison operators swapped at their boundary or negated, ``and``/``or`` swapped,
    ``not`` dropped, integer and boolean constants changed, ``+``/``-`` swapped, and calls,
    assignments and ``raise`` statements deleted. Each mutant runs only its area's test files,
    ``-x``, with a per-mutant timeout; a timeout counts as killed (the suite noticed: it hung).

The tree is ``git archive`` of ``--rev`` (default HEAD), so work in progress never leaks in;
``--overlay PATH`` adds a work-tree file not committed yet. Each run first checks that its test
files pass unmutated. Print a Markdown table; exit 1 if a ``demo`` mutant survives.
"""

from __future__ import annotations

import argparse
import ast
import copy
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    """One change to one source file, and the tests that must notice it."""

    ident: str
    path: str  # relative to the repository, e.g. src/roomcast/core/outbox.py
    old: str  # exact text to replace (must occur once), or "" for a span mutant
    new: str
    tests: Sequence[str] | Sequence[Sequence[str]]  # files or node ids; or rounds of them
    note: str = ""
    span: tuple[int, int, int, int] | None = None  # (line, col, end_line, end_col), 1-based lines
    outcome: dict[str, str] = field(default_factory=dict)

    def apply(self, text: str) -> str:
        if self.span is None:
            count = text.count(self.old)
            if count != 1:
                raise ValueError(f"{self.ident}: {self.old!r} occurs {count} times in {self.path}")
            return text.replace(self.old, self.new)
        lines = text.splitlines(keepends=True)
        line, col, end_line, end_col = self.span
        starts = [0]
        for ln in lines:
            starts.append(starts[-1] + len(ln))
        start = starts[line - 1] + len(lines[line - 1].encode()[:col].decode())
        end = starts[end_line - 1] + len(lines[end_line - 1].encode()[:end_col].decode())
        return text[:start] + self.new + text[end:]


# -- the hand-written mutants of the mended tests -------------------------------------------------

OUTBOX = "src/roomcast/core/outbox.py"
AUTH = "src/roomcast/auth.py"
CONNECTION = "src/roomcast/connection.py"
#: A handler that ends with a traceback half a second after its last reply.
LATE_TRACEBACK = (
    '\n        await __import__("asyncio").sleep(0.5)\n        raise RuntimeError("late")'
)
DEMO: list[Mutant] = [
    Mutant(
        "outbox-bound-deleted",
        OUTBOX,
        "if len(outbox) >= self.limit:",
        "if False:",
        ["tests/test_hub.py::test_outbox_never_exceeds_its_bound"],
        "the outbox bound deleted: a stalled member is never cut",
    ),
    Mutant(
        "public-api-version",
        "src/roomcast/version.py",
        '__version__ = "0.2.0"',
        '__version__ = "0.0.0"',
        ["tests/test_units.py::test_public_api"],
        "`__version__` no longer the package's version",
    ),
    Mutant(
        "public-api-wrong-object",
        "src/roomcast/__init__.py",
        "from roomcast.core.hub import Hub\n",
        "from roomcast.core.node import Node as Hub\n",
        ["tests/test_units.py::test_public_api"],
        "a public name bound to the wrong object",
    ),
    Mutant(
        "guest-renew-keeps-token",
        "src/roomcast/http/web.py",
        'token, grant = auth.issue_guest("", grant.user)',
        "token = body.renew",
        ["tests/test_guest.py"],
        "a renewal hands back the old token (and its old expiry)",
    ),
    Mutant(
        "auth-deadline-late",
        "src/roomcast/http/channels.py",
        "loop.call_later(self.settings.auth_timeout, self._auth_deadline, session)",
        "loop.call_later(self.settings.auth_timeout + 3, self._auth_deadline, session)",
        ["tests/test_security.py::test_auth_timeout_closes_4002"],
        "the auth deadline 3 s later than ROOMCAST_AUTH_TIMEOUT",
    ),
    Mutant(
        "metrics-series-not-at-0",
        "src/roomcast/metrics.py",
        "            self.auth_failures.labels(reason)\n",
        "            pass\n",
        ["tests/test_metrics.py::test_metrics_without_key_and_off_switch"],
        "the auth-failure series no longer exist from the start (a missing one read as 0)",
    ),
    Mutant(
        "error-close-code-lost",
        CONNECTION,
        "await self.close(error.close_code, error.reason)",
        "await self.close(CloseCode.NORMAL, error.reason)",
        ["tests/test_ops.py::test_json_logs_name_the_connection_and_never_a_secret"],
        "an error logged as 'closed 1003' but closed 1000 on the wire",
    ),
    Mutant(
        "deny-closes-1000",
        CONNECTION,
        '{"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION}',
        '{"type": "websocket.close", "code": CloseCode.NORMAL}',
        ["tests/test_asgi_servers.py::test_secure"],
        "a refused handshake closed with 1000 instead of 1008",
    ),
    Mutant(
        "close-timeout-ignored",
        "src/roomcast/transport/protocol.py",
        "call_later(self.close_timeout, self.transport.abort)",
        "call_later(5.0, self.transport.abort)",
        ["tests/test_transport.py::test_close_handshake_is_bounded"],
        "ROOMCAST_CLOSE_TIMEOUT ignored, 5 s hard-coded",
    ),
    Mutant(
        "late-traceback-after-error",
        CONNECTION,
        "await self.close(error.close_code, error.reason)",
        "await self.close(error.close_code, error.reason)" + LATE_TRACEBACK,
        ["tests/test_fuzz.py::test_methods_json_lone_surrogate"],
        "a traceback 0.5 s after the 1007 close",
    ),
    Mutant(
        "late-traceback-after-refusal",
        CONNECTION,
        'logger.info("conn=%s %s refused with HTTP 403: %s", self.id, self.path, reason)',
        'logger.info("conn=%s %s refused with HTTP 403: %s", self.id, self.path, reason)'
        + LATE_TRACEBACK,
        ["tests/test_fuzz.py::test_jwt_exp_beyond_64_bits"],
        "a traceback 0.5 s after a refused handshake",
    ),
    Mutant(
        "close-line-not-logged",
        CONNECTION,
        'logger.info("conn=%s %s closed %d: %s", self.id, self.path, error.close_code, '
        "error.reason)",
        "pass",
        ["tests/test_fuzz.py::test_path_cannot_forge_log_lines"],
        "the close line (the one that carries the path) never written",
    ),
    Mutant(
        "stream-notices-at-next-send",
        "src/roomcast/http/guide.py",
        "await asyncio.wait((left,), timeout=interval)",
        "await asyncio.sleep(interval)",
        ["tests/test_chat_robustness.py::test_stream_stops_at_once"],
        "the stream notices its client left only at its next send",
    ),
    Mutant(
        "drain-closes-1001",
        "src/roomcast/transport/protocol.py",
        'self._write_close(CloseCode.SERVICE_RESTART, "server shutting down")',
        'self._write_close(CloseCode.GOING_AWAY, "server shutting down")',
        ["tests/test_serving.py::test_graceful_shutdown"],
        "a draining server closes with 1001 instead of the documented 1012",
    ),
    Mutant(
        "origin-port-ignored",
        AUTH,
        "return netloc == host",
        'return netloc.rpartition(":")[0] == host.rpartition(":")[0]',
        ["tests/test_security.py", "tests/test_pins_auth.py"],
        "the origin check compares hosts only (another port on the same host let in)",
    ),
    Mutant(
        "jwk-alg-pin-deleted",
        AUTH,
        "algs = frozenset({jwk.algorithm_name})",
        "pass",
        ["tests/test_security.py", "tests/test_pins_auth.py"],
        "a JWK's alg no longer pins its key (PS256 verifies on an RS256 key)",
    ),
    Mutant(
        "alg-none-guard-deleted",
        AUTH,
        'if not isinstance(alg, str) or alg.lower() == "none":',
        "if False:",
        ["tests/test_security.py", "tests/test_pins_auth.py"],
        "roomcast's own `alg: none` guard deleted (PyJWT's refusal left)",
    ),
    Mutant(
        "alg-key-guard-deleted",
        AUTH,
        "if alg not in algs:",
        "if False:",
        ["tests/test_security.py", "tests/test_pins_auth.py"],
        "roomcast's alg-matches-key guard deleted (PyJWT's refusal left)",
    ),
]


# -- the sweep: mutants generated from the AST -----------------------------------------------------


@dataclass(frozen=True)
class Area:
    """Where the sweep mutates, and the tests that must notice.

    ``tiers``: test files in rounds; a mutant that survives one round runs the next (the fast
    in-process files first, the real-server ones only for what they did not kill). ``only``:
    if given, mutate only nodes whose source, or the condition of the ``if`` around them,
    mentions one of these words (the size checks inside a frame parser, say).
    """

    path: str
    functions: tuple[str, ...]
    tiers: tuple[tuple[str, ...], ...]
    only: tuple[str, ...] = ()


AREAS: dict[str, Area] = {
    "hub": Area(
        OUTBOX,
        (
            "Outbox.offer",
            "Outbox.push",
            "Outbox.close_after_current",
            "Outbox._write",
            "broadcast",
        ),
        (("tests/test_hub.py", "tests/test_pins_outbox.py"), ("tests/test_bounds.py",)),
    ),
    "fanout": Area(
        "src/roomcast/core/hub.py",
        ("Hub.fan_out", "Hub.remove", "Channel.go_live", "Channel.forget"),
        (
            ("tests/test_hub.py", "tests/test_pins_outbox.py", "tests/test_core_races.py"),
            ("tests/test_bounds.py",),
        ),
    ),
    "recovery": Area(
        "src/roomcast/core/hub.py",
        ("Hub.learn_stream", "Hub.start_live", "Hub._deliver_catching", "Hub.on_publication"),
        (
            ("tests/test_channels_units.py", "tests/test_pins_recovery.py"),
            ("tests/test_core_races.py",),
            ("tests/test_recovery.py", "tests/test_delivery.py"),
            ("tests/test_protocol.py",),
        ),
    ),
    "origin": Area(
        "src/roomcast/auth.py",
        ("_origin_key", "origin_allowed"),
        (("tests/test_pins_auth.py",), ("tests/test_security.py",)),
    ),
    "jwt": Area(
        "src/roomcast/auth.py",
        ("Authenticator.__init__", "Authenticator._verify_jwt", "Authenticator._key_for"),
        (
            ("tests/test_pins_auth.py", "tests/test_units.py"),
            ("tests/test_security.py", "tests/test_guest.py"),
        ),
    ),
    "size": Area(
        "src/roomcast/transport/frames.py",
        ("FrameReader.next_frame",),
        (
            ("tests/test_frames.py", "tests/test_pins_size.py", "tests/test_transport_state.py"),
            ("tests/test_transport.py",),
        ),
        ("max_size", "125"),
    ),
    "size-messages": Area(
        "src/roomcast/transport/messages.py",
        ("MessageAssembler.frame", "MessageAssembler._inflate"),
        (
            ("tests/test_frames.py", "tests/test_pins_size.py", "tests/test_transport_state.py"),
            ("tests/test_transport.py",),
        ),
        ("size", "budget"),
    ),
    "size-asgi": Area(
        "src/roomcast/connection.py",
        ("Connection.receive",),
        (("tests/test_pins_size.py",), ("tests/test_security.py",)),
        ("max_size",),
    ),
}

_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}


def _functions(tree: ast.Module, names: Sequence[str]) -> Iterator[tuple[str, ast.AST]]:
    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                if name in names:
                    yield name, child
                yield from walk(child, f"{name}.")

    yield from walk(tree, "")


def _skipped(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside an f-string, a log call or an assert: not behaviour the suite should pin."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.JoinedStr | ast.Assert):
            return True
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "logger"
        ):
            return True
    return False


def _is_log(call: ast.AST) -> bool:
    return (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "logger"
    )


def _mentions(
    text: str, node: ast.AST, parents: dict[ast.AST, ast.AST], words: Sequence[str]
) -> bool:
    segments = [ast.get_source_segment(text, node) or ""]
    up = node
    while up in parents:
        up = parents[up]
        if isinstance(up, ast.If):
            segments.append(ast.get_source_segment(text, up.test) or "")
            break
    return any(word in segment for word in words for segment in segments)


def _span(node: ast.AST) -> tuple[int, int, int, int]:
    return (node.lineno, node.col_offset, node.end_lineno or 0, node.end_col_offset or 0)  # type: ignore[attr-defined]


def _show(rev: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def generate(area: str, rev: str = "HEAD") -> list[Mutant]:
    """The mutants of one area (its source at ``rev``), in source order."""
    spec = AREAS[area]
    path, names, tests = spec.path, spec.functions, spec.tiers
    text = _show(rev, path)
    tree = ast.parse(text)
    mutants: list[Mutant] = []

    def add(node: ast.AST, new: str, what: str, func: str) -> None:
        line = node.lineno  # type: ignore[attr-defined]
        old = ast.get_source_segment(text, node) or ""
        ident = f"{area}:{line}:{len(mutants) + 1}"
        note = f"{func}: `{' '.join(old.split())[:70]}` → {what}"
        mutants.append(Mutant(ident, path, "", new, tests, note, _span(node)))

    for func, fnode in _functions(tree, names):
        parents = {c: p for p in ast.walk(fnode) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(fnode):
            if _skipped(node, parents) or not hasattr(node, "lineno"):
                continue
            if spec.only and not _mentions(text, node, parents, spec.only):
                continue
            if isinstance(node, ast.Compare):
                for i, op in enumerate(node.ops):
                    swap = _SWAP.get(type(op))
                    if swap is None:
                        continue
                    mutated = copy.deepcopy(node)
                    mutated.ops[i] = swap()
                    add(node, f"({ast.unparse(mutated)})", f"`{ast.unparse(mutated)}`", func)
            elif isinstance(node, ast.BoolOp):
                mutated = copy.deepcopy(node)
                mutated.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
                add(node, f"({ast.unparse(mutated)})", f"`{ast.unparse(mutated)}`", func)
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
                add(node, f"({ast.unparse(node.operand)})", "`not` dropped", func)
            elif isinstance(node, ast.Constant) and type(node.value) in (int, bool):
                if isinstance(parents.get(node), ast.Subscript) and parents[node].slice is node:  # type: ignore[attr-defined]
                    continue
                value = node.value
                new = (not value) if isinstance(value, bool) else (1 if value == 0 else value + 1)
                add(node, repr(new), f"`{new!r}`", func)
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub):
                mutated = copy.deepcopy(node)
                mutated.op = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
                add(node, f"({ast.unparse(mutated)})", f"`{ast.unparse(mutated)}`", func)
            elif isinstance(node, ast.Raise | ast.Assign | ast.AugAssign) or (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Call | ast.Await)
            ):
                if isinstance(node, ast.Assign) and all(
                    isinstance(t, ast.Name | ast.Tuple) for t in node.targets
                ):
                    continue  # a local's assignment: deleting it is a NameError, not a test
                if isinstance(node, ast.Expr) and _is_log(node.value):
                    continue
                add(node, "pass", "deleted", func)
    mutants.sort(key=lambda m: (m.span or (0,))[0])
    for i, m in enumerate(mutants, 1):
        m.ident = f"{area}:{(m.span or (0,))[0]}:{i}"
    return mutants


# -- running ---------------------------------------------------------------------------------------


def _archive(rev: str, paths: Sequence[str], into: Path) -> None:
    data = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, *paths],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")


def sandbox(rev: str, tests_rev: str | None, overlay: Sequence[str]) -> Path:
    """A copy of the tree at ``rev`` (its tests from ``tests_rev`` if given), plus the work
    tree's copies of the ``overlay`` paths (files not committed yet)."""
    root = Path(tempfile.mkdtemp(prefix="roomcast-mutants-"))
    _archive(rev, ["src", "tests", "pyproject.toml", "README.md", "docs", "benchmarks"], root)
    if tests_rev:
        shutil.rmtree(root / "tests")
        _archive(tests_rev, ["tests"], root)
    for path in overlay:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, root / path)
    return root


def baseline(root: Path, mutants: Sequence[Mutant], timeout: float) -> None:
    """Every test file the mutants use passes on the unmutated copy (else nothing is learnt)."""
    files: dict[str, None] = {}
    for m in mutants:
        for tier in [m.tests] if isinstance(m.tests[0], str) else m.tests:
            for test in tier:
                if (root / test.split("::")[0]).exists():
                    files[test] = None
    outcome = _pytest(root, list(files), timeout * 4)
    if outcome != "survived":
        raise SystemExit(f"the unmutated tree fails its own tests in {root}: {outcome}")


def run_one(root: Path, mutant: Mutant, timeout: float) -> str:
    """Apply ``mutant`` in ``root``, run its tests, restore the file: killed/survived/..."""
    target = root / mutant.path
    pristine = target.read_text()
    try:
        mutated = mutant.apply(pristine)
    except ValueError as error:
        return f"not applied ({error})"
    try:
        compile(mutated, str(target), "exec")
    except SyntaxError:
        return "not compiled"
    tiers = [mutant.tests] if isinstance(mutant.tests[0], str) else mutant.tests
    target.write_text(mutated)
    try:
        for tier in tiers:
            tests = [t for t in tier if (root / t.split("::")[0]).exists()]
            if tests:
                outcome = _pytest(root, tests, timeout)
                if outcome != "survived":
                    return outcome
        return "survived"
    finally:
        target.write_text(pristine)


def _pytest(root: Path, tests: Sequence[str], timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:randomly"]
    argv += ["-p", "no:cacheprovider", "--no-header"]
    proc = subprocess.Popen(
        argv,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "killed (timeout)"
    text = out.decode(errors="replace")
    if proc.returncode == 0:
        return "survived"
    failed = [ln.split(" - ")[0] for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    last = text.strip().splitlines()[-1] if text.strip() else ""
    if " failed" in last and not failed:  # e.g. an internal error after a failed test
        failed = [f"({last.strip('= ')})"]
    if proc.returncode != 1 and not failed:  # interrupted, internal or usage error, none ran
        return f"error (pytest exit {proc.returncode}): {text.strip().splitlines()[-1:]}"
    first = failed[0].removeprefix("FAILED ").removeprefix("ERROR ") if failed else ""
    return "killed" + (f" by `{first}`" if first else "")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("demo", "sweep"))
    parser.add_argument("areas", nargs="*", help=f"sweep areas: {', '.join(AREAS)}")
    parser.add_argument("--rev", default="HEAD", help="source revision (default HEAD)")
    parser.add_argument("--old-tests", help="demo: also run each mutant on this revision's tests")
    parser.add_argument(
        "--overlay", action="append", default=[], help="a work-tree file to use (uncommitted)"
    )
    parser.add_argument("--only", action="append", help="run only these mutant ids")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per mutant")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--rounds", type=int, help="sweep: run only the first N rounds of tests")
    args = parser.parse_args(argv)
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", args.rev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    args.rev = sha  # one revision for the whole run, whatever is committed meanwhile
    sys.stderr.write(f"source at {sha}\n")

    if args.mode == "demo":
        mutants = list(DEMO)
    else:
        mutants = [m for area in (args.areas or list(AREAS)) for m in generate(area, args.rev)]
        if args.rounds:
            for m in mutants:
                m.tests = m.tests[: args.rounds]
    if args.only:
        mutants = [m for m in mutants if m.ident in args.only]
    if args.list:
        for m in mutants:
            say(f"{m.ident}\t{m.note}")
        return 0

    runs = [("old tests", args.old_tests)] if args.old_tests and args.mode == "demo" else []
    runs.append(("tests", None))
    roots = {label: sandbox(args.rev, rev, [] if rev else args.overlay) for label, rev in runs}
    bad = 0
    try:
        baseline(roots["tests"], mutants, args.timeout)
        say(f"| mutant | change | {' | '.join(label for label, _ in runs)} |")
        say("|---|---|" + "---|" * len(runs))
        for m in mutants:
            started = time.monotonic()
            for label, _ in runs:
                m.outcome[label] = run_one(roots[label], m, args.timeout)
            if m.outcome["tests"] == "survived" and args.mode == "demo":
                bad = 1
            cells = " | ".join(m.outcome[label] for label, _ in runs)
            say(f"| {m.ident} | {m.note} | {cells} |")
            sys.stderr.write(f"  ({time.monotonic() - started:.0f} s)\n")
    finally:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
    return bad


if __name__ == "__main__":
    sys.exit(main())
