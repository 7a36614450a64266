"""What the tests and the benchmarks share: inputs, the oracles, error measures, tolerances.

Public (as flash-attention's testing module), so that the benchmarks and users who
check their own setup import it instead of the test suite. The oracles are the dense
reference in float64 and, for a handful of rows, ``losses_by_hand``; every other
backend is what gets checked. Errors are measured row by row (``row_errors``), and
a backend's tolerance is twice the error of the dense reference run in the inputs'
dtype plus a floor (``tolerance``), as flash-attention and Cut Cross-Entropy test.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

import macl_kernels as mk
from macl_kernels._config import LAYOUTS, MACLConfig
from macl_kernels._fused import fused_macl_loss
from macl_kernels._math import accumulation_dtype
from macl_kernels.backends.base import Backend

__all__ = [
    "DTYPES",
    "LAYOUTS",
    "ROW_FLOOR",
    "TOLERANCE",
    "TOLERANCE_FLOOR",
    "assert_compiled_matches_eager",
    "assert_dynamic_compile_matches_eager",
    "assert_matches_reference",
    "assert_rel_close",
    "bitwise_equal",
    "fused_backends",
    "losses_by_hand",
    "loss_and_grads",
    "make_views",
    "PeakMemory",
    "peak_rss_mb",
    "proc_status_kib",
    "reference_float64",
    "reference_in_dtype",
    "relative_error",
    "row_errors",
    "stats_dict",
    "tolerance",
    "upstream_for",
]

# MATH.md section 6: the bound every dtype's error must stay under, whatever the case.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
# What a backend may add to twice the error of the dense reference run in its dtype (see
# tolerance()), for when that error is small by luck (a scalar loss): float64 1e-12; float32
# 2e-6, about 16 float32 ulps, room for the GPU kernels' exp2 and other summation orders; fp16
# and bf16 1e-5, their float32 accumulation (their rounding is in the dense run's error). Measured
# on the CPU backends (Triton interpreted), 2026-11-28: the worst row error of a backend was 1.6x
# the dense run's (fp32 per-anchor losses, Triton), 1.1x in fp16/bf16, and used at most 66% of
# the tolerance (fp16, Triton); the dense runs' own errors, per row: fp32 ~3e-7, fp16 ~4e-4,
# bf16 ~3e-3 to 4e-3 for gradients (mostly their rounding to the dtype), 1e-8 to 5e-5 for losses.
TOLERANCE_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 1e-5,
    torch.bfloat16: 1e-5,
}
# Rows smaller than this fraction of the median row are measured against it (row_errors).
ROW_FLOOR = 1e-3
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
    requires_grad: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Two correlated views (like augmentations of one batch) and an optional bank.

    Drawn in float64 on the CPU from ``seed``, so the same on every device and in
    every dtype; ``requires_grad`` makes the views leaves that collect gradients.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    z0 = base + correlation * torch.randn(n, d, generator=g, dtype=torch.float64)
    z1 = base + correlation * torch.randn(n, d, generator=g, dtype=torch.float64)
    bank = torch.randn(bank_rows, d, generator=g, dtype=torch.float64) if bank_rows else None
    z0, z1 = (z.to(device=device, dtype=dtype).requires_grad_(requires_grad) for z in (z0, z1))
    return z0, z1, None if bank is None else bank.to(device=device, dtype=dtype)


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


def row_errors(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Each row's relative error ``||out[r] - ref[r]|| / max(||ref[r]||, floor, ROW_FLOOR * median ||ref||)``.

    A row is a sample's gradient, or one element of a vector (a per-anchor loss);
    a 0-dim tensor is one row. Measured per row, a large row cannot hide a wrong
    small one, as one norm over the whole tensor would. The floor, a fraction of the
    median row (``floor``: an absolute one), keeps rows whose exact value is nearly 0
    from counting their rounding noise as a large relative error. A row with NaN or
    inf in ``out`` has error inf.
    """
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64, ref64 = (t.detach().double().cpu().reshape(max(1, t.shape[0] if t.dim() else 1), -1) for t in (out, ref))
    norms = ref64.norm(dim=1)
    scale = norms.clamp_min(max(floor, ROW_FLOOR * norms.median().item(), torch.finfo(torch.float64).tiny))
    errors = (out64 - ref64).norm(dim=1) / scale
    return errors.masked_fill(~torch.isfinite(out64).all(dim=1), float("inf"))


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """The largest of :func:`row_errors`: the measure every comparison of the tests uses."""
    return row_errors(out, ref, floor).max().item()


