"""torch.compile(fullgraph=True) traces the loss inside a model's forward, backward included, for every backend.

On the CPU the pure-PyTorch backend goes through inductor; the compiled ops (the C++
extension, Triton's interpreted kernels) through dynamo and AOT autograd
(``aot_eager``): interpreted Triton kernels cannot become inductor graph nodes, and
inductor with the Triton kernels is exercised on the GPU (test_triton_gpu.py).
With ``dynamic=True`` one graph must serve every batch size.
"""

import pytest

from macl_kernels.testing import assert_compiled_matches_eager, assert_dynamic_compile_matches_eager
from python_tests.conformance.conftest import DEVICE


def compiler_for(backend: str) -> str:
    return "inductor" if backend == "torch" else "aot_eager"


@pytest.mark.parametrize("layout", ["ntxent", "queue"])
def test_compiled_forward_matches_eager(backend, layout):
    assert_compiled_matches_eager(backend, layout, compiler=compiler_for(backend), device=DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ntxent", "queue"])
def test_one_dynamic_graph_for_every_batch_size(backend, layout):
    """dynamic=True, N = 16, 24, 40: a smaller last batch (or a marked batch dimension) does not recompile."""
    assert_dynamic_compile_matches_eager(backend, layout, compiler=compiler_for(backend), device=DEVICE)
