#!/usr/bin/env bash
# The project's one GPU command: build, a smoke test, every test on the GPU, large-size correctness, timings.
#
#   bash benchmarks/gpu_check.sh OUTDIR             # on the GPU machine: system python3, no network
#   bash benchmarks/gpu_check.sh OUTDIR --dry-run   # the same steps on a CPU: TRITON_INTERPRET=1, tiny sizes
#
# Made for one short lease (benchmarks/RESULTS.md): OUTDIR may be the device tool's $OUT, which
# brings back at most 8 files, 2 folders deep, also when the command is killed. So OUTDIR only
# ever holds 7 files, each rewritten the moment its step (or, for the tables, its case) ends:
#   summary.txt       the machine, then one line per finished step, then the tables
#   logs.tar.gz       every step's log and markdown table so far (the logs themselves are in a work folder)
#   smoke.csv         one small and one large case per GPU backend (benchmarks.gpu_check --preset smoke)
#   gpu_check.csv     large-size correctness and bitwise determinism (benchmarks.gpu_check)
#   bench/results.csv, bench/results.md, bench/machine.json   the timings (benchmarks.run; no plots:
#                     `python -m benchmarks.report DIR` draws them from the CSV afterwards)
# Steps, in this order, each under its own time cap, none stopped by an earlier one's failure:
# machine, wheels (.whl/*.whl, carried: not preinstalled there, into /tmp/site), build
# (pip install -e .), smoke, conformance (the suite on the device), gpu_tests (gpu-marked
# tests), gpu_check, bench (the headline cases first: see benchmarks/presets.py). The bench
# gets what is left of GPU_CHECK_BUDGET_S (default 470 s: under 8 minutes), and is skipped if
# under 30 s are left. Worst case, every step at its cap (machine 30, wheels 20, build 150,
# smoke 60, conformance 90, gpu tests 50, gpu_check 50, each cap plus 10 s before SIGKILL): about
# 520 s, inside the device tool's 600 s per command. Exit status: 0 if every step passed. PYTHON overrides the interpreter (default: python3; .venv/bin/python for
# --dry-run); GPU_CHECK_WORK, the work folder of the logs (default: a new temporary folder).
set -u -o pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
DRY=0
case "${2:-}" in "") ;; --dry-run) DRY=1 ;; *) usage ;; esac
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || usage
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
WORK=${GPU_CHECK_WORK:-$(mktemp -d)}
mkdir -p "$WORK" || usage
SECONDS=0

if [ "$DRY" = 1 ]; then
    DEFAULT_PY=python3
    [ -x .venv/bin/python ] && DEFAULT_PY=.venv/bin/python
    PY=${PYTHON:-$DEFAULT_PY}
    export TRITON_INTERPRET=1  # before any import of triton: kernels run in its interpreter on CPU tensors
    DEVICE=cpu PRESET=tiny
    CONFORMANCE_ARGS=(-k "test_two_pairs_every_layout or test_statistics_match_reference")
    BENCH_ARGS=(--backends triton,reference --sizes 64 --layouts ntxent)
    SMOKE_PRESET=tiny
    CAPS=(0 60 60 30 60)
else
    PY=${PYTHON:-python3}
    DEVICE=cuda PRESET=gpu
    CONFORMANCE_ARGS=()
    BENCH_ARGS=()
    SMOKE_PRESET=smoke
    CAPS=(150 60 90 50 50)  # build, smoke, conformance, gpu tests, gpu_check; the benchmark gets the rest
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_BREAK_SYSTEM_PACKAGES=1  # the GPU machine's system python3 may be marked externally managed
export MAX_JOBS=${MAX_JOBS:-$(nproc)}  # parallel compilation of the C++/CUDA extension

SUMMARY=()
FAILED=0

# publish LINE...: append to OUT/summary.txt and repack the work folder into OUT/logs.tar.gz
# (written beside, then renamed: a kill never leaves half an archive).
publish() {
    printf '%s\n' "$@" >>"$OUT/summary.txt"
    tar -C "$WORK" -czf "$OUT/.logs.tar.gz" . && mv -f "$OUT/.logs.tar.gz" "$OUT/logs.tar.gz"
}

