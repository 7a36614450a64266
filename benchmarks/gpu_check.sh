#!/usr/bin/env bash
# The project's one GPU command: build, every test on the GPU, large-size correctness, the timing table.
#
#   bash benchmarks/gpu_check.sh OUTDIR             # on the GPU machine: system python3, no network
#   bash benchmarks/gpu_check.sh OUTDIR --dry-run   # the same steps on a CPU: TRITON_INTERPRET=1, tiny sizes
#
# Wheels carried in .whl/ (lightly, inf-cl: not preinstalled there) are installed into /tmp/site
# first. Steps: build (pip install -e .), conformance suite on the device, gpu-marked tests,
# benchmarks.gpu_check (large sizes vs the reference, bitwise determinism), benchmarks.run (timings).
# Each step logs to OUTDIR/<step>.log and has a time cap, so even the worst case stays under
# GPU_CHECK_BUDGET_S (default 560 s, inside the device tool's 600 s per command); a failing step
# does not stop the next. The summary, the correctness table and, last, the timing table are
# printed at the end. Exit status: 0 if every step passed. PYTHON overrides the interpreter
# (default: python3; .venv/bin/python for --dry-run).
set -u -o pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
DRY=0
case "${2:-}" in "") ;; --dry-run) DRY=1 ;; *) usage ;; esac
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || usage
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
BUDGET_S=${GPU_CHECK_BUDGET_S:-560}
SECONDS=0

if [ "$DRY" = 1 ]; then
    DEFAULT_PY=python3
    [ -x .venv/bin/python ] && DEFAULT_PY=.venv/bin/python
    PY=${PYTHON:-$DEFAULT_PY}
    export TRITON_INTERPRET=1  # before any import of triton: kernels run in its interpreter on CPU tensors
    DEVICE=cpu PRESET=tiny
    CONFORMANCE_ARGS=(-k "test_two_pairs_every_layout or test_statistics_match_reference")
    BENCH_ARGS=(--backends triton,reference --sizes 64 --layouts ntxent)
    CAPS=(0 60 30 60)
else
    PY=${PYTHON:-python3}
    DEVICE=cuda PRESET=gpu
    CONFORMANCE_ARGS=()
    BENCH_ARGS=()
    CAPS=(150 170 80 80)  # build, conformance, gpu tests, gpu_check; the benchmark gets the rest
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_BREAK_SYSTEM_PACKAGES=1  # the GPU machine's system python3 may be marked externally managed
export MAX_JOBS=${MAX_JOBS:-$(nproc)}  # parallel compilation of the C++/CUDA extension

SUMMARY=()
FAILED=0

# step NAME CAP_S COMMAND... : run COMMAND under a time cap, log to OUT/NAME.log, record the outcome.
step() {
    local name=$1 cap=$2 start=$SECONDS rc status
    shift 2
    echo "== $name (cap ${cap}s): $*"
    timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${cap}s"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
    SUMMARY+=("$(printf '%-12s %-22s %4d s  %s' "$name" "$status" $((SECONDS - start)) "$OUT/$name.log")")
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  dry-run: $DRY  device: $DEVICE  python: $PY"
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__,
        "| triton", triton.__version__, "| cuda", torch.version.cuda)'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} >"$OUT/machine.log" 2>&1
cat "$OUT/machine.log"

if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 60 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ "$DRY" = 1 ]; then
    SUMMARY+=("$(printf '%-12s %s' build "skipped in --dry-run: the venv's editable install is used")")
else
    step build "${CAPS[0]}" "$PY" -m pip install --no-build-isolation --no-deps -e .
fi

MACL_TEST_DEVICE=$DEVICE step conformance "${CAPS[1]}" \
    "$PY" -m pytest python_tests/conformance -q -p no:cacheprovider "${CONFORMANCE_ARGS[@]}"
step gpu_tests "${CAPS[2]}" "$PY" -m pytest -m gpu python_tests -q -p no:cacheprovider
step gpu_check "${CAPS[3]}" "$PY" -m benchmarks.gpu_check --device "$DEVICE" --preset "$PRESET" --out "$OUT" \
    --budget-s $((CAPS[3] - 40 > 10 ? CAPS[3] - 40 : 10))

# The benchmark gets what is left; its own sweep budget ends it before the cap, so results.md is written.
BENCH_CAP=$((BUDGET_S - SECONDS - 10))
[ "$BENCH_CAP" -lt 90 ] && BENCH_CAP=90
BENCH_MINUTES=$(awk -v s="$BENCH_CAP" 'BEGIN { printf "%.1f", (s - 40) / 60 }')
step bench "$BENCH_CAP" "$PY" -m benchmarks.run --device "$DEVICE" --preset "$PRESET" --out "$OUT/bench" \
    --max-minutes "$BENCH_MINUTES" "${BENCH_ARGS[@]}"

echo
echo "== summary ($SECONDS s, logs and tables in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
echo
[ -f "$OUT/gpu_check.md" ] && cat "$OUT/gpu_check.md" && echo
if [ -f "$OUT/bench/results.md" ]; then
    cat "$OUT/bench/results.md"
else
    echo "no timing table: see $OUT/bench.log"
fi
exit $FAILED
