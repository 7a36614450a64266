"""torch.compile(fullgraph=True) traces the loss inside a model's forward, backward included."""

import pytest
import torch

import macl_kernels as mk
from python_tests.helpers import assert_rel_close, make_views


@pytest.mark.parametrize("layout", ["ntxent", "queue"])
def test_compiled_step_matches_eager_torch_backend(layout):
    z0, z1, bank = make_views(24, 8, seed=1, bank_rows=5)
    bank = bank if layout == "queue" else None
    encoder = torch.nn.Linear(8, 8)

    def forward(a, b):
        return mk.macl_loss(encoder(a), encoder(b), negatives=bank, layout=layout, backend="torch")

    eager_loss = forward(z0, z1)
    eager_loss.backward()
    eager_grad = encoder.weight.grad.clone()
    encoder.weight.grad = None
    compiled_loss = torch.compile(forward, fullgraph=True)(z0, z1)
    compiled_loss.backward()
    assert_rel_close(compiled_loss.detach(), eager_loss.detach(), 1e-5, "loss")
    assert_rel_close(encoder.weight.grad, eager_grad, 1e-5, "encoder gradient")
