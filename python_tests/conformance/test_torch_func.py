"""torch.func on every fused backend: grad and vjp give eager autograd's gradients; vmap raises a clear error."""

import re

import pytest
import torch

import macl_kernels as mk
from macl_kernels._autograd import VMAP_ERROR
from macl_kernels.testing import LAYOUTS, bitwise_equal, loss_and_grads, upstream_for
from python_tests.conformance.conftest import views


@pytest.mark.parametrize("layout", LAYOUTS)
def test_func_grad_equals_eager_gradient(backend, layout):
    z0, z1, bank = views(7, 5, seed=14, layout=layout)

    def loss(a, b):
        return mk.macl_loss(a, b, negatives=bank, layout=layout, backend=backend)

    got = torch.func.grad(loss, argnums=(0, 1))(z0, z1)
    assert bitwise_equal(got, loss_and_grads(z0, z1, bank, layout=layout, backend=backend)[1])


def test_func_vjp_equals_eager_gradient(backend):
    z0, z1, _ = views(7, 5, seed=15)
    loss, vjp = torch.func.vjp(lambda a, b: mk.macl_loss(a, b, backend=backend, reduction="none"), z0, z1)
    eager_loss, eager_grads = loss_and_grads(z0, z1, backend=backend, reduction="none")
    assert torch.equal(loss, eager_loss)
    assert bitwise_equal(vjp(upstream_for(loss)), eager_grads)


def test_vmap_raises_a_clear_error(backend):
    z0, z1, _ = views(4, 3, seed=16)
    batched = torch.stack([z0, z0.flip(0)]), torch.stack([z1, z1.flip(0)])
    with pytest.raises(RuntimeError, match=re.escape(VMAP_ERROR)):
        torch.func.vmap(lambda a, b: mk.macl_loss(a, b, backend=backend))(*batched)
