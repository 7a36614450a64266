"""Gradient caching: a contrastive step over a batch whose encoder activations do not fit at once.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(2021). The fused loss needs O(N*D) memory, so at large N the encoder's activations
are what limits the batch. :class:`GradCache` splits the step in two passes:

1. embed the batch chunk by chunk without autograd, saving each chunk's RNG state,
   and compute the loss of the whole batch on the concatenated embeddings;
2. in ``loss.backward()``, once the gradient with respect to the embeddings is known
   (O(N*D)), re-run each chunk with autograd, replaying its RNG state and autocast
   settings, and backpropagate that chunk's slice of the gradient.

The parameters end with the gradient of the uncached step, exactly, while at most
one chunk's activations are alive. Mechanically, the embeddings are the outputs of
one autograd Function whose backward is the second pass (like the reentrant variant
of ``torch.utils.checkpoint``): the loss and its own parameters stay in the ordinary
autograd graph, so a learnable temperature or ``GradScaler``'s scale flow as usual,
and the encoders' parameters receive their gradient from nested ``backward`` calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["GradCache"]

# ---- nested inputs ------------------------------------------------------------------------------


@dataclass
class _Flat:
    """One input tree's tensors, their paths (for messages) and how to rebuild the tree around new leaves."""

    tensors: List[torch.Tensor]
    paths: List[str]
    rebuild: Callable[[Sequence[torch.Tensor]], Any]


def _flatten(tree: Any, path: str) -> _Flat:
    """Leaves of a (nested) mapping / list / tuple of tensors, depth first; rebuilds dicts, lists, (named)tuples."""
    if isinstance(tree, torch.Tensor):
        if tree.dim() == 0:
            raise TypeError(f"{path} is a 0-dim tensor; GradCache splits every input tensor along dim 0")
        return _Flat([tree], [path], lambda leaves: leaves[0])
    if isinstance(tree, Mapping):
        keys = list(tree.keys())
        parts = [_flatten(tree[k], f"{path}[{k!r}]") for k in keys]
        rebuild_parts = _parts_rebuilder(parts)
        return _joined(parts, lambda leaves: dict(zip(keys, rebuild_parts(leaves))))  # any Mapping: a dict
    if isinstance(tree, (list, tuple)):
        parts = [_flatten(item, f"{path}[{i}]") for i, item in enumerate(tree)]
        make, rebuild_parts = type(tree), _parts_rebuilder(parts)
        if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple takes its fields as arguments
            return _joined(parts, lambda leaves: make(*rebuild_parts(leaves)))
        return _joined(parts, lambda leaves: make(rebuild_parts(leaves)))
    raise TypeError(
        f"{path} must be a tensor or a dict/list/tuple of tensors (each split along dim 0), got "
        f"{type(tree).__name__}; bind constant arguments into the encoder instead (functools.partial)"
    )


def _joined(parts: List[_Flat], rebuild) -> _Flat:
    return _Flat([t for p in parts for t in p.tensors], [q for p in parts for q in p.paths], rebuild)


def _parts_rebuilder(parts: List[_Flat]) -> Callable[[Sequence[torch.Tensor]], List[Any]]:
    """Rebuilds the parts from consecutive runs of leaves; holds no reference to the original tensors."""
    rebuilders, counts = [p.rebuild for p in parts], [len(p.tensors) for p in parts]

    def rebuild(leaves: Sequence[torch.Tensor]) -> List[Any]:
        items, start = [], 0
        for part, count in zip(rebuilders, counts):
            items.append(part(leaves[start : start + count]))
            start += count
        return items

    return rebuild


def _common_rows(flat0: _Flat, flat1: _Flat) -> int:
    """N: the dim-0 size every input tensor of both towers must share."""
    if not flat0.tensors or not flat1.tensors:
        empty = "x0" if not flat0.tensors else "x1"
        raise ValueError(f"{empty} holds no tensor; GradCache needs the batch as tensors split along dim 0")
    n, first = flat0.tensors[0].shape[0], flat0.paths[0]
    for t, path in zip(flat0.tensors + flat1.tensors, flat0.paths + flat1.paths):
        if t.shape[0] != n:
            raise ValueError(
                f"every input tensor must have the same size along dim 0 (one row per pair); "
                f"{first} has {n} rows, {path} has {t.shape[0]}"
            )
    if n == 0:
        raise ValueError("the inputs have 0 rows along dim 0; GradCache needs at least one pair")
    return n


