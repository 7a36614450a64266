"""torch.compile(fullgraph=True) traces the loss inside a model's forward, backward included, for every backend.

On the CPU the pure-PyTorch backend goes through inductor; the compiled ops (the C++
extension, Triton's interpreted kernels) through dynamo and AOT autograd
(``aot_eager``): interpreted Triton kernels cannot become inductor graph nodes, and
inductor with the Triton kernels is exercised on the GPU (test_triton_gpu.py).
"""

import pytest

from macl_kernels.testing import assert_compiled_matches_eager
from python_tests.conformance.conftest import DEVICE


@pytest.mark.parametrize("layout", ["ntxent", "queue"])
def test_compiled_forward_matches_eager(backend, layout):
    compiler = "inductor" if backend == "torch" else "aot_eager"
    assert_compiled_matches_eager(backend, layout, compiler=compiler, device=DEVICE)
