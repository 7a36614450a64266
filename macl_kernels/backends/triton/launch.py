"""How the host code launches kernels: traceable by torch.compile on GPUs, plain calls in the interpreter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple, Union

import torch

from .configs import INTERPRET


def launcher(kernel):
    """``kernel`` wrapped so that make_fx / torch.compile record it as a graph node.

    Under TRITON_INTERPRET=1 the kernel is a Python function that needs real data,
    so it is called directly (the ops are then registered opaque, see operators.py).
    """
    if INTERPRET:
        return kernel
    return torch.library.wrap_triton(kernel)


@dataclass
class Launch:
    """One kernel launch, described before it runs: :mod:`benchmarks.codegen` compiles the same arguments."""

    kernel: Any  # a triton.jit kernel, maybe wrapped by triton.autotune
    grid: Union[Tuple[int, ...], Callable[[Dict[str, Any]], Tuple[int, ...]]]
    args: Dict[str, Any]  # every kernel argument, by name
    out: Any  # what the caller gets back: the output tensor(s)

    def run(self) -> Any:
        launcher(self.kernel)[self.grid](**self.args)
        return self.out

    @staticmethod
    def run_all(launches: List["Launch"]) -> Any:
        """Runs the launches in order; the last one's output."""
        for launch in launches:
            out = launch.run()
        return out
