"""Backend registry: which implementations exist, where they run, what ``auto`` picks.

``reference`` is the dense oracle (:mod:`.reference`); every other backend
implements :class:`.base.Backend` and registers itself here.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .base import Backend
from .compiled import CPP, CUDA
from .torch_chunked import TorchBackend
from .triton import TritonBackend

REFERENCE = "reference"

_REGISTRY: Dict[str, Backend] = {}

# What backend="auto" tries, in order, per device type; the first available wins.
# Names that are not registered (an extension that was not built) are skipped.
AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["triton", "cuda", "torch"],
    "cpu": ["cpp", "torch"],
}
AUTO_FALLBACK = "torch"


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


register(TorchBackend())
register(CPP)
register(CUDA)
register(TritonBackend())


def known_backends() -> List[str]:
    """Every name ``backend=`` accepts, built or not."""
    return ["auto", REFERENCE, *_REGISTRY]


def available_backends(device: torch.device | str = "cpu") -> List[str]:
    """The backends that can run on ``device`` right now (besides ``auto``)."""
    device = torch.device(device)
    usable = [name for name, b in _REGISTRY.items() if b.unavailable_reason(device) is None]
    return [REFERENCE, *usable]


def check_name(name) -> None:
    """Raise TypeError/ValueError unless ``name`` is a backend this package knows."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {known_backends()}, got {type(name).__name__}")
    if name not in known_backends():
        raise ValueError(f"unknown backend {name!r}: expected one of {known_backends()}")


def resolve(name: str, device: torch.device) -> Backend | str:
    """The backend to run for ``name`` on ``device``; ``"reference"`` stays a name.

    Unknown names raise ``ValueError``; a known backend that cannot run here raises
    ``RuntimeError`` with the reason and how to get it.
    """
    check_name(name)
    if name == REFERENCE:
        return REFERENCE
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, []):
            backend = _REGISTRY.get(candidate)
            if backend is not None and backend.unavailable_reason(device) is None:
                return backend
        return _REGISTRY[AUTO_FALLBACK]
    backend = _REGISTRY[name]
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason} (it runs on: {backend.devices})")
    return backend
