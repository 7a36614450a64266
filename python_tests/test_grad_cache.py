"""GradCache: the cached two-pass step leaves the gradient of the uncached step, with one chunk's activations.

The reference is the ordinary step, ``loss_fn(encoder(x0), encoder1(x1)).backward()``.
For encoders with dropout it runs the encoder chunk by chunk in the same order, so
that it draws the same dropout masks as GradCache's first pass: the cached step
must then replay them exactly in its second pass.
"""

import functools
import json
import os
import subprocess
import sys
from typing import List, NamedTuple

import pytest
import torch
from torch import nn

import macl_kernels as mk
from macl_kernels.testing import TOLERANCE, assert_rel_close, relative_error, stats_dict
from python_tests import grad_cache_worker

N = 10
DIM = 5  # embedding width
SIDE = 8  # images are 1 x 8 x 8


def mlp(dropout: float = 0.25, in_features: int = 6) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, DIM))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.GELU()
        )
        self.head = nn.Linear(6 * (SIDE // 2) ** 2, DIM)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


class ScaledLoss(nn.Module):
    """A loss with its own parameter: a per-dimension scale of the embeddings before MACL."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, DIM))

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        return mk.macl_loss(z0 * self.scale, z1 * self.scale)


def inputs_for(encoder: nn.Module, dtype: torch.dtype, seed: int, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, SIDE, SIDE) if isinstance(encoder, SmallCNN) else (n, encoder[0].in_features)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


class Step(NamedTuple):
    loss: torch.Tensor
    stats: dict
    grads: List[torch.Tensor]
    rng_after: torch.Tensor  # a draw from the global RNG after the step


def parameter_grads(*modules: nn.Module) -> List[torch.Tensor]:
    seen, grads = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                grads.append(p.grad.clone())
                p.grad = None
    return grads


def chunked(encoder, x: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([encoder(part) for part in x.split(chunk)])


def uncached_step(encoder, encoder1, loss_fn, x0, x1, *, seed=0, chunk=None, modules=()) -> Step:
    torch.manual_seed(seed)
    embed = (lambda e, x: e(x)) if chunk is None else functools.partial(chunked, chunk=chunk)
    out = loss_fn(embed(encoder, x0), embed(encoder1 or encoder, x1))
    return _finish(out, [encoder, encoder1 or encoder, *modules])


def cached_step(encoder, encoder1, loss_fn, x0, x1, chunk, *, seed=0, modules=()) -> Step:
    torch.manual_seed(seed)
    out = mk.GradCache(encoder, loss_fn, chunk, encoder1=encoder1)(x0, x1)
    return _finish(out, [encoder, encoder1 or encoder, *modules])


def _finish(out, modules) -> Step:
    loss, stats = out if isinstance(out, tuple) else (out, None)
    loss.backward()
    return Step(loss.detach(), stats and stats_dict(stats), parameter_grads(*modules), torch.rand(3))


def assert_same_parameter_grad(got: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """One relative error per parameter tensor (the whole tensor as one row).

    A parameter's gradient is a sum over the batch, which the cache adds up chunk by
    chunk: in fp32/bf16 an element near cancellation carries a relative rounding error
    that says nothing about the cache. Per-sample quantities (the loss per anchor, the
    embeddings' gradients) keep the per-row measure; fp64 runs at 1e-10 catch real bugs.
    """
    assert_rel_close(got.reshape(1, -1), expected.reshape(1, -1), tol, what)


def assert_same_step(got: Step, expected: Step, tol: float) -> None:
    assert_rel_close(got.loss, expected.loss, tol, "loss")
    assert (got.stats is None) == (expected.stats is None)
    if expected.stats is not None:
        assert got.stats == pytest.approx(expected.stats, rel=tol)
    assert len(got.grads) == len(expected.grads)
    for i, (g, e) in enumerate(zip(got.grads, expected.grads)):
        assert g.dtype == e.dtype
        assert_same_parameter_grad(g, e, tol, f"gradient of parameter {i}")
    assert torch.equal(got.rng_after, expected.rng_after), "the global RNG ends where the uncached step leaves it"


def make_encoders(kind: str, dtype: torch.dtype):
    torch.manual_seed(3)
    if kind == "mlp-dropout":
        return mlp().to(dtype), None
    if kind == "cnn":
        return SmallCNN().to(dtype), None
    return SmallCNN().to(dtype), mlp(dropout=0.0).to(dtype)  # two towers: images and vectors


MACL_WITH_STATS = functools.partial(mk.macl_loss, return_stats=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("chunk", [1, 3, 5, 16])  # 3 does not divide N=10; 16: one chunk
@pytest.mark.parametrize("kind", ["mlp-dropout", "cnn", "two-towers"])
def test_same_gradient_as_the_uncached_step(kind, chunk, dtype):
    encoder, encoder1 = make_encoders(kind, dtype)
    x0 = inputs_for(encoder, dtype, seed=1)
    x1 = inputs_for(encoder1 or encoder, dtype, seed=2)
    # With dropout, the reference draws its masks chunk by chunk, in the order of the cached first pass.
    reference_chunk = chunk if kind == "mlp-dropout" else None
    expected = uncached_step(encoder, encoder1, MACL_WITH_STATS, x0, x1, chunk=reference_chunk)
    got = cached_step(encoder, encoder1, MACL_WITH_STATS, x0, x1, chunk)
    assert_same_step(got, expected, TOLERANCE[dtype])


def test_dropout_is_replayed_not_redrawn():
    """The dropout case above can fail: other masks give a gradient far outside its tolerance."""
    encoder, _ = make_encoders("mlp-dropout", torch.float64)
    x0, x1 = inputs_for(encoder, torch.float64, 1), inputs_for(encoder, torch.float64, 2)
    one = cached_step(encoder, None, mk.macl_loss, x0, x1, 3, seed=0)
    other = uncached_step(encoder, None, mk.macl_loss, x0, x1, chunk=3, seed=1)
    assert relative_error(one.grads[0], other.grads[0]) > 1e-3


def test_a_loss_with_its_own_parameter_gets_its_gradient():
    encoder, _ = make_encoders("mlp-dropout", torch.float64)
    loss_fn = ScaledLoss().double()
    x0, x1 = inputs_for(encoder, torch.float64, 1), inputs_for(encoder, torch.float64, 2)
    expected = uncached_step(encoder, None, loss_fn, x0, x1, chunk=4, modules=[loss_fn])
    got = cached_step(encoder, None, loss_fn, x0, x1, 4, modules=[loss_fn])
    assert_same_step(got, expected, TOLERANCE[torch.float64])
    assert got.grads[-1].abs().max() > 0  # the scale's gradient is there, and equal


def test_loss_keyword_arguments_reach_the_loss():
    encoder, _ = make_encoders("cnn", torch.float64)
    x0, x1 = inputs_for(encoder, torch.float64, 1), inputs_for(encoder, torch.float64, 2)
    bank = torch.randn(7, DIM, dtype=torch.float64)
    expected = uncached_step(encoder, None, functools.partial(mk.macl_loss, negatives=bank, layout="queue"), x0, x1)
    torch.manual_seed(0)
    loss = mk.GradCache(encoder, functools.partial(mk.macl_loss, layout="queue"), 4)(x0, x1, negatives=bank)
    got = _finish(loss, [encoder])
    assert_same_step(got, expected, TOLERANCE[torch.float64])


class Ids(NamedTuple):
    ids: torch.Tensor


class DictEncoder(nn.Module):
    """Takes {"pixels": (n, 6), "extra": [(n, 2), Ids((n,) ints)]}, like a tokenized batch."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(dropout=0.1, in_features=8)
        self.table = nn.Embedding(4, 8)

    def forward(self, batch):
        dense, ids = batch["extra"]
        return self.body(torch.cat([batch["pixels"], dense], dim=1) + self.table(ids.ids))


def test_nested_inputs_are_split_and_inputs_that_require_grad_get_it():
    torch.manual_seed(3)
    encoder = DictEncoder().double()
    g = torch.Generator().manual_seed(4)

    def batch():
        pixels = torch.randn(N, 6, generator=g, dtype=torch.float64).requires_grad_(True)
        dense = torch.randn(N, 2, generator=g, dtype=torch.float64)
        return {"pixels": pixels, "extra": [dense, Ids(torch.randint(0, 4, (N,), generator=g))]}

    x0, x1 = batch(), batch()
    pixels = [x0["pixels"], x1["pixels"]]
    torch.manual_seed(0)  # the reference: chunk by chunk, for the same dropout masks
    z = [torch.cat([encoder(_rows(x, s, s + 4)) for s in range(0, N, 4)]) for x in (x0, x1)]
    mk.macl_loss(*z).backward()
    expected = parameter_grads(encoder) + [p.grad.clone() for p in pixels]
    for p in pixels:
        p.grad = None
    torch.manual_seed(0)
    mk.GradCache(encoder, mk.macl_loss, 4)(x0, x1).backward()
    got = parameter_grads(encoder) + [p.grad for p in pixels]
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_rel_close(a, b, TOLERANCE[torch.float64], f"gradient {i}")


def _rows(batch, start, stop):
    dense, ids = batch["extra"]
    return {"pixels": batch["pixels"][start:stop], "extra": [dense[start:stop], Ids(ids.ids[start:stop])]}


def test_autocast_and_grad_scaler():
    """The second pass runs under the first pass's autocast; the scaled loss's gradient reaches the encoder."""
    encoder, _ = make_encoders("mlp-dropout", torch.float32)
    output_dtypes = []
    encoder.register_forward_hook(lambda module, args, out: output_dtypes.append(out.dtype))
    x0, x1 = inputs_for(encoder, torch.float32, 1), inputs_for(encoder, torch.float32, 2)
    scale = 2.0**7

    def step(cached: bool):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = None if cached else (chunked(encoder, x0, 4), chunked(encoder, x1, 4))
            loss = mk.GradCache(encoder, mk.macl_loss, 4)(x0, x1) if cached else mk.macl_loss(*z)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        scaler.scale(loss).backward()
        grads = parameter_grads(encoder)
        return grads

    expected = step(cached=False)
    output_dtypes.clear()
    got = step(cached=True)
    assert output_dtypes == [torch.bfloat16] * 12  # 3 chunks x 2 towers x 2 passes, all under autocast
    # bf16 rounding: the uncached graph sums the chunks' weight gradients in bf16, the cache in fp32.
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_same_parameter_grad(g, e, TOLERANCE[torch.bfloat16], f"scaled gradient of parameter {i}")
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mk.GradCache(encoder, mk.macl_loss, 4)(x0, x1)
    loss.backward()
    assert_same_parameter_grad(
        got[0], scale * parameter_grads(encoder)[0], TOLERANCE[torch.float32], "scale x gradient"
    )


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_evaluation_is_one_pass_and_just_the_loss(mode):
    encoder, _ = make_encoders("cnn", torch.float64)
    calls = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(len(out)))
    x0, x1 = inputs_for(encoder, torch.float64, 1), inputs_for(encoder, torch.float64, 2)
    with mode():
        loss, stats = mk.GradCache(encoder, MACL_WITH_STATS, 4)(x0, x1)
        expected, expected_stats = MACL_WITH_STATS(encoder(x0), encoder(x1))
    assert calls == [4, 4, 2, 4, 4, 2, N, N]  # the cached call: one pass over 3 chunks per tower
    assert not loss.requires_grad
    assert_rel_close(loss, expected, TOLERANCE[torch.float64], "loss")
    assert stats_dict(stats) == pytest.approx(stats_dict(expected_stats), rel=1e-10)


def test_backward_twice():
    encoder, _ = make_encoders("mlp-dropout", torch.float64)
    x0, x1 = inputs_for(encoder, torch.float64, 1), inputs_for(encoder, torch.float64, 2)
    torch.manual_seed(0)
    loss = mk.GradCache(encoder, mk.macl_loss, 3)(x0, x1)
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in encoder.parameters()]
    loss.backward()  # accumulates again, as the uncached step would
    for a, b in zip(parameter_grads(encoder), once):
        assert_rel_close(a, 2 * b, TOLERANCE[torch.float64], "gradient after two backward calls")
    # A loss that saves no tensor of its own: the cache's saved inputs make the second call fail.
    loss = mk.GradCache(encoder, lambda z0, z1: z0.sum() + 2 * z1.sum(), 3)(x0, x1)
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_autograd_grad_raises():
    encoder, _ = make_encoders("cnn", torch.float64)
    x0 = inputs_for(encoder, torch.float64, 1).requires_grad_(True)
    x1 = inputs_for(encoder, torch.float64, 2)
    loss = mk.GradCache(encoder, mk.macl_loss, 4)(x0, x1)
    with pytest.raises(RuntimeError, match=r"supports loss.backward\(\)"):
        torch.autograd.grad(loss, x0, retain_graph=True)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(loss, list(encoder.parameters()))


def test_bad_arguments():
    encoder = mlp()
    for chunk in (0, -3):
        with pytest.raises(ValueError, match="chunk_size must be at least 1"):
            mk.GradCache(encoder, mk.macl_loss, chunk)
    for chunk in (2.0, True, None):
        with pytest.raises(TypeError, match="chunk_size must be an int"):
            mk.GradCache(encoder, mk.macl_loss, chunk)
    with pytest.raises(TypeError, match="encoder must be callable"):
        mk.GradCache("mlp", mk.macl_loss, 2)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        mk.GradCache(encoder, None, 2)
    with pytest.raises(TypeError, match="encoder1 must be callable or None"):
        mk.GradCache(encoder, mk.macl_loss, 2, encoder1=3)


def test_bad_inputs():
    cache = mk.GradCache(mlp(), mk.macl_loss, 4)
    x = torch.randn(N, 6)
    with pytest.raises(ValueError, match=r"x0 has 10 rows, x1 has 9"):
        cache(x, x[:9])
    with pytest.raises(ValueError, match=r"x0\['a'\] has 10 rows, x0\['b'\]\[1\] has 7"):
        mk.GradCache(lambda b: b["a"], mk.macl_loss, 4)({"a": x, "b": [x, x[:7]]}, {"a": x, "b": [x, x]})
    with pytest.raises(TypeError, match=r"x1\['flag'\] must be a tensor or a dict/list/tuple of tensors"):
        cache({"x": x}, {"x": x, "flag": True})
    with pytest.raises(TypeError, match=r"x0 is a 0-dim tensor"):
        cache(torch.tensor(1.0), x)
    with pytest.raises(ValueError, match="0 rows"):
        cache(x[:0], x[:0])
    with pytest.raises(ValueError, match="x0 holds no tensor"):
        cache([], [])


@pytest.mark.parametrize(
    "returns, error, message",
    [
        (lambda x: (x, x), TypeError, "encoder must return a tensor"),
        (lambda x: x[:2], ValueError, "for the 4 rows from row 0 it returned shape \\(2, 6\\)"),
        (lambda x: x.sum(), ValueError, "one row per input"),
        (lambda x: x.long(), TypeError, "floating-point tensor, got torch.int64"),
        (lambda x: x[:, : len(x)], ValueError, "rows of shape \\(2,\\) torch.float32 for the chunk at row 8"),
    ],
    ids=["tuple", "rows", "0-dim", "integer", "width"],
)
def test_encoder_outputs_are_checked(returns, error, message):
    x = torch.randn(N, 6)
    with pytest.raises(error, match=message):
        mk.GradCache(returns, mk.macl_loss, 4)(x, x)
    with pytest.raises(error, match=message.replace("encoder ", "encoder1 ")):
        mk.GradCache(lambda v: v, mk.macl_loss, 4, encoder1=returns)(x, x)


def test_an_encoder_that_changes_between_passes_is_an_error():
    calls = []

    def encoder(x):
        calls.append(1)
        return x if len(calls) <= 6 else x[:, :3]  # 3 chunks x 2 towers, then different

    x = torch.randn(N, 6, requires_grad=True)
    loss = mk.GradCache(encoder, mk.macl_loss, 4)(x, x)
    with pytest.raises(RuntimeError, match="same function in both passes"):
        loss.backward()


def test_training_batch_norm_is_refused():
    encoder = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, DIM))
    x = torch.randn(N, 6)
    with pytest.raises(ValueError, match="encoder1 has BatchNorm1d '1' in training mode"):
        mk.GradCache(mlp(), mk.macl_loss, 4, encoder1=encoder)(x, x)
    encoder.eval()  # running statistics: per sample, so the cache is exact
    expected = uncached_step(encoder, None, mk.macl_loss, x, x)
    assert_same_step(cached_step(encoder, None, mk.macl_loss, x, x, 4), expected, TOLERANCE[torch.float32])
    # Without running statistics, eval mode still normalizes by the batch's (each chunk's) statistics.
    stateless = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, DIM)).eval()
    with pytest.raises(ValueError, match="encoder1 has BatchNorm1d '1' without running statistics"):
        mk.GradCache(mlp(), mk.macl_loss, 4, encoder1=stateless)(x, x)


