"""What the presets promise: the sizes and baselines of issue 5, in an order a short budget can cut."""

from benchmarks.presets import COMPILED_REFERENCE, INF_CL, LIGHTLY, REFERENCE, make_preset

FUSED = ["torch", "cpp"]


def _keys(preset):
    return {(c.backend, c.mode, c.n) for c in preset.cases}


def test_cpu_preset_covers_512_to_65536_and_the_headline_size():
    preset = make_preset("cpu", "cpu", FUSED)
    keys = _keys(preset)
    for backend in FUSED:
        assert {(backend, "fwd_bwd", n) for n in (512, 8192, 32768)} <= keys
    assert ("cpp", "fwd", 65536) in keys  # the fused kernel; the torch fallback's takes minutes there
    for baseline in (LIGHTLY, REFERENCE, COMPILED_REFERENCE):
        assert (baseline, "fwd_bwd", 8192) in keys
    assert preset.limits.headline_n == 8192 and all(c.d == 128 and c.dtype == "float32" for c in preset.cases)
    assert (preset.cases[-1].backend, preset.cases[-1].n) == ("torch", 32768)  # cut first


def test_every_series_runs_by_increasing_n():
    for name, device in (("cpu", "cpu"), ("gpu", "cuda"), ("tiny", "cpu")):
        seen = {}
        for case in make_preset(name, device, FUSED).cases:
            assert case.n > seen.get(case.series(), 0), (name, case)
            seen[case.series()] = case.n


def test_gpu_preset_has_both_dtypes_dims_modes_and_inf_cl():
    cases = make_preset("gpu", "cuda", ["torch", "triton"]).cases
    assert {c.dtype for c in cases} == {"bfloat16", "float32"} and {c.d for c in cases} == {128, 256}
    assert {c.mode for c in cases} == {"fwd", "fwd_bwd"} and max(c.n for c in cases) == 65536
    assert {c.layout for c in cases if c.backend == INF_CL} == {"cross_sym"}


def test_gpu_preset_measures_the_headline_first():
    """Issue 9: a cut-short GPU run still has bf16 D = 128 at 8192 and 32768 for every backend, then fp32, D = 256."""
    fused = ["torch", "triton", "cuda"]
    cases = make_preset("gpu", "cuda", fused).cases
    key = lambda c: (c.layout, c.mode, c.d, c.dtype)  # noqa: E731
    headline = [(c.backend, c.n) for c in cases[:12]]
    assert {key(c) for c in cases[:12]} == {("ntxent", "fwd_bwd", 128, "bfloat16")}
    assert set(headline) == {(b, n) for b in [*fused, LIGHTLY, REFERENCE, COMPILED_REFERENCE] for n in (8192, 32768)}
    assert {key(c) for c in cases[12:18]} == {("ntxent", "fwd_bwd", 128, "float32")}
    assert {key(c)[2] for c in cases[18:22]} == {256}
    assert make_preset("gpu", "cuda", fused).limits.headline_n == 32768
