"""What the tests and the benchmarks share: inputs, the float64 oracle, error measures, tolerances.

Public (as flash-attention's testing module), so that the benchmarks and users who
check their own setup import it instead of the test suite. Only the reference
backend is trusted here: every other backend is what gets checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import macl_kernels as mk
from macl_kernels._config import LAYOUTS

__all__ = [
    "DTYPES",
    "LAYOUTS",
    "TOLERANCE",
    "assert_compiled_matches_eager",
    "assert_dynamic_compile_matches_eager",
    "assert_matches_reference",
    "assert_rel_close",
    "bitwise_equal",
    "fused_backends",
    "loss_and_grads",
    "make_views",
    "peak_rss_mb",
    "reference_float64",
    "relative_error",
    "stats_dict",
    "upstream_for",
]

# MATH.md section 6: relative error against a float64 reference.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def make_views(
    n: int,
    d: int,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    device: str = "cpu",
    bank_rows: int = 0,
    correlation: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Two correlated views (like augmentations of one batch) and an optional bank."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    z0 = base + correlation * torch.randn(n, d, generator=g, dtype=torch.float64)
    z1 = base + correlation * torch.randn(n, d, generator=g, dtype=torch.float64)
    bank = torch.randn(bank_rows, d, generator=g, dtype=torch.float64) if bank_rows else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(z0), cast(z1), cast(bank)


def upstream_for(loss: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A fixed, non-uniform upstream gradient, so per-anchor weights g_r are exercised."""
    if loss.dim() == 0:
        return torch.ones_like(loss)
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(loss.shape, generator=g, dtype=torch.float64)).to(loss)


