"""macl_kernels: the Model-Aware Contrastive Learning loss without the N x N matrix.

import macl_kernels as mk
loss = mk.macl_loss(z0, z1)                    # lightly's MACLLoss(), fused
loss, stats = mk.macl_loss(z0, z1, return_stats=True)
criterion = mk.MACLLoss(temperature=0.1, alpha=0.5, A_0=0.0)
"""

from ._config import MACLConfig
from ._stats import MACLStats
from .backends import available_backends, known_backends
from .grad_cache import GradCache
from .loss import MACLLoss, NTXentLoss, macl_loss, nt_xent_loss
from .memory_bank import MemoryBank

__version__ = "0.1.0"  # the one place the version is written (setup.py reads it)

__all__ = [
    "GradCache",
    "MACLConfig",
    "MACLLoss",
    "MACLStats",
    "MemoryBank",
    "NTXentLoss",
    "available_backends",
    "known_backends",
    "macl_loss",
    "nt_xent_loss",
]
