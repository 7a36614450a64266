"""The training demo: augmentations, k-NN, a short training run, the large-batch and the cached steps under a budget."""

import json

import pytest
import torch

from benchmarks import demo, demo_digits
from benchmarks.isolate import Outcome, run_isolated


def test_augment_shifts_by_at_most_one_pixel_with_zero_fill():
    image = torch.zeros(1, 8, 8)
    image[0, 3, 4] = 1.0
    shifted = demo_digits.augment(image.expand(64, 8, 8), torch.Generator().manual_seed(0), noise=0.0)
    rows, cols = (shifted == 1.0).nonzero()[:, 1], (shifted == 1.0).nonzero()[:, 2]
    assert shifted.sum() == 64  # the pixel moved, nothing else appeared
    assert set(rows.tolist()) == {2, 3, 4} and set(cols.tolist()) == {3, 4, 5}  # every shift drawn


def test_knn_accuracy():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    train_y = torch.tensor([0, 0, 1, 1])
    test_x = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert demo_digits.knn_accuracy(train_x, train_y, test_x, torch.tensor([0, 1]), k=1) == 1.0
    assert demo_digits.knn_accuracy(train_x, train_y, test_x, torch.tensor([1, 0]), k=1) == 0.0


def _small_data():
    train_x, train_y, test_x, test_y, perturbed = demo_digits.evaluation_data()
    return train_x[:128], train_y[:128], test_x[:64], test_y[:64], perturbed[:64]


@pytest.mark.parametrize("name", ["MACL", "NT-Xent"])
def test_training_records_every_epoch(name):
    history = demo_digits.train(demo_digits.losses("torch")[name], _small_data(), epochs=2, batch_size=32)
    assert len(history.loss) == len(history.alignment) == len(history.temperature) == 2
    assert len(history.knn_clean) == len(history.knn_perturbed) == 3  # before training, then per epoch
    assert all(torch.isfinite(torch.tensor(history.loss)))
    if name == "NT-Xent":
        assert history.temperature == pytest.approx([0.1, 0.1])
    else:  # tau = 0.1 * (1 + 0.5 * A) follows the alignment
        assert history.temperature == pytest.approx([0.1 * (1 + 0.5 * a) for a in history.alignment], rel=1e-5)


def test_same_seed_same_training():
    a = demo_digits.train(demo_digits.losses("torch")["MACL"], _small_data(), epochs=1, batch_size=32, seed=3)
    b = demo_digits.train(demo_digits.losses("torch")["MACL"], _small_data(), epochs=1, batch_size=32, seed=3)
    assert a == b


def test_paired_difference_and_its_95_percent_interval():
    # Differences 1, 2, 3: mean 2, standard deviation 1, t(0.975, 2 degrees of freedom) = 4.302653.
    d = demo_digits.paired_difference([1.5, 3.0, 3.5], [0.5, 1.0, 0.5])
    assert (d.mean, d.seeds) == (2.0, 3)
    assert (d.low, d.high) == pytest.approx((2 - 4.302653 / 3**0.5, 2 + 4.302653 / 3**0.5), rel=1e-6)
    assert not d.significant and "NOT significant" in d.describe()  # the interval reaches below 0
    assert demo_digits.paired_difference([0.8, 0.81, 0.79], [0.7, 0.7, 0.7]).significant
    single = demo_digits.paired_difference([0.8], [0.7])
    assert not single.significant and "no interval" in single.describe()


@pytest.mark.slow
def test_dense_loss_over_the_budget_is_oom():
    # lightly at batch 2048 needs several 4096 x 4096 float32 matrices (64 MiB each)
    payload = json.dumps({"loss": "dense", "batch": 2048, "budget_gib": 0.1, "steps": 1})
    outcome = run_isolated("benchmarks.demo_large_batch", [payload], timeout_s=120)
    assert outcome.status == "OOM", outcome


@pytest.mark.slow
def test_cached_step_over_the_budget_is_oom_and_within_it_runs():
    # Batch 2048 under a 41 MiB budget: the uncached conv step needs more (measured 2026-11-28: OOM), the cached
    # step with 256-pair chunks peaked at 7 MiB.
    outcomes = {}
    for chunk in (0, 256):
        payload = {"loss": "fused", "batch": 2048, "budget_gib": 0.04, "steps": 1, "encoder": "conv", "chunk": chunk}
        outcomes[chunk] = run_isolated("benchmarks.demo_large_batch", [json.dumps(payload)], timeout_s=120)
    assert outcomes[0].status == "OOM", outcomes[0]
    assert outcomes[256].status == "ok", outcomes[256]


def test_sweep_skips_a_variant_after_its_failure_and_reports_the_largest_batch(monkeypatch):
    calls = []

    def fake_run(module, args, timeout_s):
        payload = json.loads(args[0])
        calls.append((payload["chunk"], payload["batch"]))
        if payload["chunk"] == 0 and payload["batch"] >= 512:
            return Outcome("OOM", note="over")
        return Outcome("ok", {"step_s": 0.1, "peak_bytes": payload["batch"]})

    monkeypatch.setattr(demo, "run_isolated", fake_run)
    variants = [demo.Variant("uncached", "uncached", {"chunk": 0}), demo.Variant("cached", "cached", {"chunk": 64})]
    lines = []
    results = demo.sweep(variants, demo.doublings(256, 1024), 1.0, 10.0, log=lines.append)
    assert calls == [(0, 256), (64, 256), (0, 512), (64, 512), (64, 1024)]
    assert results[2]["uncached"]["status"] == "skipped" and "512" in results[2]["uncached"]["note"]
    assert demo.largest_batches(results, variants) == {"uncached": 256, "cached": 1024}
    assert demo.STEPS_NOTE in lines


def test_single_step_timings_are_marked(monkeypatch):
    """A time from one step (the largest batches) says so: it is no median."""
    monkeypatch.setattr(
        demo, "run_isolated", lambda module, args, timeout_s: Outcome("ok", {"step_s": 2.0, "peak_bytes": 1})
    )
    variant = demo.Variant("fused", "fused", {})
    lines = []
    results = demo.sweep([variant], [demo.LARGE_FROM // 2, demo.LARGE_FROM], 1.0, 10.0, log=lines.append)
    assert [r["fused"]["steps"] for r in results] == [demo.STEPS_SMALL, 1]
    assert "*" not in lines[-2] and "s*" in lines[-1]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--epochs", "1", "--seeds", "1", "--min-batch", "256", "--max-batch", "256"]
    args += ["--cache-min-batch", "128", "--cache-max-batch", "128", "--cache-chunk", "48", "--backend", "torch"]
    assert demo.main(args) == 0
    summary = (out / "summary.txt").read_text()
    assert "MACL" in summary and "NT-Xent" in summary and "k-NN" in summary
    assert "largest batch within the budget: uncached 128, GradCache, chunk 48 128" in summary
    saved = json.loads((out / "demo.json").read_text())
    results = saved["large_batch"]
    assert [r["batch"] for r in results] == [256]
    assert results[0]["fused"]["status"] == "ok" and results[0]["dense"]["status"] == "ok"
    cached = saved["grad_cache"]
    assert [r["batch"] for r in cached] == [128]
    assert cached[0]["uncached"]["status"] == "ok" and cached[0]["cached"]["status"] == "ok"
    assert saved["machine"]["date"] in summary.splitlines()[0]
    for plot in ("training.png", "large_batch.png", "grad_cache.png"):
        assert (out / plot).stat().st_size > 1000, plot