# ---- what the second pass replays ---------------------------------------------------------------


def _cuda_devices() -> List[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@dataclass
class _RngState:
    """The CPU generator's state and that of every initialized CUDA device."""

    cpu: torch.Tensor
    cuda: List[torch.Tensor]

    @staticmethod
    def capture(devices: List[int]) -> "_RngState":
        return _RngState(torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])

    def restore(self, devices: List[int]) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in zip(devices, self.cuda):
            torch.cuda.set_rng_state(state, d)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_settings() -> Dict[str, Tuple[bool, torch.dtype]]:
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES}


@contextlib.contextmanager
def _autocast_as(settings: Dict[str, Tuple[bool, torch.dtype]], cache_enabled: bool):
    """Autocast exactly as in the first pass, whatever is active where backward runs."""
    with contextlib.ExitStack() as stack:
        for device, (enabled, dtype) in settings.items():
            if enabled or torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled))
        yield


def _sync_context(encoder: Callable, sync: bool):
    """DDP (or anything with ``no_sync``): accumulate locally, all-reduce with the encoder's last chunk only."""
    no_sync = getattr(encoder, "no_sync", None)
    return contextlib.nullcontext() if sync or not callable(no_sync) else no_sync()


@dataclass
class _Tower:
    encoder: Callable
    name: str  # "encoder" or "encoder1", for messages
    count: int  # input tensors of this tower
    rebuild: Callable[[Sequence[torch.Tensor]], Any]  # the input structure around a chunk's tensors
    rng: List[_RngState] = field(default_factory=list)  # per chunk, taken before its first-pass forward
    embedding: Tuple[torch.Size, torch.dtype] = (torch.Size(), torch.float32)  # first pass: output shape, dtype


@dataclass
class _Plan:
    """What the second pass needs besides the input tensors (those are saved on the autograd context)."""

    towers: Tuple[_Tower, _Tower]
    bounds: List[Tuple[int, int]]  # [start, stop) rows of each chunk
    cuda_devices: List[int]
    autocast: Dict[str, Tuple[bool, torch.dtype]]
    autocast_cache: bool


def _chunk(tower: _Tower, leaves: Sequence[torch.Tensor], start: int, stop: int) -> Any:
    return tower.rebuild([t[start:stop] for t in leaves])


