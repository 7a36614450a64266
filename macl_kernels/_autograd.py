"""How the package's fused ops meet autograd and ``torch.func``: one place for every backend.

- :func:`once_differentiable`, the guard every kernel backward goes through. Such a
  backward cannot be differentiated again; left alone, a double backward through it
  would silently drop its terms (PyTorch's fallback for an op without an autograd
  kernel only warns) or fail with an unrelated-looking error. Decorated, the second
  backward raises :data:`HIGHER_ORDER_ERROR`. Unlike
  ``torch.autograd.function.once_differentiable``, the raising node is connected to
  the tensors the backward saved as well as to its upstream gradients, so a
  gradient that depends on the inputs only through saved tensors (a constant
  upstream gradient) still reaches it and ``torch.autograd.grad(..., inputs=...)``
  cannot prune it away.
- :func:`register_autograd`, an op's autograd formula registered so that
  ``torch.func.grad`` / ``vjp`` accept it too.
- :func:`refuse_vmap`, a clear error for ``torch.func.vmap`` on a fused op.
"""

from __future__ import annotations

import functools

import torch

HIGHER_ORDER_ERROR = (
    "higher-order gradients are not supported by this macl_kernels backend (its backward is a fused kernel, "
    "once differentiable); use backend='torch' or backend='reference' for them"
)

VMAP_ERROR = (
    "macl_kernels' fused backends do not support torch.func.vmap; call the loss once per batch, "
    "or use backend='reference'"
)


def refuse_vmap(info, in_dims, *args):
    """The ``vmap`` rule of the fused ops' ``autograd.Function`` s: a clear error instead of a torch internal one."""
    raise RuntimeError(VMAP_ERROR)


class _RaiseOnBackward(torch.autograd.Function):
    """Forward: copies of the first ``count`` tensors (a backward's gradients). Backward: raises.

    The remaining inputs are only there to connect the node to what the gradients depend on.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(count: int, *tensors: torch.Tensor):
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(HIGHER_ORDER_ERROR)


def once_differentiable(backward):
    """Decorate ``backward(ctx, *grad_outputs)`` (of an ``autograd.Function`` or ``register_autograd``).

    Outside a recorded backward (the usual ``loss.backward()``) this is a plain call.
    When autograd records the backward (``create_graph=True``, ``torch.func.grad``),
    the backward runs without recording and its tensor results come back through a
    node whose own backward raises :data:`HIGHER_ORDER_ERROR`.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        if not torch.is_grad_enabled():
            return backward(ctx, *grad_outputs)
        with torch.no_grad():
            results = backward(ctx, *grad_outputs)
        sources = [t for t in (*grad_outputs, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
        single = isinstance(results, torch.Tensor)
        results = (results,) if single else tuple(results)
        tensors = [r for r in results if r is not None]
        if sources and tensors:
            guarded = iter(_RaiseOnBackward.apply(len(tensors), *tensors, *sources))
            results = tuple(None if r is None else next(guarded) for r in results)
        return results[0] if single else results

    return wrapper


def register_autograd(op, backward, setup_context):
    """Register ``backward`` as ``op``'s autograd formula; return ``op`` differentiable for every caller.

    The formula is registered on the op itself, for ``torch.ops`` callers, ``opcheck``
    and ``torch.compile`` (AOT autograd differentiates the op through it, and a
    ``triton_op`` stays visible to inductor). In eager mode the function returned
    applies the same formula through an ``autograd.Function`` of the modern form
    (``setup_context``) instead, because the one ``torch.library.register_autograd``
    generates is refused by ``torch.func`` transforms (pytorch/pytorch#170834, still
    so in torch 2.14).
    """
    torch.library.register_autograd(op, backward, setup_context=setup_context)

    def forward(*args):
        return op(*args)  # grad mode is off here: the op's autograd kernel goes straight to the kernel

    function = type(
        f"{op}_autograd",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "vmap": staticmethod(refuse_vmap),
        },
    )

    def differentiable_op(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return function.apply(*args)

    return differentiable_op
