"""The harness that runs inside the sandbox: it executes the program, then each test, and writes one
line of results. onelayer never imports it; :mod:`onelayer.sandbox` passes its source to ``python -c``.

It shares the interpreter with the program, so it is no security boundary: a program can reach
everything here (frames, ``__main__``, the results descriptor). It is written so that whatever
the program does, it can only claim values: the parent (:mod:`onelayer.sandbox`) fixes the number
and order of the results, holds the expected values and compares them itself. The audit hook is
a second layer only; the operating system (namespaces, seccomp, limits) is the first.

Protocol: argv[1] is the results descriptor, on which the harness first writes ``ready``; then
stdin is one JSON object (program, setup, entry
point, tests, extra ``sys.path`` entries, rlimits to set when the parent could not, and the mode).
Results are JSON lines on the descriptor: ``{"violation": WHAT}`` for each refused operation, then
exactly one final ``{"program": ERROR}`` (the program or its setup failed) or ``{"tests": [[STATUS,
TEXT], ...]}`` with one ``["ok", TEXT]`` or ``["error", MESSAGE]`` per test, in order.

A call test's TEXT is the ``repr`` of its value. Test code (a "check") cannot be trusted to have
passed here, so in ``record`` mode (the program's run) a check's TEXT is what the function under
test returned to it, call by call (JSON: ``["value", REPR, ARGUMENTS]`` or ``["raise", EXCEPTION NAME,
ARGUMENTS]``, ARGUMENTS a digest of the call's arguments), and
the parent runs the check again in ``replay`` mode, in a sandbox without the program: the trusted
code of the problem, the same check, and a stand-in that gives the recorded answers back in order.
A check passes only there. Both runs seed ``random`` with 0 before each check, and a recorded call
leaves ``random`` as it found it, so that a check drawing its inputs at random draws the same ones.
"""

import hashlib
import json
import os
import sys

READY = b"ready\n"  # the first line on the results descriptor, before the program is read

#: Built-in types whose ``repr`` the parent can read back with ``ast.literal_eval``.
PLAIN = (int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set, frozenset)

#: Audit events an honest solution never raises: starting processes, signals, the network. (Imports
#: are not refused: libraries import ``subprocess`` or ``ctypes`` without using them to escape, and the
#: OS layer refuses what they could do.)
BLOCKED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__",
    "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "resource.setrlimit",
    "resource.prlimit", "os.setuid", "os.setgid", "os.chroot", "sys.remote_exec", "gc.get_objects",
    "gc.get_referrers", "gc.get_referents",
})
def is_plain(value, depth=0) -> bool:
    kind = type(value)
    if kind not in PLAIN or depth > 50:
        return False
    if kind in (list, tuple, set, frozenset):
        return all(is_plain(v, depth + 1) for v in value)
    if kind is dict:
        return all(is_plain(k, depth + 1) and is_plain(v, depth + 1) for k, v in value.items())
    return True


def plain_value(value, plain=is_plain, type_of=type, module_of=getattr):
    """``value`` if the parent can read its ``repr`` back (a numpy scalar as its Python value, as ``==`` in a
    test would compare it), else None with the reason."""
    if not plain(value) and type_of(value).__module__ == "numpy" and module_of(value, "shape", 1) == ():
        value = value.item()
    if not plain(value):
        return None, "unsupported result type " + type_of(value).__name__
    return value, ""


def arguments_digest(text: str) -> str:
    """A short fingerprint of a call's arguments as ``repr`` writes them (a check may pass large inputs)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def recorder(function, records, get_state, set_state, builtin_names, represent=repr, type_of=type,
             to_plain=plain_value, digest=arguments_digest):
    """``function`` as a check sees it in record mode: each outermost call's answer (its value's ``repr``, or the
    name of what it raised) appended to ``records``; calls made inside it (recursion through its own name) are
    not the check's and pass straight through. ``random`` is left as the call found it."""
    depth = [0]

    def stand_in(*args, **kwargs):
        if depth[0]:
            return function(*args, **kwargs)
        depth[0] += 1
        state = get_state()
        try:
            called = digest(represent((args, kwargs)))  # before the call, which may change its arguments
            value = function(*args, **kwargs)
        except BaseException as err:
            # the nearest built-in class, which the replay can raise (json's JSONDecodeError is a ValueError)
            records.append(["raise", next((c.__name__ for c in type_of(err).__mro__ if builtin_names.get(c.__name__) is c),
                                          "Exception"), called])
            raise
        finally:
            depth[0] -= 1
            set_state(state)
        value, problem = to_plain(value)
        if problem:
            raise TypeError(problem)
        records.append(["value", represent(value), called])
        return value

    return stand_in


