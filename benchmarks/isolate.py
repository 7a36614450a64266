"""Run one measurement in a fresh Python subprocess and read back its result.

The child (``python -m <module> <json args>``) prints its result as one tagged JSON
line; a child killed by the time cap is a "timeout", one that died from an
allocation failure (or was killed by the kernel) is "OOM", anything else "error".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, Sequence

from .memory import is_out_of_memory

RESULT_TAG = "@@result "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Outcome:
    status: str  # ok | OOM | timeout | unavailable | error
    result: Dict = field(default_factory=dict)
    note: str = ""


def emit(result: Dict) -> None:
    """Child side: hand ``result`` to the parent."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def child_environment() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    # A fixed mmap threshold returns every large freed block to the OS at once, so the
    # resident size follows the live tensors and peak RSS measures the op, not malloc's cache.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    if (os.cpu_count() or 1) <= 4:
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # a compile worker pool costs more than it saves here
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it has ended (its group with it) in the meantime
        pass


def run_isolated(module: str, args: Sequence[str], timeout_s: float) -> Outcome:
    """Run ``python -m module *args`` and return its outcome; never raises for the child's failures."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=child_environment(),
        start_new_session=True,  # its own process group: a timeout also ends its helpers
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        return Outcome("timeout", note=f"killed after {timeout_s:.0f} s")
    except BaseException:  # e.g. Ctrl-C or a time cap's SIGTERM: do not leave the child running in its session
        _kill_group(proc)
        raise
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
            return Outcome(result.pop("status"), result, result.pop("note", ""))
    last_error = next((ln for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    if proc.returncode == -signal.SIGKILL:
        return Outcome("OOM", note="killed by SIGKILL (the kernel's OOM killer?)")
    if is_out_of_memory(RuntimeError(stderr[-2000:])):
        return Outcome("OOM", note=last_error[:200])
    return Outcome("error", note=f"exit code {proc.returncode}: {last_error[:200]}")
