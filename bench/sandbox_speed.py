"""Code sandbox throughput: programs per second on ``code:synth`` completions, this sandbox against an
earlier revision's, measured in one run on one machine.

    python bench/sandbox_speed.py                          # 200 programs, before = da195bc (hook only)
    python bench/sandbox_speed.py --programs 400 --before da195bc --workers 2 --out bench-out

The earlier ``src/onelayer/sandbox.py`` is read from git (``git show REV:...``) and loaded as its
own module, so both run the same completions with the same worker count in the same process.
Completions are the reference solutions of ``code:synth`` difficulty 2 (8 hidden tests each) and,
for every other problem, a wrong variant, so passing and failing programs are both timed. Each
side runs ``--repeats`` times after a warm-up; the median is reported, with whether both sides
gave every program the same status.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from onelayer import sandbox
from onelayer.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent


def load_revision(revision: str):
    """``src/onelayer/sandbox.py`` at ``revision``, as a module of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:src/onelayer/sandbox.py"],
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader(f"sandbox_{revision}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the source runs
    exec(compile(source, f"sandbox.py@{revision}", "exec"), module.__dict__)
    return module


def jobs_for(module, programs: list[str], suites: list) -> list:
    """The same (program, suite) pairs with ``module``'s own test classes."""
    def convert(suite):
        calls = tuple(module.Call(c.expr, c.expected, c.compare, c.tolerance) for c in suite.calls)
        return module.TestSuite(suite.entry_point, calls, setup=suite.setup)
    return [(p, convert(s)) for p, s in zip(programs, suites, strict=True)]


def timed(module, jobs: list, workers: int, repeats: int) -> tuple[float, list[str]]:
    """Median seconds over ``repeats`` runs of ``jobs`` (after a warm-up), and the statuses."""
    module.run_programs(jobs[:workers * 2], workers=workers)  # warm-up: caches, the isolation probe
    seconds, statuses = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        outcomes = module.run_programs(jobs, workers=workers)
        seconds.append(time.perf_counter() - start)
        statuses = [o.status for o in outcomes]
    return statistics.median(seconds), statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=200)
    parser.add_argument("--before", default="da195bc", help="git revision of the sandbox to compare with")
    parser.add_argument("--workers", type=int, default=None, help="programs at once (default: one per core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json")
    args = parser.parse_args()
    workers = args.workers or sandbox.default_workers()

    examples = get_task("code:synth", {"difficulty": 2, "tests": 8}).examples("eval")[:args.programs]
    programs = [e.answer if i % 2 == 0 else e.answer.replace("return ", "return 1 + ", 1)
                for i, e in enumerate(examples)]
    suites = [e.meta["suite"] for e in examples]
    before = load_revision(args.before)
    before_s, before_status = timed(before, jobs_for(before, programs, suites), workers, args.repeats)
    after_s, after_status = timed(sandbox, list(zip(programs, suites, strict=True)), workers, args.repeats)

    n = len(programs)
    rows = {"programs": n, "workers": workers, "before_revision": args.before,
            "before_programs_per_s": n / before_s, "after_programs_per_s": n / after_s,
            "after_over_before": before_s / after_s, "same_statuses": before_status == after_status,
            "after_statuses": {s: after_status.count(s) for s in sorted(set(after_status))}}
    print(f"{n} code:synth programs, {workers} workers, median of {args.repeats}")
    print(f"  before ({args.before}, audit hook only): {rows['before_programs_per_s']:7.1f} programs/s")
    print(f"  after (bwrap + seccomp + prlimit):    {rows['after_programs_per_s']:7.1f} programs/s")
    print(f"  after / before: {rows['after_over_before']:.2f}; same statuses: {rows['same_statuses']} "
          f"{rows['after_statuses']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