# record NAME OUTCOME: one line of the summary, kept for the end and published now.
record() {
    local line
    line=$(printf '%-12s %s' "$1" "$2")
    SUMMARY+=("$line")
    publish "$line"
}

# step NAME CAP_S COMMAND... : run COMMAND under a time cap, log to WORK/NAME.log, record the outcome.
step() {
    local name=$1 cap=$2 start=$SECONDS rc status
    shift 2
    echo "== $name (cap ${cap}s): $*"
    timeout --kill-after=10 "$cap" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${cap}s"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    tail -n 3 "$WORK/$name.log" | sed 's/^/   | /'
    record "$name" "$(printf '%-22s %4d s  (at %d s)  %s' "$status" $((SECONDS - start)) "$SECONDS" "$name.log")"
}

rm -f "$OUT/summary.txt"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  dry-run: $DRY  device: $DEVICE  python: $PY"
    timeout 30 "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__,
        "| triton", triton.__version__, "| cuda", torch.version.cuda)'
    command -v nvidia-smi >/dev/null && timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    command -v nvidia-smi >/dev/null && timeout 15 nvidia-smi
} >"$WORK/machine.log" 2>&1
cat "$WORK/machine.log"
publish "$(head -n 4 "$WORK/machine.log")" "" "steps (name, outcome, seconds, log in logs.tar.gz):"

if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 20 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ "$DRY" = 1 ]; then
    record build "skipped in --dry-run: the venv's editable install is used"
else
    step build "${CAPS[0]}" "$PY" -m pip install --no-build-isolation --no-deps -e .
fi

# The Triton backend needs no build: every step after it runs whatever the build gave.
step smoke "${CAPS[1]}" "$PY" -m benchmarks.gpu_check --device "$DEVICE" --preset "$SMOKE_PRESET" \
    --out "$OUT" --tables "$WORK" --name smoke --budget-s $((CAPS[1] - 20 > 10 ? CAPS[1] - 20 : 10))
MACL_TEST_DEVICE=$DEVICE step conformance "${CAPS[2]}" \
    "$PY" -m pytest python_tests/conformance -q -p no:cacheprovider "${CONFORMANCE_ARGS[@]}"
step gpu_tests "${CAPS[3]}" "$PY" -m pytest -m gpu python_tests -q -p no:cacheprovider
step gpu_check "${CAPS[4]}" "$PY" -m benchmarks.gpu_check --device "$DEVICE" --preset "$PRESET" \
    --out "$OUT" --tables "$WORK" --budget-s $((CAPS[4] - 30 > 10 ? CAPS[4] - 30 : 10))

# The benchmark gets what is left; its own sweep budget ends it before the cap, so results.md is
# written. It writes into OUT directly: results.csv grows after every case.
# If the earlier steps used up the budget, it is skipped rather than run past it. On its cap's
# SIGTERM it still writes its report of the cases so far.
BENCH_CAP=$((BUDGET_S - SECONDS - 10))
if [ "$BENCH_CAP" -lt 30 ]; then
    record bench "SKIPPED: ${SECONDS} s of the ${BUDGET_S} s budget used before it"
    FAILED=1
else
    BENCH_MINUTES=$(awk -v s="$BENCH_CAP" 'BEGIN { printf "%.1f", (s - 20) / 60 }')
    step bench "$BENCH_CAP" "$PY" -m benchmarks.run --device "$DEVICE" --preset "$PRESET" --out "$OUT/bench" \
        --max-minutes "$BENCH_MINUTES" --no-plots "${BENCH_ARGS[@]}"
fi

{
    echo
    echo "== summary ($SECONDS s; tables in $OUT, logs in $OUT/logs.tar.gz)"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    for table in smoke gpu_check; do
        [ -f "$WORK/$table.md" ] && cat "$WORK/$table.md" && echo
    done
    if [ -f "$OUT/bench/results.md" ]; then
        cat "$OUT/bench/results.md"
    else
        echo "no timing table: see bench.log in $OUT/logs.tar.gz"
    fi
} >"$WORK/tables.txt"
publish "" "$(cat "$WORK/tables.txt")"
cat "$WORK/tables.txt"
exit $FAILED