def assert_rel_close(
    out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "tensor", floor: float = 0.0
) -> None:
    """Fail unless every row's relative error (:func:`row_errors`) is ``<= tol``; the message shows the worst rows."""
    errors = row_errors(out, ref, floor)
    if errors.max().item() <= tol:
        return
    worst = errors.argsort(descending=True)[:5].tolist()
    flat = lambda t, r: t.detach().double().cpu().reshape(errors.numel(), -1)[r]  # noqa: E731
    rows = [
        f"  row {r}: error {errors[r].item():.3g}, |expected| {flat(ref, r).norm().item():.6g}, "
        f"got {flat(out, r)[:3].tolist()} expected {flat(ref, r)[:3].tolist()}"
        for r in worst
    ]
    raise AssertionError(
        f"{what}: relative error {errors.max().item():.3g} > {tol:.3g} in {int((errors > tol).sum())} of "
        f"{errors.numel()} rows; worst rows:\n" + "\n".join(rows)
    )


class _DenseNegativeLSE(Backend):
    """The backend contract's op as one dense matrix, rounded where the kernels round.

    Rows in the input dtype, dots and log-sum-exp in the accumulation dtype, and
    through autograd's casts the gradients of the rows come back in the input dtype:
    the fused path with it is the dense reference run in the input dtype.
    """

    name = "dense in the input dtype"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None

    def negative_lse(self, x, y, excluded, tau):
        acc = accumulation_dtype(x.dtype)
        x_acc = x.to(acc)
        candidates = x_acc if y is None else y.to(acc)
        columns = torch.arange(candidates.shape[0], device=x.device)
        hidden = (columns == excluded[:, :1]) | (columns == excluded[:, 1:])
        return (x_acc @ candidates.T / tau).masked_fill(hidden, float("-inf")).logsumexp(dim=1)