def _check_output(out: Any, name: str, rows: int, start: int, first: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` must be a float tensor of ``rows`` rows, shaped and typed like the first chunk's output."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must return a tensor (one row per input), got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != rows:
        raise ValueError(
            f"{name} must return one row per input: for the {rows} rows from row {start} it returned "
            f"shape {tuple(out.shape)}"
        )
    if not out.is_floating_point():
        raise TypeError(f"{name} must return a floating-point tensor, got {out.dtype}")
    if first is not None and (out.shape[1:] != first.shape[1:] or out.dtype != first.dtype):
        raise ValueError(
            f"{name} returned rows of shape {tuple(out.shape[1:])} {out.dtype} for the chunk at row {start} but "
            f"{tuple(first.shape[1:])} {first.dtype} for the first chunk"
        )
    return out


def _embed(tower: _Tower, inputs: Sequence[torch.Tensor], bounds: List[Tuple[int, int]], before_chunk) -> torch.Tensor:
    """The tower's embeddings of all rows, chunk by chunk, written into one (N, ...) tensor."""
    embeddings = None
    for start, stop in bounds:
        before_chunk()
        out = tower.encoder(_chunk(tower, inputs, start, stop))
        out = _check_output(out, tower.name, stop - start, start, embeddings)
        if embeddings is None:
            embeddings = out.new_empty((bounds[-1][1], *out.shape[1:]))
        embeddings[start:stop] = out
    return embeddings


def _check_replay(out: Any, tower: _Tower, start: int, stop: int) -> None:
    shape, dtype = tower.embedding
    expected = (stop - start, *shape[1:])
    if not isinstance(out, torch.Tensor) or out.shape != expected or out.dtype != dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(
            f"{tower.name} returned {got} when GradCache re-ran rows {start}:{stop}, but {expected} {dtype} in the "
            "first pass: the encoder must compute the same function in both passes"
        )


class _CachedEmbeddings(torch.autograd.Function):
    """Forward: both towers' embeddings, chunk by chunk, without autograd. Backward: the second pass."""

    @staticmethod
    def forward(ctx, plan: _Plan, anchor: torch.Tensor, *inputs: torch.Tensor):
        embeddings, offset = [], 0
        for tower in plan.towers:
            mine = inputs[offset : offset + tower.count]
            offset += tower.count
            save_rng = lambda tower=tower: tower.rng.append(_RngState.capture(plan.cuda_devices))
            z = _embed(tower, mine, plan.bounds, save_rng)
            tower.embedding = (z.shape, z.dtype)
            embeddings.append(z)
        if _cuda_devices() != plan.cuda_devices:
            raise RuntimeError(
                "CUDA was initialized inside the encoder during GradCache's first pass, so its RNG state could "
                "not be saved for the replay; initialize CUDA before the call (e.g. move the model to the GPU)"
            )
        ctx.plan = plan
        ctx.save_for_backward(*inputs)  # so a second backward without retain_graph=True fails as usual
        ctx.set_materialize_grads(False)  # an unused tower gets None: its second pass is skipped
        return tuple(embeddings)

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "GradCache's loss supports loss.backward() (gradients accumulate in .grad: the encoders' "
                "parameters are reached by a nested backward), not torch.autograd.grad() or backward(inputs=...)"
            )
        inputs = ctx.saved_tensors
        plan: _Plan = ctx.plan
        input_grads: List[Optional[torch.Tensor]] = [None] * len(inputs)
        work = [(t, k) for t, grad in enumerate(grads) if grad is not None for k in range(len(plan.bounds))]
        last_use = {id(plan.towers[t].encoder): i for i, (t, _) in enumerate(work)}
        offsets = (0, plan.towers[0].count)
        # fork_rng: the replay leaves the global RNG as the first pass left it.
        with torch.random.fork_rng(devices=plan.cuda_devices, device_type="cuda"), torch.enable_grad():
            for i, (t, k) in enumerate(work):
                tower, (start, stop) = plan.towers[t], plan.bounds[k]
                mine = inputs[offsets[t] : offsets[t] + tower.count]
                leaves = [x.detach()[start:stop].requires_grad_(x.requires_grad) for x in mine]
                tower.rng[k].restore(plan.cuda_devices)
                with (
                    _autocast_as(plan.autocast, plan.autocast_cache),
                    _sync_context(tower.encoder, last_use[id(tower.encoder)] == i),
                ):
                    out = tower.encoder(tower.rebuild(leaves))
                    _check_replay(out, tower, start, stop)
                    if out.requires_grad:
                        torch.autograd.backward(out, grads[t][start:stop])
                for j, leaf in enumerate(leaves):
                    if leaf.grad is not None:
                        index = offsets[t] + j
                        if input_grads[index] is None:
                            input_grads[index] = torch.zeros_like(inputs[index])
                        input_grads[index][start:stop] = leaf.grad
        return (None, None, *input_grads)


def _check_no_batch_statistics(encoder: Callable, name: str) -> None:
    """BatchNorm that uses the batch's statistics (training mode, or no running statistics kept) would
    normalize each chunk by its own: not the batch's gradient."""
    if not isinstance(encoder, nn.Module):
        return
    for module_name, module in encoder.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if not module.training and module.running_mean is None:  # track_running_stats=False: batch statistics
            raise ValueError(
                f"{name} has {type(module).__name__} {module_name!r} without running statistics "
                "(track_running_stats=False): even in eval mode it normalizes with the batch's statistics, which "
                "under GradCache are each chunk's, so the gradient would not be the full batch's; use a per-sample "
                "normalization (LayerNorm, GroupNorm)"
            )
        if module.training:
            raise ValueError(
                f"{name} has {type(module).__name__} {module_name!r} in training mode: under GradCache it would "
                "normalize each chunk with the chunk's statistics (and update its running statistics in both "
                "passes), so the gradient would not be the full batch's; put it in eval mode or use a per-sample "
                "normalization (LayerNorm, GroupNorm)"
            )


class GradCache:
    """A contrastive step whose encoder activations are held one chunk at a time.

    ``cache = GradCache(encoder, loss_fn, chunk_size, encoder1=None)``, then
    ``loss = cache(x0, x1)`` and ``loss.backward()`` leave in every parameter's
    ``.grad`` the gradient of ``loss_fn(encoder(x0), (encoder1 or encoder)(x1))``,
    while the activations of at most ``chunk_size`` rows of one tower are in memory at
    a time (Gao et al. 2021). The price: each encoder forward runs twice.

    - ``x0``, ``x1``: tensors, or (nested) dicts / lists / tuples of tensors, all
      with the same size N along dim 0, which is what gets split (images,
      tokenized text). The encoders receive chunks of the same structure
      (mappings as dicts) and must return a floating-point tensor with one row
      per input row.
    - ``encoder1``: a second tower (CLIP-style); by default ``encoder`` embeds both.
    - ``loss_fn(z0, z1, **loss_kwargs)``: any loss of this package (``mk.macl_loss``,
      ``mk.MACLLoss(...)``, a ``functools.partial``) or any function of the two
      embedding batches. ``cache(x0, x1, **loss_kwargs)`` returns what it returns,
      e.g. ``(loss, stats)`` with ``return_stats=True``, computed on the whole
      batch; the loss's own parameters (a learnable temperature) and tensors in
      ``loss_kwargs`` get their gradients through the ordinary autograd graph, and
      input tensors that require grad get theirs too.
    - Randomness in the encoders (dropout, on-device augmentation) is replayed: the
      CPU and CUDA RNG states are saved per chunk and restored for its second pass,
      and the global RNG is left as the first pass left it.
    - ``torch.autocast`` settings of the call are replayed in the second pass;
      ``scaler.scale(loss).backward()`` scales the embeddings' gradient, hence the
      encoders', exactly as without the cache.
    - DDP: pass the ``DistributedDataParallel`` module itself as the encoder. Every
      chunk but its last one runs under ``no_sync()``, so gradients are all-reduced
      once per step; every rank must split the same N into the same chunks. With
      ``gather_distributed=True`` in the loss, each rank caches its own chunks.
    - Under ``torch.no_grad()`` / ``inference_mode()`` (evaluation) the call is one
      chunked pass that returns the loss, with nothing kept for a second pass.

    Call ``loss.backward()`` (after ``retain_graph=True`` a second one accumulates
    again, as without the cache; without it a second one raises).
    ``torch.autograd.grad`` and ``backward(inputs=...)`` raise, since the
    parameters are reached by a nested backward. Training-mode BatchNorm raises (it
    would see the chunk's statistics, not the batch's).
    """

    def __init__(
        self, encoder: Callable, loss_fn: Callable, chunk_size: int, encoder1: Optional[Callable] = None
    ) -> None:
        for name, value in (("encoder", encoder), ("loss_fn", loss_fn)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {type(value).__name__}")
        if encoder1 is not None and not callable(encoder1):
            raise TypeError(f"encoder1 must be callable or None, got {type(encoder1).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.encoder = encoder
        self.encoder1 = encoder1
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size

    def __call__(self, x0: Any, x1: Any, **loss_kwargs: Any) -> Any:
        flat0, flat1 = _flatten(x0, "x0"), _flatten(x1, "x1")
        n = _common_rows(flat0, flat1)
        second = (self.encoder, "encoder") if self.encoder1 is None else (self.encoder1, "encoder1")
        towers = (
            _Tower(self.encoder, "encoder", len(flat0.tensors), flat0.rebuild),
            _Tower(second[0], second[1], len(flat1.tensors), flat1.rebuild),
        )
        for tower in towers:
            _check_no_batch_statistics(tower.encoder, tower.name)
        bounds = [(s, min(s + self.chunk_size, n)) for s in range(0, n, self.chunk_size)]
        if torch.is_grad_enabled():
            plan = _Plan(towers, bounds, _cuda_devices(), _autocast_settings(), torch.is_autocast_cache_enabled())
            anchor = torch.empty(0, requires_grad=True)  # makes the embeddings require grad, hence the second pass
            z0, z1 = _CachedEmbeddings.apply(plan, anchor, *flat0.tensors, *flat1.tensors)
        else:  # evaluation: one chunked pass, nothing to replay
            nothing = lambda: None
            z0, z1 = (_embed(tower, flat.tensors, bounds, nothing) for tower, flat in zip(towers, (flat0, flat1)))
        return self.loss_fn(z0, z1, **loss_kwargs)

    def __repr__(self) -> str:
        towers = f"encoder={self.encoder!r}" + ("" if self.encoder1 is None else f", encoder1={self.encoder1!r}")
        return f"GradCache({towers}, loss_fn={self.loss_fn!r}, chunk_size={self.chunk_size})"
