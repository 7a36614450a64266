"""One benchmark measurement: what runs (backend, loss, layout, mode) at which shape, and its work."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Dict, Tuple

# The losses a case can compute; each maps to macl_loss keyword arguments.
# "infonce" (alpha=0, reweight=False) is what inf-cl computes, so both compute the same loss.
LOSS_OPTIONS: Dict[str, Dict[str, object]] = {
    "macl": {},  # lightly's MACLLoss() defaults
    "infonce": {"alpha": 0.0, "reweight": False},
}
MODES = ("fwd", "fwd_bwd")
# MATH.md section 7: forward 2*M*C*D flops, forward + backward 8*M*C*D.
FLOPS_PER_MCD = {"fwd": 2, "fwd_bwd": 8}


@dataclass(frozen=True)
class Case:
    backend: str  # a fused backend name or a baseline of benchmarks.targets
    op: str  # a key of LOSS_OPTIONS
    layout: str  # MATH.md section 1
    mode: str  # "fwd" or "fwd_bwd"
    n: int  # pairs per batch
    d: int
    dtype: str  # a torch dtype name: "float32", "bfloat16", ...

    def series(self) -> Tuple:
        """Everything but N: the cases drawn as one line of a plot."""
        return (self.backend, self.op, self.layout, self.mode, self.d, self.dtype)

    def group(self) -> Tuple:
        """Everything but N and the backend: the cases of one table or plot."""
        return (self.op, self.layout, self.mode, self.d, self.dtype)

    def anchors_and_candidates(self) -> Tuple[int, int]:
        """(M, C) of MATH.md section 1."""
        if self.layout == "ntxent":
            return 2 * self.n, 2 * self.n
        if self.layout == "cross_sym":
            return 2 * self.n, self.n
        return self.n, self.n

    def flops(self) -> int:
        m, c = self.anchors_and_candidates()
        return FLOPS_PER_MCD[self.mode] * m * c * self.d

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Case":
        return cls(**json.loads(text))


def loss_kwargs(case: Case) -> Dict[str, object]:
    """The macl_loss keyword arguments (besides the backend) that compute this case's loss."""
    return {"layout": case.layout, **LOSS_OPTIONS[case.op]}