@pytest.mark.slow  # spawns processes
def test_ddp_on_two_gloo_ranks(tmp_path):
    """Each rank's DDP gradient is the single-process gradient of the whole batch; one all-reduce per step."""
    world_size = 2
    ranks = grad_cache_worker.run_ddp_group(world_size, str(tmp_path))
    x0, x1 = grad_cache_worker.global_inputs(world_size)
    per_rank = grad_cache_worker.PAIRS_PER_RANK
    for index, case in enumerate(grad_cache_worker.DDP_CASES):
        towers = grad_cache_worker.make_towers(case["towers"])
        encoder, encoder1 = towers[0], towers[-1]
        if case["gather"]:  # one loss over the global batch
            loss = mk.macl_loss(encoder(x0), encoder1(x1), layout="cross_sym")
        else:  # each rank's own loss; DDP averages their gradients
            rows = [slice(k * per_rank, (k + 1) * per_rank) for k in range(world_size)]
            loss = sum(mk.macl_loss(encoder(x0[r]), encoder1(x1[r]), layout="cross_sym") for r in rows) / world_size
        loss.backward()
        expected = [p.grad for m in towers for p in m.parameters()]
        for k, rank in enumerate(ranks):
            cached, uncached = rank[index]["cached"], rank[index]["uncached"]
            for i, (got, e) in enumerate(zip(cached["grads"], expected)):
                assert_rel_close(got, e, TOLERANCE[torch.float64], f"{case['name']}: rank {k} parameter {i}")
            # Chunks 1 and 2 of 3 under no_sync: the gradients are all-reduced as often as without the cache.
            assert cached["allreduce_calls"] == uncached["allreduce_calls"] == len(towers), case["name"]


