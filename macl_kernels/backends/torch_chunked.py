"""The memory-efficient pure-PyTorch backend: anchors in row blocks, tiles recomputed.

Forward and backward walk the anchors in blocks of rows and never hold more than
one block x candidates of similarities, so memory is O(block * C + (M + C) * D)
instead of O(M * C). It runs on any device PyTorch runs on, and it is
deterministic: blocks are visited in a fixed order and the candidates' gradient
is accumulated sequentially.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._autograd import refuse_vmap
from .._math import accumulation_dtype
from .base import Backend

# Similarities held at once, in elements (float32: 16 MiB). A block of rows gets
# about three temporaries of this size (logits, mask, probabilities).
BLOCK_ELEMENTS = 1 << 22


def rows_per_block(num_candidates: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, num_candidates))


def row_blocks(num_rows: int, num_candidates: int):
    """(start, stop) of each block of anchors.

    Iterating over the number of blocks rather than over ``range(0, num_rows, step)``
    lets torch.compile(dynamic=True) guard on that number instead of on the batch
    size: one graph serves every batch that fits in as many blocks.
    """
    step = rows_per_block(num_candidates)
    for block in range((num_rows + step - 1) // step):
        yield block * step, (block + 1) * step


def _block_logits(
    x_block: torch.Tensor, cand: torch.Tensor, excluded_block: torch.Tensor, inv_tau: torch.Tensor
) -> torch.Tensor:
    """Logits of one block of anchors against all candidates, excluded columns at -inf."""
    logits = (x_block @ cand.T).mul_(inv_tau)
    columns = torch.arange(cand.shape[0], device=cand.device)
    hidden = (columns == excluded_block[:, :1]) | (columns == excluded_block[:, 1:])
    return logits.masked_fill_(hidden, float("-inf"))


class _ChunkedNegativeLSE(torch.autograd.Function):
    """The op, block by block. Its backward is written in differentiable operations
    (nothing that autograd needs is overwritten in place), so higher-order gradients
    through this backend are exact; a recorded backward keeps its tiles, O(M * C).
    """

    vmap = staticmethod(refuse_vmap)

    @staticmethod
    def forward(x, y, excluded, tau):
        acc = accumulation_dtype(x.dtype)
        x_acc = x.to(acc)
        cand = x_acc if y is None else y.to(acc)
        inv_tau = tau.to(acc).reciprocal()
        lse = torch.empty(x.shape[0], dtype=acc, device=x.device)
        for start, stop in row_blocks(x.shape[0], cand.shape[0]):
            logits = _block_logits(x_acc[start:stop], cand, excluded[start:stop], inv_tau)
            lse[start:stop] = torch.logsumexp(logits, dim=1)
        return lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, excluded, tau = inputs
        ctx.save_for_backward(x, y, excluded, tau, output)

    @staticmethod
    def backward(ctx, grad_lse):
        x, y, excluded, tau, lse = ctx.saved_tensors
        acc = lse.dtype
        need_dy = y is None or ctx.needs_input_grad[1]
        x_acc = x.to(acc)
        cand = x_acc if y is None else y.to(acc)
        inv_tau = tau.to(acc).reciprocal()
        scale = (grad_lse.to(acc) * inv_tau)[:, None]  # h_r / tau, applied to the O(rows * D) products
        # A row without negatives (lse = -inf, every logit -inf) gets P = 0, not exp(-inf - (-inf)) = NaN.
        shift = torch.where(lse == float("-inf"), float("inf"), lse)
        dx = torch.empty_like(x_acc)
        dcand = torch.zeros_like(cand) if need_dy else None
        for start, stop in row_blocks(x.shape[0], cand.shape[0]):
            logits = _block_logits(x_acc[start:stop], cand, excluded[start:stop], inv_tau)
            probs = logits.sub_(shift[start:stop, None]).exp_()  # E = scale * probs, never modified again
            dx[start:stop] = scale[start:stop] * (probs @ cand)
            if dcand is not None:
                dcand.addmm_(probs.T, scale[start:stop] * x_acc[start:stop])
        if y is None:
            return (dx + dcand).to(x.dtype), None, None, None
        dy = None if dcand is None else dcand.to(y.dtype)
        return dx.to(x.dtype), dy, None, None


class TorchBackend(Backend):
    name = "torch"
    devices = "any (pure PyTorch)"
    twice_differentiable = True

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None

    def negative_lse(self, x, y, excluded, tau):
        return _ChunkedNegativeLSE.apply(x, y, excluded, tau)
