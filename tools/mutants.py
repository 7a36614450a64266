"""``make mutants``: deliberate bugs (tools/mutant_catalog.py), each of which its tests must catch.

Each mutant replaces one exact snippet of one source file. The run works on a scratch
copy of the tree (the tracked and untracked, not ignored files, and the built
``macl_kernels/_C`` extension), never on the tree itself, so an interrupted run leaves
nothing behind. For each mutant it:

1. checks that the snippet occurs exactly once (else ``stale``: the code changed under
   the catalog, which must be refreshed);
2. applies it and rebuilds what the mutant's file is compiled into: the C++ CPU ops
   (a CPU-only ``setup.py build_ext --inplace`` in the scratch copy, ninja recompiling
   what changed) and/or the CPU emulator of the CUDA kernels
   (python_tests/backends/cuda_emulation); a build error is ``build-failed``;
3. runs the mutant's focused pytest selection with ``-x``: a failing test is
   ``caught`` (the first one is named), all passing is ``survived``;
4. restores the file (and the original extension).

Before the mutants, the union of the selections runs on the unmutated copy and must
pass without skips (a selection that fails or skips there would catch nothing).
Exit status 1 if any mutant survived, is stale, failed to build or ran into an error.

    python tools/mutants.py [--only NAME ...] [--list] [--markdown PATH] [--keep]
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mutant_catalog import MUTANTS, Mutant  # noqa: E402

EXTENSION_GLOB = "macl_kernels/_C*.so"
FAILED_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
SUMMARY_LINE = re.compile(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped)\b.*?) in [\d.]+s", re.MULTILINE)
BUILD_EMULATOR = "from python_tests.backends import cuda_emulation; cuda_emulation._build()"
WHERE_IS_THE_PACKAGE = "import macl_kernels; print(macl_kernels.__file__)"


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # caught, survived, stale, build-failed, error, timeout, equivalent
    detail: str = ""  # the catching test, or what went wrong
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("caught", "equivalent")


class Scratch:
    """A copy of the tree to mutate, with the environment its commands run in."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.env = {
            **os.environ,
            "PYTHONDONTWRITEBYTECODE": "1",  # a same-size mutant within the same second must not reuse a .pyc
            "TORCH_EXTENSIONS_DIR": os.path.join(path, ".torch_extensions"),  # the emulator's builds stay here
        }
        self.env.pop("PYTHONPATH", None)

    @classmethod
    def copy_of(cls, root: str, timeout: float) -> "Scratch":
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True,
        ).stdout.decode()  # fmt: skip
        files = [f for f in listed.split("\0") if f and os.path.isfile(os.path.join(root, f))]
        extensions = [os.path.relpath(p, root) for p in glob.glob(os.path.join(root, EXTENSION_GLOB))]
        if not extensions:
            raise SystemExit(f"no built extension {EXTENSION_GLOB} in {root}: run `make install` first")
        path = tempfile.mkdtemp(prefix="macl-mutants-")
        for name in files + extensions:
            os.makedirs(os.path.join(path, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(root, name), os.path.join(path, name))
        scratch = cls(path, timeout)
        scratch.extensions = extensions
        os.makedirs(os.path.join(path, ".mutants"))
        for name in extensions:  # the original build, put back after each C++ mutant
            shutil.copy2(os.path.join(path, name), os.path.join(path, ".mutants", os.path.basename(name)))
        return scratch

    def run(self, args: Sequence[str], **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args), cwd=self.path, env={**self.env, **env}, capture_output=True, text=True, timeout=self.timeout
        )

    def read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def write(self, name: str, text: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(text)

    def restore_extension(self) -> None:
        for name in self.extensions:
            shutil.copy2(os.path.join(self.path, ".mutants", os.path.basename(name)), os.path.join(self.path, name))

    def build(self, what: str) -> Optional[str]:
        """Rebuild ``what`` ("cpu" or "emulator") from the scratch sources; None, or the build's error output."""
        if what == "cpu":  # the CPU ops only: all that runs here, and the cheapest rebuild
            done = self.run([sys.executable, "setup.py", "build_ext", "--inplace"], MACL_KERNELS_CUDA="0")
        else:
            done = self.run([sys.executable, "-c", BUILD_EMULATOR])
        return None if done.returncode == 0 else (done.stdout + done.stderr)[-3000:]

    def pytest(self, tests: Sequence[str], stop_at_first: bool) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", "-rfEs"]
        return self.run(args + (["-x"] if stop_at_first else []) + list(tests))


def stale_reason(text: str, mutant: Mutant) -> Optional[str]:
    count = text.count(mutant.original)
    if count == 1:
        return None
    return "snippet not found: the code changed, refresh the mutant" if count == 0 else f"snippet found {count} times"


def run_mutant(scratch: Scratch, mutant: Mutant) -> Outcome:
    start = time.monotonic()
    original = scratch.read(mutant.path)
    scratch.write(mutant.path, original.replace(mutant.original, mutant.replacement))
    try:
        for what in mutant.rebuild:
            error = scratch.build(what)
            if error is not None:
                return Outcome(mutant, "build-failed", f"{what}: {error}", time.monotonic() - start)
        done = scratch.pytest(mutant.tests, stop_at_first=True)
    except subprocess.TimeoutExpired:
        return Outcome(mutant, "timeout", f"over {scratch.timeout:.0f} s", time.monotonic() - start)
    finally:
        scratch.write(mutant.path, original)
        if "cpu" in mutant.rebuild:
            scratch.restore_extension()  # the next C++ mutant rebuilds what this one changed
    seconds = time.monotonic() - start
    if done.returncode == 0:
        return Outcome(mutant, "survived", "every selected test passed", seconds)
    failed = FAILED_LINE.findall(done.stdout)
    if done.returncode == 1 and failed:
        return Outcome(mutant, "caught", failed[0], seconds)
    output = f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return Outcome(mutant, "error", f"pytest exit {done.returncode}:\n{output}", seconds)


def baseline(scratch: Scratch, mutants: Sequence[Mutant]) -> Optional[str]:
    """None when every selected test passes, without skips, on the unmutated copy; else why not.

    The selections of the C++ mutants run on a CPU-only build of the unmutated sources,
    as each of those mutants will (which also leaves ninja only the mutated files to
    recompile); the others on the tree's own build.
    """
    where = scratch.run([sys.executable, "-c", WHERE_IS_THE_PACKAGE]).stdout.strip()
    if not os.path.realpath(where).startswith(os.path.realpath(scratch.path)):
        return f"the scratch copy imports macl_kernels from {where}, not from itself"
    if any("emulator" in m.rebuild for m in mutants):
        error = scratch.build("emulator")
        if error is not None:
            return f"the CUDA emulator does not build:\n{error}"
    rebuilt = [m for m in mutants if "cpu" in m.rebuild]
    groups = [([m for m in mutants if m not in rebuilt], False), (rebuilt, True)]
    for group, cpu_build in groups:
        if not group:
            continue
        if cpu_build:
            error = scratch.build("cpu")
            if error is not None:
                return f"the unmutated C++ CPU ops do not build:\n{error}"
        try:
            problem = _all_pass(scratch, [test for m in group for test in m.tests])
        finally:
            if cpu_build:
                scratch.restore_extension()
        if problem is not None:
            return problem
    return None


def _all_pass(scratch: Scratch, tests: Sequence[str]) -> Optional[str]:
    done = scratch.pytest(list(dict.fromkeys(tests)), stop_at_first=False)
    summary = SUMMARY_LINE.findall(done.stdout)
    if done.returncode != 0 or not summary or re.search(r"skipped|xfail|deselected", summary[-1]):
        return f"the selected tests do not all pass on the unmutated tree:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
    return None


def table(outcomes: Sequence[Outcome]) -> str:
    lines = ["| mutant | file | status | caught by (first failing test), or why not | s |", "|---|---|---|---|---|"]
    for o in outcomes:
        detail = o.detail.splitlines()[0] if o.detail else ""
        lines.append(f"| {o.mutant.name} | {o.mutant.path} | {o.status} | `{detail}` | {o.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--markdown", metavar="PATH", help="also write the result table to PATH")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per build or pytest run")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTANTS]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise SystemExit(f"mutant names must be unique: {sorted(duplicates)}")
    unknown = set(args.only or ()) - set(names)
    if unknown:
        raise SystemExit(f"unknown mutants {sorted(unknown)}; --list shows them")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            mark = f" (equivalent: {m.equivalent})" if m.equivalent else ""
            print(f"{m.name}  {m.path}{mark}\n    {m.why}\n    tests: {' '.join(m.tests)}")
        return 0

    start = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still removes its scratch copy
    scratch = Scratch.copy_of(ROOT, args.timeout)
    print(f"scratch copy: {scratch.path}", flush=True)
    outcomes: List[Outcome] = []
    try:
        runnable = []
        for m in chosen:  # an equivalent mutant is not run, but its note must still describe the code
            reason = stale_reason(scratch.read(m.path), m)
            if reason is None and not m.equivalent:
                runnable.append(m)
            elif reason is None:
                outcomes.append(Outcome(m, "equivalent", m.equivalent))
            else:
                outcomes.append(Outcome(m, "stale", reason))
        problem = baseline(scratch, runnable)
        if problem is not None:
            print(f"baseline failed ({time.monotonic() - start:.0f} s): {problem}", file=sys.stderr)
            return 1
        print(f"baseline: the selected tests pass on the unmutated copy ({time.monotonic() - start:.0f} s)")
        for m in runnable:
            outcome = run_mutant(scratch, m)
            outcomes.append(outcome)
            first_line = outcome.detail.splitlines()[0]
            print(f"{outcome.status:>12}  {m.name}  ({outcome.seconds:.0f} s)  {first_line}", flush=True)
            if not outcome.ok and outcome.status != "survived":
                print(outcome.detail, file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {scratch.path}")
        else:
            shutil.rmtree(scratch.path, ignore_errors=True)
    total = time.monotonic() - start
    counts: Dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    order = sorted(outcomes, key=lambda o: names.index(o.mutant.name))
    report = table(order)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    footer = (
        f"{len(outcomes)} mutants: {summary}; {total:.0f} s in all "
        f"({time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs)"
    )
    print(f"\n{report}\n\n{footer}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{report}\n\n{footer}\n")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
