"""The harness that runs inside the sandbox: it executes the program, then each test, and writes one
line of results. onelayer never imports it; :mod:`onelayer.sandbox` passes its source to ``python -c``.

It shares the interpreter with the program, so it is no security boundary: a program can reach
everything here (frames, ``__main__``, the results descriptor). It is written so that whatever
the program does, it can only claim values: the parent (:mod:`onelayer.sandbox`) fixes the number
and order of the results, holds the expected values and compares them itself. The audit hook is
a second layer only; the operating system (namespaces, seccomp, limits) is the first.

Protocol: argv[1] is the results descriptor, on which the harness first writes ``ready``; then
stdin is one JSON object (program, setup, entry point, tests, extra ``sys.path`` entries, rlimits to
set when the parent could not, and the mode). Results are JSON lines on the descriptor:
``{"violation": WHAT}`` for each refused operation, then exactly one final ``{"program": ERROR}`` (the
program or its setup failed) or ``{"tests": [[STATUS, TEXT], ...]}`` with one ``["ok", TEXT]`` or
``["error", MESSAGE]`` per test, in order. A call test's TEXT is the ``repr`` of its value.

Test code (a "check") is not judged where the program runs, which could forge its verdict, patch what it
uses, or run it itself against a spy. Two sandboxes take part (argv[2] and argv[3] are the two ends of the
pipes that join them):

- ``program`` mode, the program's: after its tests it *serves* calls of its function. Each request is one
  JSON line holding the ``repr`` of ``(args, kwargs)``; each answer one JSON line ``["value", REPR, AFTER]``
  (AFTER: the arguments' ``repr`` after the call where the call changed them, else ``""``) or ``["raise",
  BUILT-IN CLASS NAME, MESSAGE]``. It serves until the requests end.
- ``checks`` mode, without the program: the problem's own trusted code, then each check, against a stand-in
  for the function that sends each call to the program's sandbox and returns, or raises, its answer. Only
  values cross: the program never sees a check's code.
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


def plain_value(value, plain=is_plain, type_of=type, module_of=getattr):
    """``value`` if the parent can read its ``repr`` back (a numpy scalar as its Python value, as ``==`` in a
    test would compare it), else None with the reason."""
    if not plain(value) and type_of(value).__module__ == "numpy" and module_of(value, "shape", 1) == ():
        value = value.item()
    if not plain(value):
        return None, "unsupported result type " + type_of(value).__name__
    return value, ""


def nearest_builtin(err: BaseException, builtin_names: dict, type_of=type) -> str:
    """The name of the nearest built-in class of ``err`` (json's JSONDecodeError is a ValueError), which the other
    sandbox can raise."""
    return next((c.__name__ for c in type_of(err).__mro__ if builtin_names.get(c.__name__) is c), "Exception")


def line_reader(fd: int, read=os.read):
    """A function returning the next line from ``fd`` (without its newline), at most ``cap`` bytes, or None at
    end of input."""
    buffer = bytearray()

    def next_line(cap: int):
        while b"\n" not in buffer:
            if len(buffer) > cap:
                raise ValueError(f"a line longer than {cap} bytes")
            chunk = read(fd, 65536)
            if not chunk:
                return None
            buffer.extend(chunk)
        end = buffer.index(b"\n")
        line = bytes(buffer[:end])
        del buffer[:end + 1]
        return line

    return next_line


def send_line(fd: int, text: str, write=os.write, encode=str.encode) -> None:
    data = encode(text + "\n", "utf-8", "surrogatepass")
    while data:
        data = data[write(fd, data):]


def serve(function, requests: int, answers: int, builtin_names: dict, literal, result_chars: int,
          represent=repr, to_plain=plain_value, dumps=json.dumps, loads=json.loads, type_of=type, length=len) -> None:
    """Answer the checks' calls of ``function`` (module docstring) until the requests end."""
    next_request = line_reader(requests)
    while True:
        line = next_request(1 << 62)  # the checks' sandbox is trusted: its requests are as long as its arguments
        if line is None:
            return
        try:
            args, kwargs = literal(loads(line))
            before = represent((args, kwargs))
        except BaseException as err:
            send_line(answers, dumps(["raise", "ValueError", "the arguments could not be read: " + describe(err)]))
            continue
        try:
            value = function(*args, **kwargs)
            value, problem = to_plain(value)
            if problem:
                raise TypeError(problem)
            text = represent(value)
            if length(text) > result_chars:
                raise ValueError(f"result longer than {result_chars} characters")
            after = represent((args, kwargs))
            answer = ["value", text, "" if after == before else after]
        except BaseException as err:
            answer = ["raise", nearest_builtin(err, builtin_names, type_of), describe(err)]
        send_line(answers, dumps(answer))


def caller(requests: int, answers: int, builtin_names: dict, literal, result_chars: int, represent=repr,
           plain=is_plain, dumps=json.dumps, loads=json.loads):
    """The function under test as a check sees it in ``checks`` mode: each call goes to the program's sandbox;
    what comes back is a plain value, arguments changed in place, or a built-in error."""
    next_answer = line_reader(answers)

    def stand_in(*args, **kwargs):
        if not plain((args, kwargs)):
            raise TypeError("the check passes the function something other than plain values, which cannot reach "
                            "the program's sandbox")
        request = represent((args, kwargs))
        try:
            send_line(requests, dumps(request))
        except OSError:
            raise AssertionError("the program's sandbox ended before the check's call") from None
        try:
            line = next_answer(2 * len(request) + result_chars + 65536)
        except ValueError:
            raise AssertionError("the program's answer is longer than its result cap") from None
        if line is None:
            raise AssertionError("the program's sandbox ended before answering the check's call")
        try:
            answer = loads(line)
        except ValueError:
            raise AssertionError("an unreadable answer from the program's sandbox") from None
        if type(answer) is not list or len(answer) != 3 or answer[0] not in ("value", "raise") or \
                any(type(part) is not str for part in answer[1:]):
            raise AssertionError("a malformed answer from the program's sandbox")
        kind, text, extra = answer
        if kind == "raise":
            error = builtin_names.get(text)
            # what would stop the check's own iteration or the harness (all(map(candidate, xs)) ends early on a
            # StopIteration) comes back as the RuntimeError a generator turns it into
            if error in (StopIteration, StopAsyncIteration) or not (type(error) is type and issubclass(error, Exception)):
                raise RuntimeError(text + ": " + extra[:200])
            try:
                raised = error(extra[:200])
            except BaseException:  # a built-in whose constructor wants other arguments (UnicodeDecodeError)
                raised = Exception(text + ": " + extra[:200])
            raise raised
        value = literal(text)
        if extra:  # the arguments the function changed in place: lists, dicts and sets take their new contents
            new_args, new_kwargs = literal(extra)
            pairs = list(zip(args, new_args, strict=False)) + [(kwargs[k], new_kwargs[k]) for k in kwargs if k in new_kwargs]
            for old, new in pairs:
                if type(old) is list and type(new) is list:
                    old[:] = new
                elif type(old) in (dict, set) and type(old) is type(new):
                    old.clear()
                    old.update(new)
        return value

    return stand_in


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
    seed, literal, to_plain, answer_calls = random.seed, ast.literal_eval, plain_value, serve
    builtin_names = dict(vars(builtins))
    result_chars, checking = payload["result_chars"], payload["mode"] == "checks"
    # the pipes between the two sandboxes: requests, answers (absent when the problem has no checks to serve)
    link = [int(fd) for fd in sys.argv[2:4]]

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
        if link and not checking and kind == "tests":
            answer_calls(function, *link, builtin_names, literal, result_chars)
        exit_now(0)  # no atexit handlers or finalizers of the program run after the report

    install_audit_hook(lambda what: report("violation", what))
    namespace = {"__name__": "__main__"}
    try:
        run(compile_source(payload.pop("program"), "<program>", "exec"), namespace)
        run(compile_source(payload.pop("setup"), "<setup>", "exec"), namespace)
        entry = payload["entry_point"]
        if checking:  # the function is the program's, in the other sandbox
            namespace[entry] = caller(*link, builtin_names, literal, result_chars)
        elif entry not in namespace:
            raise NameError("the program defines no '" + entry + "'")
        namespace["candidate"] = function = namespace[entry]
    except BaseException as err:
        finish("program", describe(err))
    results, modules = [], payload.get("modules", [])
    for index, (kind, source, call) in enumerate(payload.pop("tests")):
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
            for name in modules[index] if checking else ():  # modules the check reads that the program imports
                try:
                    namespace[name] = import_module(name)
                except ImportError:
                    pass
            namespace["candidate"] = namespace[entry] = function  # as a check that rebinds them left them
            seed(0)  # a check drawing its inputs at random draws the same ones every time
            run(compile_source(source, "<test>", "exec"), namespace)
            if call:
                evaluate(compile_source(call, "<test>", "eval"), namespace)
            results.append(["ok", ""])
        except BaseException as err:
            results.append(["error", describe(err)])
    finish("tests", results)


if __name__ == "__main__":
    main()
