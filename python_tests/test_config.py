"""Bad input fails before any compute, with an error naming the argument."""

import pytest
import torch

import macl_kernels as mk

Z = torch.randn(4, 3)


def views(n=4, d=3, **kw):
    return torch.randn(n, d, **kw), torch.randn(n, d, **kw)


@pytest.mark.parametrize(
    "z0, z1, kwargs, error, match",
    [
        (torch.randn(4), Z, {}, ValueError, "z0 must be 2-D"),
        (Z, torch.randn(4, 3, 1), {}, ValueError, "z1 must be 2-D"),
        (Z, torch.randn(5, 3), {}, ValueError, "same shape"),
        (torch.randn(0, 3), torch.randn(0, 3), {}, ValueError, "at least 1 row"),
        (torch.randn(4, 0), torch.randn(4, 0), {}, ValueError, "embedding dimension"),
        (torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long), {}, TypeError, "floating-point"),
        (Z, Z, {"temperature": 0.0}, ValueError, "temperature must be > 0"),
        (Z, Z, {"temperature": -0.1}, ValueError, "temperature must be > 0"),
        (Z, Z, {"temperature": float("nan")}, ValueError, "temperature must be finite"),
        (Z, Z, {"temperature": float("inf")}, ValueError, "temperature must be finite"),
        (Z, Z, {"temperature": "0.1"}, TypeError, "temperature must be a real number"),
        (Z, Z, {"temperature": True}, TypeError, "temperature must be a real number"),
        (Z, Z, {"alpha": float("nan")}, ValueError, "alpha must be finite"),
        (Z, Z, {"A_0": float("inf")}, ValueError, "A_0 must be finite"),
        (Z, Z, {"eps": -1e-8}, ValueError, "eps must be >= 0"),
        (Z, Z, {"min_temperature": 0.0}, ValueError, "min_temperature must be > 0"),
        (Z, Z, {"schedule": "cosine"}, ValueError, "unknown schedule"),
        (Z, Z, {"schedule": "exp", "alpha": 0.0}, ValueError, "alpha must be > 0 for schedule='exp'"),
        (Z, Z, {"layout": "simclr"}, ValueError, "unknown layout"),
        (Z, Z, {"reduction": "avg"}, ValueError, "unknown reduction"),
        (Z, Z, {"reduction": None}, TypeError, "reduction must be a string"),
        (Z, Z, {"backend": "fast"}, ValueError, "unknown backend"),
        (Z, Z, {"backend": 1}, TypeError, "backend must be a string"),
        (Z, Z, {"reweight": 1}, TypeError, "reweight must be a bool"),
        (Z, Z, {"return_stats": "yes"}, TypeError, "return_stats must be a bool"),
        (Z, Z, {"layout": "queue"}, ValueError, "needs negatives="),
        (Z, Z, {"layout": "queue", "negatives": torch.randn(5, 4)}, ValueError, "embedding width"),
        (Z, Z, {"layout": "queue", "negatives": torch.randn(0, 3)}, ValueError, "at least one row"),
        (Z, Z, {"layout": "queue", "negatives": torch.randn(5)}, ValueError, "negatives must be 2-D"),
        (Z, Z, {"negatives": torch.randn(5, 3, device="meta")}, ValueError, "negatives must be on the device"),
        (Z, Z, {"negatives": torch.randn(0, 3)}, ValueError, "at least one row"),
        (Z, Z, {"temperature": torch.tensor([0.1])}, ValueError, "temperature as a tensor must be 0-dim"),
        (Z, Z, {"temperature": torch.tensor(1)}, TypeError, "temperature as a tensor must have a floating-point"),
        (Z, Z, {"layout": "queue", "negatives": [[1.0, 2.0, 3.0]]}, TypeError, "negatives must be a torch.Tensor"),
        ([[1.0]], Z, {}, TypeError, "z0 must be a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(z0, z1, kwargs, error, match):
    with pytest.raises(error, match=match):
        mk.macl_loss(z0, z1, **kwargs)


def test_mismatched_devices_are_rejected():
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="same device"):
        mk.macl_loss(Z, meta)


def test_bad_settings_fail_at_module_construction():
    with pytest.raises(ValueError, match="temperature"):
        mk.MACLLoss(temperature=0)
    with pytest.raises(ValueError, match="unknown backend"):
        mk.MACLLoss(backend="nope")
    with pytest.raises(TypeError, match="NTXentLoss fixes alpha"):
        mk.NTXentLoss(alpha=0.5)
    with pytest.raises(TypeError, match="nt_xent_loss fixes reweight"):
        mk.nt_xent_loss(Z, Z, reweight=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tempreature'"):
        mk.MACLLoss(tempreature=0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mk.NTXentLoss(temperature=-1.0)  # lightly accepts it; it would turn the loss around


@pytest.mark.parametrize(
    "size, error, match",
    [
        ((0, 3), ValueError, "memory bank size must be an int K >= 1 or a pair"),
        ((4, 3, 2), ValueError, "memory bank size must be"),
        (-1, ValueError, "memory bank size must be"),
        ("64", TypeError, "memory bank size must be an int K or a \\(K, D\\) pair"),
        (True, TypeError, "memory bank size"),
    ],
)
def test_bad_memory_bank_sizes_fail_at_construction(size, error, match):
    with pytest.raises(error, match=match):
        mk.MemoryBank(size)
    with pytest.raises(error, match=match):
        mk.NTXentLoss(memory_bank_size=size)


def test_module_temperature_must_be_a_parameter_to_learn():
    with pytest.raises(TypeError, match="nn.Parameter"):
        mk.MACLLoss(temperature=torch.tensor(0.1, requires_grad=True))
    learnable = torch.nn.Parameter(torch.tensor(0.1))
    assert list(mk.MACLLoss(temperature=learnable).parameters()) == [learnable]
    fixed = mk.MACLLoss(temperature=torch.tensor(0.1))
    assert list(fixed.parameters()) == [] and "temperature" in dict(fixed.named_buffers())


def test_temperature_tensor_on_another_device_is_refused():
    """A CPU scalar works with inputs on any device; any other device is an error naming the temperature."""
    assert torch.isfinite(mk.macl_loss(Z, Z, temperature=torch.tensor(0.2)))
    with pytest.raises(ValueError, match="temperature as a tensor must be on the device of z0"):
        mk.macl_loss(Z, Z, temperature=torch.tensor(0.2, device="meta"))


def test_a_loss_with_a_bank_takes_no_other_negatives():
    criterion = mk.NTXentLoss(memory_bank_size=(8, 3))
    with pytest.raises(ValueError, match="memory bank"):
        criterion(Z, Z, torch.randn(5, 3))
    with pytest.raises(ValueError, match="width 3"):
        criterion(torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(TypeError, match="z1 must be a torch.Tensor"):
        criterion(Z, [[1.0, 2.0, 3.0]])


def test_checks_run_before_any_compute(monkeypatch):
    # A backend that fails loudly if reached: bad input must never get that far.
    from macl_kernels.backends.torch_chunked import TorchBackend

    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(TorchBackend, "negative_lse", boom)
    with pytest.raises(ValueError, match="negatives"):
        mk.macl_loss(Z, Z, layout="queue", backend="torch")
