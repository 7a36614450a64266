"""What a user would run instead of macl_kernels: the baselines of the benchmarks and tests."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType


def load_lightly_macl() -> ModuleType:
    """lightly's ``loss/macl_loss.py`` on its own, without importing the ``lightly`` package.

    ``import lightly`` pulls in torchvision; the loss module needs only torch, so it
    is loaded from lightly's installed files (``pip install --no-deps lightly==1.6.0``).
    """
    spec = importlib.util.find_spec("lightly")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lightly is not installed: pip install --no-deps lightly==1.6.0")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss", "macl_loss.py")
    module_spec = importlib.util.spec_from_file_location("lightly_macl_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