@pytest.mark.slow  # spawns processes
def test_peak_memory_grows_with_the_chunk_not_with_the_batch():
    """Peak RSS of one fp32 step (fresh process): N x8 costs the uncached step ~x8, the cached one nearly nothing."""
    small, large, chunk = 256, 2048, 128
    configs = [[small, chunk], [large, chunk], [small, 0], [large, 0]]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))  # freed tensors go back to the OS at once
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "python_tests.grad_cache_worker", "memory", json.dumps(configs)],
        check=True, capture_output=True, text=True, cwd=root, env=env,
    )  # fmt: skip
    cached_small, cached_large, uncached_small, uncached_large = json.loads(out.stdout.strip().splitlines()[-1])
    uncached_growth = uncached_large - uncached_small
    assert uncached_large > 3 * uncached_small, "the probe sees the activations grow with N"
    assert cached_large - cached_small < 0.2 * uncached_growth, (cached_small, cached_large, uncached_growth)
    assert cached_large < 0.25 * uncached_large


@pytest.mark.gpu
def test_on_the_gpu_cuda_dropout_and_fp16_autocast_are_replayed():
    torch.manual_seed(3)
    encoder = mlp().cuda()
    x0, x1 = (inputs_for(encoder, torch.float32, seed).cuda() for seed in (1, 2))

    def step(cached: bool):
        torch.manual_seed(0)  # seeds the CUDA generator too: both steps draw the same masks in the first pass
        with torch.autocast("cuda", dtype=torch.float16):
            z = None if cached else (chunked(encoder, x0, 4), chunked(encoder, x1, 4))
            loss = mk.GradCache(encoder, mk.macl_loss, 4)(x0, x1) if cached else mk.macl_loss(*z)
        torch.amp.GradScaler("cuda", init_scale=2.0**10).scale(loss).backward()
        return parameter_grads(encoder), torch.rand(3, device="cuda")

    (got, rng_got), (expected, rng_expected) = step(cached=True), step(cached=False)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_same_parameter_grad(g, e, TOLERANCE[torch.float16], f"scaled gradient of parameter {i}")
    assert torch.equal(rng_got, rng_expected), "the CUDA RNG ends where the uncached step leaves it"
