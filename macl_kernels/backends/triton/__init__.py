"""Fused Triton kernels for the MACL loss (``backend="triton"``).

One module per kernel stage, in the spirit of Cut Cross-Entropy:

- :mod:`.prologue`: both views normalized and their positive cosines, and its backward;
- :mod:`.forward`: the online log-sum-exp over each anchor's negatives;
- :mod:`.backward`: the deterministic row pass (``dx``) and column pass (``dy``);
- :mod:`.helpers`: the shared ``tl.jit`` tile loads, dot and similarity tile;
- :mod:`.configs`: tile shapes and autotuning; :mod:`.launch`: host-side launch helpers;
- :mod:`.operators`: the ``torch.library`` operators (fake kernels, autograd);
- :mod:`.backend`: the :class:`TritonBackend` the registry uses.

Importing this package imports only :mod:`.backend`: triton and the kernel modules
come in when the backend is first asked for (see there).
"""

from .backend import TritonBackend

__all__ = ["TritonBackend"]
