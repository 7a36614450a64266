"""Large-size correctness and bitwise determinism of every fused backend: the smoke and gpu_check steps of
benchmarks/gpu_check.sh.

    python -m benchmarks.gpu_check --out DIR [--name NAME] [--tables DIR] [--device cuda|cpu]
                                   [--preset gpu|smoke|tiny] [--budget-s S]

For each size (``ntxent``, the default MACL settings) every fused backend on the
device computes the loss and both input gradients twice: the two runs must be
bitwise identical, and they are compared with the float64 dense reference where
its M x C matrices fit in memory, beyond that with the ``torch`` backend in
float64: each error is the largest relative error of a row
(``macl_kernels.testing.relative_error``), against MATH.md section 6's bounds. Writes DIR/NAME.csv (NAME: gpu_check by
default), rewritten after every case so that a run killed midway keeps what it measured,
and the markdown table NAME.md (in the --tables folder, DIR by default); prints the table,
and exits non-zero if any case fails. The ``smoke`` preset (one small and one large case,
bf16: a minute on a GPU, most of it the kernels' first compilation) comes first on the GPU,
so that a broken backend shows before the long steps, and the later steps find the compiled
kernels in Triton's cache.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence

import torch

from macl_kernels.testing import (
    TOLERANCE,
    bitwise_equal,
    fused_backends,
    loss_and_grads,
    make_views,
    reference_float64,
    relative_error,
)

# The float64 dense reference holds a few M x C matrices: up to 2^27 cells (1 GiB each).
REFERENCE_MAX_CELLS = 1 << 27
PRESETS: Dict[str, dict] = {
    "gpu": dict(sizes=[4096, 65536], dims=[128, 256], dtypes=[torch.bfloat16, torch.float32]),
    "smoke": dict(sizes=[256, 16384], dims=[128], dtypes=[torch.bfloat16]),
    "tiny": dict(sizes=[8, 40], dims=[16], dtypes=[torch.bfloat16, torch.float32]),
}
COLUMNS = ["backend", "n", "d", "dtype", "oracle", "loss_err", "dz0_err", "dz1_err", "tol", "deterministic", "seconds"]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder of NAME.csv")
    p.add_argument("--name", default="gpu_check", help="file names NAME.csv and NAME.md (default: gpu_check)")
    p.add_argument("--tables", help="folder of NAME.md (default: --out)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on cuda, tiny on cpu")
    p.add_argument("--budget-s", type=float, default=150.0, help="cases that would start later are skipped")
    return p.parse_args(argv)


def oracle(z0: torch.Tensor, z1: torch.Tensor):
    """(name, loss, grads) in float64: the dense reference if it fits, else the chunked torch backend."""
    m = 2 * z0.shape[0]
    if m * m <= REFERENCE_MAX_CELLS:
        return ("reference", *reference_float64(z0, z1))
    return ("torch float64", *loss_and_grads(z0.double(), z1.double(), backend="torch"))


def check(backend: str, z0, z1, truth) -> dict:
    name, ref_loss, ref_grads = truth
    started = time.perf_counter()
    first = loss_and_grads(z0, z1, backend=backend)
    second = loss_and_grads(z0, z1, backend=backend)
    if z0.is_cuda:
        torch.cuda.synchronize()
    return {
        "oracle": name,
        "loss_err": relative_error(first[0], ref_loss),
        "dz0_err": relative_error(first[1][0], ref_grads[0]),
        "dz1_err": relative_error(first[1][1], ref_grads[1]),
        "deterministic": bitwise_equal([first[0], *first[1]], [second[0], *second[1]]),
        "seconds": time.perf_counter() - started,
    }


def verdict(row: dict) -> str:
    if "note" in row:
        return row["note"]
    errors_ok = max(row["loss_err"], row["dz0_err"], row["dz1_err"]) <= row["tol"]
    return "ok" if errors_ok and row["deterministic"] else "FAIL"


def markdown(rows: List[dict], device_name: str, name: str = "gpu_check") -> str:
    lines = [
        f"### {name}: correctness against float64 and bitwise determinism on {device_name}",
        "",
        "| backend | N | D | dtype | oracle | loss err | dz0 err | dz1 err | tol | bitwise | s (2 runs) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "note" in r and "loss_err" not in r:
            lines.append(f"| {r['backend']} | {r['n']} | {r['d']} | {r['dtype']} | | | | | | | | {r['note']} |")
            continue
        lines.append(
            f"| {r['backend']} | {r['n']} | {r['d']} | {r['dtype']} | {r['oracle']} | {r['loss_err']:.2e} "
            f"| {r['dz0_err']:.2e} | {r['dz1_err']:.2e} | {r['tol']:g} | {'yes' if r['deterministic'] else 'NO'} "
            f"| {r['seconds']:.2f} | {verdict(r)} |"
        )
    return "\n".join(lines)


def write_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "verdict"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "verdict": verdict(r)} for r in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset or ("gpu" if args.device == "cuda" else "tiny")]
    tables = args.tables or args.out
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(tables, exist_ok=True)
    csv_path = os.path.join(args.out, f"{args.name}.csv")
    backends = fused_backends(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"backends on {args.device}: {backends}", flush=True)
    started = time.monotonic()
    rows: List[dict] = []
    # D = 128 first, bf16 first: if the time budget runs out, the headline cases have run.
    for d, dtype, n in itertools.product(preset["dims"], preset["dtypes"], preset["sizes"]):
        base = {"n": n, "d": d, "dtype": str(dtype).replace("torch.", ""), "tol": TOLERANCE[dtype]}
        if time.monotonic() - started > args.budget_s:
            rows += [{**base, "backend": b, "note": "skipped: time budget"} for b in backends]
            continue
        z0, z1, _ = make_views(n, d, dtype, seed=n + d, device=args.device)
        try:
            truth = oracle(z0, z1)
        except Exception as exc:
            traceback.print_exc()
            rows += [{**base, "backend": b, "note": f"no oracle: {type(exc).__name__}"} for b in backends]
            write_csv(rows, csv_path)
            continue
        for backend in backends:
            row = {**base, "backend": backend}
            try:
                row.update(check(backend, z0, z1, truth))
            except Exception as exc:  # one backend's failure must not hide the others' results
                traceback.print_exc()
                row["note"] = f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]}"
            rows.append(row)
            write_csv(rows, csv_path)  # after every case: a run killed midway keeps its rows
            print({k: row.get(k) for k in [*COLUMNS, "note"] if k in row}, flush=True)
        del z0, z1, truth
        if args.device == "cuda":
            torch.cuda.empty_cache()

    write_csv(rows, csv_path)
    table = markdown(rows, device_name, args.name)
    with open(os.path.join(tables, f"{args.name}.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    failed = [r for r in rows if verdict(r) == "FAIL" or verdict(r).startswith(("error", "no oracle"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