def reference_in_dtype(
    z0: torch.Tensor, z1: torch.Tensor, negatives: Optional[torch.Tensor] = None, **kwargs
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Loss and gradients of the dense reference run in the inputs' own dtype (see :class:`_DenseNegativeLSE`).

    Its error against :func:`reference_float64` is what rounding to that dtype
    costs: the scale of the tolerances of :func:`assert_matches_reference`.
    """
    options = {k: v for k, v in kwargs.items() if k != "backend"}
    a = z0.detach().clone().requires_grad_(True)
    b = z1.detach().clone().requires_grad_(True)
    loss, _ = fused_macl_loss(a, b, negatives, MACLConfig(**options), _DenseNegativeLSE(), with_stats=False)
    (loss * upstream_for(loss)).sum().backward()
    return loss.detach(), [a.grad, b.grad]


def tolerance(dtype: torch.dtype, same_dtype_error: float) -> float:
    """``2 x`` the error of the reference run in the same dtype, plus the dtype's floor (TOLERANCE_FLOOR)."""
    return 2.0 * same_dtype_error + TOLERANCE_FLOOR[dtype]


def assert_matches_reference(
    backend: str,
    z0: torch.Tensor,
    z1: torch.Tensor,
    negatives: Optional[torch.Tensor] = None,
    tol: Optional[float] = None,
    **kwargs,
) -> None:
    """The loss and both input gradients of ``backend`` against the float64 reference, row by row.

    Tolerance (unless ``tol`` fixes one): :func:`tolerance` of the error that the
    dense reference run in the inputs' dtype makes on the same case, which must
    itself stay under MATH.md's bound (TOLERANCE): a kernel may be at most twice as
    far from the float64 truth as the rounding of its dtype forces.
    """
    loss, grads = loss_and_grads(z0, z1, negatives, backend=backend, **kwargs)
    assert grads[0].dtype == z0.dtype and grads[1].dtype == z1.dtype, "gradients come back in the input dtype"
    truth = reference_float64(z0, z1, negatives, **kwargs)
    rounded = reference_in_dtype(z0, z1, negatives, **kwargs)
    anchors, stats = _reference_stats(z0, z1, negatives, kwargs)
    tau = stats.temperature.item()
    gradient_floor = _zero_gradient_scale(z0, z1, anchors, tau, kwargs) if z0.shape[1] == 1 else 0.0
    for name, got, same_dtype, expected, floor in zip(
        ("loss", "dz0", "dz1"),
        [loss, *grads],
        [rounded[0], *rounded[1]],
        [truth[0], *truth[1]],
        (0.0, gradient_floor, gradient_floor),
    ):
        bound = tol
        if bound is None:
            rounding = relative_error(same_dtype, expected, floor)
            _check_rounding(f"{backend} {name}", z0.dtype, rounding, tau)
            bound = tolerance(z0.dtype, rounding)
        assert_rel_close(got, expected, bound, f"{backend} {name}", floor)


def _check_rounding(what: str, dtype: torch.dtype, rounding: float, tau: float) -> None:
    """The dense run in ``dtype`` must itself stay within MATH.md's bound, or shared code is wrong.

    It shares the fused path and the per-anchor math with the backends, so a bug
    there moves it too; this keeps such a bug from widening the tolerance.
    MATH.md's bounds hold at tau ~ 0.1; a cosine's rounding reaches the logits as ulp / tau.
    """
    bound = TOLERANCE[dtype] * max(1.0, 0.1 / tau)
    assert rounding <= bound, (
        f"{what}: the dense reference run in {dtype} is {rounding:.3g} off the float64 one, over MATH.md's "
        f"{bound:.3g}: the shared per-anchor math or the fused path is wrong"
    )


def _reference_stats(z0, z1, negatives, kwargs) -> Tuple[int, mk.MACLStats]:
    """(number of anchors, statistics) of the float64 reference on these inputs."""
    options = {**kwargs, "backend": "reference", "return_stats": True, "reduction": "none"}
    bank = None if negatives is None else negatives.double()
    per_anchor_loss, stats = mk.macl_loss(z0.double(), z1.double(), negatives=bank, **options)
    return per_anchor_loss.numel(), stats


def _zero_gradient_scale(z0, z1, anchors: int, tau: float, kwargs) -> float:
    """The size the gradient would have without the normalization, for D = 1.

    With D = 1 every unit vector is +-1 and the exact gradient is 0, so relative
    error is undefined; rounding noise is measured against the largest unprojected
    gradient, g / (tau * |z|), instead.
    """
    per_anchor = 1.0 / anchors if kwargs.get("reduction", "mean") == "mean" else 1.0
    smallest = torch.cat([z0, z1]).double().abs().clamp_min(1e-12).min().item()
    return 1.5 * per_anchor / (tau * smallest)


class HandComputed(NamedTuple):
    losses: List[float]  # per anchor, in the loss's anchor order (MATH.md section 1)
    positive_probs: List[float]  # P of each anchor
    alignment: float
    temperature: float


def losses_by_hand(z0, z1, negatives=None, **settings) -> HandComputed:
    """MATH.md sections 1-3 with Python floats, one anchor at a time, for a handful of rows.

    ``settings``: those of :func:`macl_kernels.macl_loss` (their defaults and checks
    are :class:`MACLConfig`'s). An oracle that shares no math (and no order of
    rounding) with the package: rows are lists, each anchor's softmax is written
    out, and 1 - P and -log P come from the negatives' share of it, so that both
    stay exact when P is near 1.
    """
    cfg = MACLConfig(**settings)
    rows = lambda t: t.tolist() if isinstance(t, torch.Tensor) else [list(map(float, r)) for r in t]  # noqa: E731
    dot = lambda a, b: math.fsum(x * y for x, y in zip(a, b))  # noqa: E731
    unit = lambda v: [x / max(math.sqrt(dot(v, v)), 1e-12) for x in v]  # noqa: E731
    u0, u1 = [unit(v) for v in rows(z0)], [unit(v) for v in rows(z1)]
    n = len(u0)
    alignment = math.fsum(dot(a, b) for a, b in zip(u0, u1)) / n
    if cfg.schedule == "linear":
        tau = cfg.temperature * (1 + cfg.alpha * (alignment - cfg.A_0))
    else:
        tau = cfg.temperature * cfg.alpha**alignment
    tau = max(tau, cfg.min_temperature)
    others = lambda views, r: [views[c] for c in range(n) if c != r]  # noqa: E731
    if cfg.layout == "ntxent":
        x = u0 + u1
        problems = [(x[r], x[(r + n) % (2 * n)], [x[c] for c in range(2 * n) if c not in (r, (r + n) % (2 * n))])
                    for r in range(2 * n)]  # fmt: skip
    elif cfg.layout in ("cross", "cross_sym"):
        problems = [(u0[r], u1[r], others(u1, r)) for r in range(n)]
        problems += [(u1[r], u0[r], others(u0, r)) for r in range(n)] if cfg.layout == "cross_sym" else []
    else:  # queue
        bank = [unit(v) for v in rows(negatives)]
        problems = [(u0[r], u1[r], bank) for r in range(n)]
    losses, probs = [], []
    for anchor, positive, negative_rows in problems:
        if not negative_rows:  # MATH.md section 8: an anchor without negatives has P = 1 and loss 0
            losses.append(0.0)
            probs.append(1.0)
            continue
        logits = [dot(anchor, positive) / tau] + [dot(anchor, y) / tau for y in negative_rows]
        weights = [math.exp(v - max(logits)) for v in logits]
        total = math.fsum(weights)
        p, one_minus_p = weights[0] / total, math.fsum(weights[1:]) / total
        v = 1 / (one_minus_p + cfg.eps) if cfg.reweight else 1.0
        losses.append(v * math.log1p(math.fsum(weights[1:]) / weights[0]))  # -log P, exact near P = 1
        probs.append(p)
    return HandComputed(losses, probs, alignment, tau)


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
import json, sys, torch, macl_kernels as mk
from macl_kernels.testing import PeakMemory
n, d, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
z0 = torch.randn(n, d, requires_grad=True)
z1 = torch.randn(n, d, requires_grad=True)
mk.macl_loss(z0[:8], z1[:8], backend=backend).backward()  # first-call costs: thread pools, lazy loading
z0.grad = z1.grad = None
memory = PeakMemory(torch.device("cpu"))
memory.start()
mk.macl_loss(z0, z1, backend=backend).backward()
print(json.dumps({"peak_mb": memory.peak() / 2**20, "method": memory.method}))
"""


def peak_rss_mb(n: int, d: int, backend: str) -> float:
    """Peak RSS (MiB) above its start of one fp32 forward + backward of N pairs on the CPU, in a fresh process.

    Measured from after the inputs and a tiny warm-up step, with :class:`PeakMemory`:
    the resident size of ``import torch`` alone varies by hundreds of MiB from run to
    run, so a bound on the whole process would test the allocator, not the loss.
    """
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(n), str(d), backend], check=True, capture_output=True, text=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["method"] == "VmHWM", f"peak memory needs /proc/self/clear_refs, got {result['method']}"
    return result["peak_mb"]


def proc_status_kib(field: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ``VmSize``), None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory in bytes above the level at :meth:`start`, on the CPU or a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.method = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"  # the peak since the process started: may include import spikes
        self.baseline = (proc_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)
        if self.method == "VmHWM":
            peak = (proc_status_kib("VmHWM") or 0) * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self.baseline)


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
