"""What ``import macl_kernels`` costs, and the lazily imported Triton backend under ``torch.compile``.

Each case runs in a fresh interpreter, the only place where an import is first.
Import time is noisy on a shared machine, so what is checked is which modules come
in: not triton, not dynamo or inductor (which bring triton with them), and a
bounded number of new modules.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from macl_kernels.backends.triton import backend as triton_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("triton", "torch._dynamo", "torch._inductor")
MAX_NEW_MODULES = 40  # the package's own modules and the few stdlib ones it needs

IMPORT_COST = """
import json, sys, time
import torch
before = set(sys.modules)
start = time.perf_counter()
import macl_kernels as mk
seconds = time.perf_counter() - start
new = sorted(set(sys.modules) - before)
heavy = lambda: [m for m in HEAVY if m in sys.modules]
after_import = heavy()
z = torch.randn(8, 4, requires_grad=True)
mk.macl_loss(z, torch.randn(8, 4)).backward()  # backend="auto" on the CPU
after_auto = heavy()
backends = mk.available_backends("cpu")
print(json.dumps({"seconds": seconds, "new": new, "backends": backends, "after_import": after_import,
                  "after_auto": after_auto, "after_available": heavy()}))
"""

COMPILE_FIRST = """
import json, sys
import torch
import macl_kernels as mk
from macl_kernels.testing import make_views
device = sys.argv[1]
z0, z1, _ = make_views(24, 8, seed=1, device=device)
encoder = torch.nn.Linear(8, 8).to(device)
step = lambda a, b: mk.macl_loss(encoder(a), encoder(b), backend="triton")
triton_before = "triton" in sys.modules
compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(z0, z1)  # the first use of the backend
compiled.backward()
compiled_grad, encoder.weight.grad = encoder.weight.grad.clone(), None
eager = step(z0, z1)
eager.backward()
print(json.dumps({"triton_before": triton_before, "loss": [compiled.item(), eager.item()],
                  "grad_error": (compiled_grad - encoder.weight.grad).abs().max().item()}))
"""


def run_python(code, *args, env_update=None, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update or {})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")  # this tree's macl_kernels
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("interpret", ["0", "1"], ids=["plain", "TRITON_INTERPRET=1"])
def test_import_leaves_triton_and_the_compiler_stack_alone(interpret):
    # A CPU-only user pays neither for triton nor for inductor; under TRITON_INTERPRET=1 (the
    # tests) triton comes in only when the triton backend is asked for, which "auto" on the CPU never does.
    result = run_python(f"HEAVY = {HEAVY!r}\n" + IMPORT_COST, env_update={"TRITON_INTERPRET": interpret})
    assert result["after_import"] == [] and result["after_auto"] == [], result
    assert len(result["new"]) <= MAX_NEW_MODULES, result["new"]
    if interpret == "1":  # asking for the triton backend on the CPU imports it, to run it in the interpreter
        assert "triton" in result["backends"]
    else:  # known without importing triton
        assert "triton" not in result["backends"] and result["after_available"] == []
    print(f"import macl_kernels: {result['seconds']:.3f} s, {len(result['new'])} new modules")


@pytest.mark.slow
@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU case runs instead")),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ],
)
def test_compile_traces_the_first_use_of_the_triton_backend(device):
    # The kernels are imported (and their ops registered) while dynamo traces the backend's resolution.
    env = {"TRITON_INTERPRET": "1"} if device == "cpu" else {}
    result = run_python(COMPILE_FIRST, device, env_update=env, drop=("TRITON_INTERPRET",))
    assert not result["triton_before"]
    compiled, eager = result["loss"]
    assert abs(compiled - eager) <= 1e-5 * abs(eager)
    assert result["grad_error"] <= 1e-5


def test_constant_under_compile_marks_like_torch_compiler():
    def mine():
        return 1

    def torchs():
        return 1

    triton_backend.constant_under_compile(mine)
    torch.compiler.assume_constant_result(torchs)
    assert vars(mine) == vars(torchs) == {"_dynamo_marked_constant": True}