def loss_and_grads(
    z0: torch.Tensor, z1: torch.Tensor, negatives: Optional[torch.Tensor] = None, **kwargs
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Loss (detached) and the gradients of <loss, upstream> w.r.t. fresh leaf copies of z0, z1."""
    a = z0.detach().clone().requires_grad_(True)
    b = z1.detach().clone().requires_grad_(True)
    loss = mk.macl_loss(a, b, negatives=negatives, **kwargs)
    (loss * upstream_for(loss)).sum().backward()
    return loss.detach(), [a.grad, b.grad]


def reference_float64(
    z0: torch.Tensor, z1: torch.Tensor, negatives: Optional[torch.Tensor] = None, **kwargs
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The oracle: the dense reference on the same inputs cast to float64."""
    kwargs = {**kwargs, "backend": "reference"}
    bank = None if negatives is None else negatives.double()
    return loss_and_grads(z0.double(), z1.double(), bank, **kwargs)


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||out - ref|| / max(||ref||, floor * sqrt(numel)); NaN or inf in ``out`` never passes."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    scale = max(ref64.norm().item(), floor * ref64.numel() ** 0.5)
    diff = (out64 - ref64).norm().item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(
    out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "tensor", floor: float = 0.0
) -> None:
    """Fail unless ``relative_error(out, ref, floor) <= tol``; the message shows the worst elements."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = relative_error(out, ref, floor)
    if err <= tol:
        return
    out64, ref64 = out.detach().double().cpu().reshape(-1), ref.detach().double().cpu().reshape(-1)
    gap = (out64 - ref64).abs().nan_to_num(float("inf"))
    worst = gap.argsort(descending=True)[:5].tolist()
    rows = [f"  [{i}] got {out64[i].item():.8g} expected {ref64[i].item():.8g}" for i in worst]
    raise AssertionError(f"{what}: relative error {err:.3g} > {tol:g}; worst elements:\n" + "\n".join(rows))


def assert_matches_reference(
    backend: str,
    z0: torch.Tensor,
    z1: torch.Tensor,
    negatives: Optional[torch.Tensor] = None,
    tol: Optional[float] = None,
    **kwargs,
) -> None:
    """The loss and both input gradients of ``backend`` against the float64 reference."""
    tol = TOLERANCE[z0.dtype] if tol is None else tol
    loss, grads = loss_and_grads(z0, z1, negatives, backend=backend, **kwargs)
    ref_loss, ref_grads = reference_float64(z0, z1, negatives, **kwargs)
    assert grads[0].dtype == z0.dtype and grads[1].dtype == z1.dtype, "gradients come back in the input dtype"
    assert_rel_close(loss, ref_loss, tol, f"{backend} loss")
    floor = _zero_gradient_scale(z0, z1, negatives, kwargs) if z0.shape[1] == 1 else 0.0
    for name, g, r in zip(("dz0", "dz1"), grads, ref_grads):
        assert_rel_close(g, r, tol, f"{backend} {name}", floor=floor)


def _zero_gradient_scale(z0, z1, negatives, kwargs) -> float:
    """The size the gradient would have without the normalization, for D = 1.

    With D = 1 every unit vector is +-1 and the exact gradient is 0, so relative
    error is undefined; rounding noise is measured against the largest unprojected
    gradient, g / (tau * |z|), instead.
    """
    options = {**kwargs, "backend": "reference", "return_stats": True, "reduction": "none"}
    bank = None if negatives is None else negatives.double()
    per_anchor_loss, stats = mk.macl_loss(z0.double(), z1.double(), negatives=bank, **options)
    per_anchor = 1.0 / per_anchor_loss.numel() if kwargs.get("reduction", "mean") == "mean" else 1.0
    smallest = torch.cat([z0, z1]).double().abs().clamp_min(1e-12).min().item()
    return 1.5 * per_anchor / (stats.temperature.item() * smallest)


def assert_compiled_matches_eager(
    backend: str, layout: str, *, compiler: str, device: str = "cpu", n: int = 24, d: int = 8, tol: float = 1e-5
) -> None:
    """``torch.compile(fullgraph=True)`` of a model's forward with the loss in it: same loss and gradients as eager."""
    z0, z1, bank = make_views(n, d, seed=1, device=device, bank_rows=5)
    bank = bank if layout == "queue" else None
    encoder = torch.nn.Linear(d, d).to(device)

    def forward(a, b):
        return mk.macl_loss(encoder(a), encoder(b), negatives=bank, layout=layout, backend=backend)

    eager_loss = forward(z0, z1)
    eager_loss.backward()
    eager_grad = encoder.weight.grad.clone()
    encoder.weight.grad = None
    compiled_loss = torch.compile(forward, fullgraph=True, backend=compiler)(z0, z1)
    compiled_loss.backward()
    assert_rel_close(compiled_loss.detach(), eager_loss.detach(), tol, f"{backend} compiled loss")
    assert_rel_close(encoder.weight.grad, eager_grad, tol, f"{backend} compiled encoder gradient")


def fused_backends(device: str = "cpu") -> List[str]:
    """Every fused backend that can run on ``device`` here: all answer to the same tests."""
    return [b for b in mk.available_backends(device) if b != "reference"]


def bitwise_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def stats_dict(stats: mk.MACLStats) -> Dict[str, float]:
    return {k: float(v) for k, v in stats._asdict().items()}


_PEAK_RSS_SCRIPT = """
import json, resource, sys, torch, macl_kernels as mk
n, d, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
z0 = torch.randn(n, d, requires_grad=True)
z1 = torch.randn(n, d, requires_grad=True)
mk.macl_loss(z0, z1, backend=backend).backward()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_rss_mb(n: int, d: int, backend: str) -> float:
    """Peak RSS (MiB) of a fresh process that runs one fp32 forward + backward of N pairs on the CPU."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(n), str(d), backend], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def assert_dynamic_compile_matches_eager(
    backend: str,
    layout: str,
    *,
    compiler: str,
    sizes: Sequence[int] = (16, 24, 40),
    device: str = "cpu",
    d: int = 8,
    tol: float = 1e-5,
) -> None:
    """``torch.compile(dynamic=True, fullgraph=True)`` of a training step: one graph for every N in ``sizes``.

    At each N the compiled loss and the encoder's gradient equal eager's, and the
    step is compiled once (a recompilation per N would defeat dynamic shapes).
    """
    from torch._dynamo.testing import CompileCounterWithBackend

    encoder = torch.nn.Linear(d, d).to(device)
    bank = make_views(2, d, seed=0, device=device, bank_rows=5)[2] if layout == "queue" else None

    def step(a, b):
        return mk.macl_loss(encoder(a), encoder(b), negatives=bank, layout=layout, backend=backend)

    def loss_and_encoder_grad(fn, a, b):
        encoder.zero_grad()
        loss = fn(a, b)
        loss.backward()
        return loss.detach(), encoder.weight.grad.clone()

    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    compilations = []
    for n in sizes:
        z0, z1, _ = make_views(n, d, seed=n, device=device)
        eager_loss, eager_grad = loss_and_encoder_grad(step, z0, z1)
        compiled_loss, compiled_grad = loss_and_encoder_grad(compiled, z0, z1)
        assert_rel_close(compiled_loss, eager_loss, tol, f"{backend} compiled loss at N={n}")
        assert_rel_close(compiled_grad, eager_grad, tol, f"{backend} compiled encoder gradient at N={n}")
        compilations.append(counter.frame_count)
    # The first call may hand the backend more than one graph (dynamo restarts its analysis once
    # to turn the float settings into tensors); the later sizes must add none.
    assert compilations[1:] == compilations[:1] * (len(sizes) - 1), (
        f"{backend}: graphs compiled so far after each N in {tuple(sizes)}: {compilations} (recompiled)"
    )