def replayer(records, literal, builtin_names, represent=repr, digest=arguments_digest, plain=is_plain):
    """The function under test as a check sees it in replay mode: the recorded answers, in order, each only for
    the arguments it was recorded with (a program that changed what the check computed, say by patching
    ``len``, answered other questions; arguments are compared by :func:`arguments_digest`). Returns the
    stand-in and a function telling how many answers are left."""
    position = [0]

    def stand_in(*args, **kwargs):
        if position[0] >= len(records):
            raise AssertionError("the check called the function more often than when the program ran")
        kind, text, called = records[position[0]]
        position[0] += 1
        # arguments that are not plain values (a function, an object) print their addresses: not compared
        if plain((args, kwargs)) and digest(represent((args, kwargs))) != called:
            raise AssertionError("the check called the function with other arguments than when the program ran")
        if kind == "raise":
            error = builtin_names.get(text)
            raise error() if isinstance(error, type) and issubclass(error, BaseException) else Exception(text)
        return literal(text)

    return stand_in, lambda: len(records) - position[0]


def describe(err: BaseException) -> str:
    try:
        return type(err).__name__ + ": " + str(err)[:200]
    except BaseException:  # a program's exception whose __str__ fails
        return type(err).__name__


def install_audit_hook(on_violation) -> None:
    # Everything the hook uses is bound here, and it reads only the event's name (an exact str from
    # the interpreter), so shadowing names in __main__ or builtins, or str subclasses, change nothing.
    def hook(event, args, blocked=BLOCKED_EVENTS, refuse=PermissionError, report=on_violation):
        if event in blocked:
            report(event)
            raise refuse("sandbox: " + event + " is not allowed")

    sys.addaudithook(hook)


def main() -> None:
    results_fd = int(sys.argv[1])
    # The parent sends the program only once the sandbox is running, so that if the parent dies
    # while the sandbox starts, stdin ends empty and no program runs without a parent to kill it.
    os.write(results_fd, READY)
    payload = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    import resource  # only for runs without OS isolation, where the parent cannot set limits itself

    for name, value in payload["rlimits"]:
        resource.setrlimit(getattr(resource, name), (value, value))
    sys.path.extend(payload["path"])
    import ast
    import builtins
    import random
    from importlib import import_module

    # Bound before the program runs: it may replace module globals and built-ins afterwards.
    write, dumps, encode, represent, exit_now = os.write, json.dumps, str.encode, repr, os._exit
    run, evaluate, compile_source, length = exec, eval, compile, len
    seed, get_state, set_state, literal = random.seed, random.getstate, random.setstate, ast.literal_eval
    to_plain, record, replay = plain_value, recorder, replayer
    builtin_names = dict(vars(builtins))
    result_chars, check_factor, replaying = payload["result_chars"], payload["check_factor"], payload["mode"] == "replay"
    replays = payload.get("replays", [])

    def report(kind, body):
        data = encode(dumps({kind: body}) + "\n")
        while data:
            data = data[write(results_fd, data):]

    def finish(kind, body):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        report(kind, body)
        exit_now(0)  # no atexit handlers or finalizers of the program run after the report

    install_audit_hook(lambda what: report("violation", what))
    namespace = {"__name__": "__main__"}
    try:
        run(compile_source(payload.pop("program"), "<program>", "exec"), namespace)
        run(compile_source(payload.pop("setup"), "<setup>", "exec"), namespace)
        entry = payload["entry_point"]
        if entry not in namespace and not replaying:  # a replay's stand-in is the function
            raise NameError("the program defines no '" + entry + "'")
        namespace["candidate"] = namespace.get(entry)
    except BaseException as err:
        finish("program", describe(err))
    function, results, checks = namespace["candidate"], [], 0
    for kind, source, call in payload.pop("tests"):
        try:
            if kind == "call":
                value, problem = to_plain(evaluate(compile_source(source, "<test>", "eval"), namespace))
                if problem:
                    results.append(["error", problem])
                    continue
                text = represent(value)
                results.append(["ok", text] if length(text) <= result_chars
                               else ["error", f"result longer than {result_chars} characters"])
                continue
            records = []
            if replaying:
                modules, answers = replays[checks]
                for name in modules:  # modules the check reads that the program had imported
                    try:
                        namespace[name] = import_module(name)
                    except ImportError:
                        pass
                stand_in, left = replay(answers, literal, builtin_names)
            else:
                stand_in = record(function, records, get_state, set_state, builtin_names)
            checks += 1
            namespace["candidate"] = namespace[entry] = stand_in  # also where the check calls it by its name
            try:
                seed(0)
                run(compile_source(source, "<test>", "exec"), namespace)
                if call:
                    evaluate(compile_source(call, "<test>", "eval"), namespace)
            finally:
                namespace["candidate"] = namespace[entry] = function
            if replaying and left():
                raise AssertionError("the check called the function less often than when the program ran")
            text = "" if replaying else dumps(records)
            results.append(["ok", text] if length(text) <= result_chars * check_factor
                           else ["error", f"answers longer than {result_chars * check_factor} characters"])
        except BaseException as err:
            results.append(["error", describe(err)])
    finish("tests", results)


if __name__ == "__main__":
    main()
