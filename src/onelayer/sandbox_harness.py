"""The harness that runs inside the sandbox: it executes the program, then each test, and writes one
line of results. onelayer never imports it; :mod:`onelayer.sandbox` passes its source to ``python -c``.

It shares the interpreter with the program, so it is no security boundary: a program can reach
everything here (frames, ``__main__``, the results descriptor). It is written so that whatever
the program does, it can only claim values: the parent (:mod:`onelayer.sandbox`) fixes the number
and order of the results, holds the expected values and compares them itself. The audit hook is
a second layer only; the operating system (namespaces, seccomp, limits) is the first.

Protocol: argv[1] is the results descriptor, on which the harness first writes ``ready``; then
stdin is one JSON object (program, setup, entry
point, tests, extra ``sys.path`` entries, rlimits to set when the parent could not). Results are
JSON lines on the descriptor: ``{"violation": WHAT}`` for each refused operation, then exactly
one final ``{"program": ERROR}`` (the program or its setup failed) or ``{"tests": [[STATUS, TEXT],
...]}`` with one ``["ok", REPR]`` or ``["error", MESSAGE]`` per test, in order.
"""

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
    # Bound before the program runs: it may replace module globals and built-ins afterwards.
    write, dumps, encode, represent, plain, exit_now = os.write, json.dumps, str.encode, repr, is_plain, os._exit
    run, evaluate, compile_source, length, type_of = exec, eval, compile, len, type
    result_chars = payload["result_chars"]

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
        if payload["entry_point"] not in namespace:
            raise NameError("the program defines no '" + payload["entry_point"] + "'")
        namespace["candidate"] = namespace[payload["entry_point"]]
    except BaseException as err:
        finish("program", describe(err))
    results = []
    for kind, source, call in payload.pop("tests"):
        try:
            if kind == "call":
                value = evaluate(compile_source(source, "<test>", "eval"), namespace)
                if not plain(value) and type_of(value).__module__ == "numpy" and getattr(value, "shape", 1) == ():
                    value = value.item()  # a numpy scalar, as `==` in the test would have compared it
                if not plain(value):
                    results.append(["error", "unsupported result type " + type_of(value).__name__])
                    continue
                text = represent(value)
                results.append(["ok", text] if length(text) <= result_chars
                               else ["error", f"result longer than {result_chars} characters"])
            else:
                run(compile_source(source, "<test>", "exec"), namespace)
                if call:
                    evaluate(compile_source(call, "<test>", "eval"), namespace)
                results.append(["ok", ""])
        except BaseException as err:
            results.append(["error", describe(err)])
    finish("tests", results)


if __name__ == "__main__":
    main()
