"""The codegen report: what the GPU kernels compile to on sm_90 / sm_80, read without a GPU.

    python -m benchmarks.codegen --arch 90 [--arch 80] [--out DIR] [--check] [--subset all|check]
    python -m benchmarks.codegen --arch 90 --arch 80 --all-configs --out DIR   # then:
    python -m benchmarks.codegen --write-table macl_kernels/backends/triton/verified.py --from-csv DIR/codegen.csv

Triton kernels: every kernel launch (the fallback launches included) x every config the
autotuner may pick (after its prune hook) x dtype (bf16, fp16, fp32 with TF32 dots,
fp32 by default (tf32x3), fp64) x D class (64, 128, 256, 1024) x layout, compiled
ahead of time through the JIT's own path: the host code builds each launch's arguments
(``*_launches`` in macl_kernels/backends/triton) on meta tensors, and the autotuned
kernel's ``warmup`` compiles them while a stand-in Triton driver reports
``GPUTarget("cuda", arch, 32)``, so heuristics, the prune hook and the argument
specialization are exactly those of a launch. Compiled kernels are cached by Triton
under ``--cache`` (keyed by source, options and target), SASS analyses beside them.

The prune hook keeps the configs its table (macl_kernels/backends/triton/verified.py)
lists as compiling without spills and fitting. ``--all-configs`` compiles every
config instead (the GPU configs of the tuned kernels, then the tiny ones in order
until one is clean; the small config then the tiny ones for the untuned kernels),
marks in ``picked`` which the prune hook would keep, and ``--write-table`` turns such
CSVs into the table: regenerate it whenever a kernel changes (``make codegen``
fails when the table no longer holds).

CUDA extension: every kernel of the built ``macl_kernels/_C*.so`` (``cuobjdump``); its
loop columns are those of tools/cuda_inner_loops.py at D = 128 (:func:`cuda_loops`).

Per compiled kernel: ``mma`` (wgmma / mma.sync / fma, from the PTX or SASS),
``pipeline`` (tma / cp.async / none), registers and static shared memory
(``cuobjdump -res-usage``; Triton's dynamic shared memory from its metadata), spill
bytes (local-memory stores and loads in the SASS), ``fits`` (shared memory within
the architecture's per-block limit) and the innermost tile loop's SASS instructions
and MUFU operations per score element per thread (how the loop is found:
:mod:`benchmarks.sass`). ``--check`` exits 1 when a picked config spills or does not
fit; ``make codegen`` runs it on the ``check`` subset (bf16/fp16 D <= 256, TF32
D <= 128, sm_90). Writes ``codegen.csv`` and ``codegen.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from typing import Dict, Iterator, List, Optional

import torch

from . import sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block (A100, H100/H200)
DTYPES = {  # name: (torch dtype, TF32 dots)
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "tf32": (torch.float32, True),
    "fp32": (torch.float32, False),
    "fp64": (torch.float64, False),
}
D_CLASSES = (64, 128, 256, 1024)
LARGE_ROWS = 32768  # M = C of the autotuned kernels; the small problems use the fixed tile
SMALL_ROWS = 512
SUBSETS = {  # name: (arch -> None, dtype -> largest D)
    "all": ({80, 90}, {name: max(D_CLASSES) for name in DTYPES}),
    "check": ({90}, {"bf16": 256, "fp16": 256, "tf32": 128}),
}
COLUMNS = [
    "kernel",
    "layout",
    "arch",
    "dtype",
    "d",
    "block_m",
    "block_n",
    "block_d",
    "warps",
    "stages",
    "mma",
    "pipeline",
    "regs",
    "spill_bytes",
    "smem_bytes",
    "fits",
    "sass_per_element",
    "mufu_per_element",
    "sass_per_element_max",
    "picked",
    "top_opcodes",
]
# The CUDA kernels' loop columns are counted at this D by tools/cuda_inner_loops.py (see cuda_loops).
CUDA_LOOP_D = 128


def tool(name: str) -> str:
    """A CUDA binary tool: the one Triton ships, else CUDA_HOME's, else PATH's."""
    import triton.backends.nvidia as nvidia

    for folder in (os.path.join(os.path.dirname(nvidia.__file__), "bin"), os.path.join(_cuda_home(), "bin")):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found (Triton's nvidia backend ships it; or set CUDA_HOME)")
    return found


def _cuda_home() -> str:
    return os.environ.get("CUDA_HOME", "/usr/local/cuda")


def run_tool(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports one GPU target, launches nothing (only warmup is used)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"codegen-sm_{self.target.arch}"  # a key of the JIT's per-device caches

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


@contextlib.contextmanager
def target_driver(arch: int) -> Iterator[None]:
    from triton.runtime.driver import driver

    before = driver._active
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = before


def compile_launch(launch, arch: int, configs=None) -> list:
    """The CompiledKernel of every config the launch may run (those the prune hook keeps), or of ``configs``."""
    kernel = launch.kernel
    if configs is None or not hasattr(kernel, "configs"):  # a plain jit kernel has one config
        with target_driver(arch):
            compiled = kernel.warmup(grid=(1,), **launch.args)
        return compiled if isinstance(compiled, list) else [compiled]
    saved = kernel.configs, kernel.early_config_prune
    kernel.configs, kernel.early_config_prune = configs, None  # these configs exactly: no pruning
    try:
        with target_driver(arch):
            compiled = kernel.warmup(grid=(1,), **launch.args)
    finally:
        kernel.configs, kernel.early_config_prune = saved
    return compiled if isinstance(compiled, list) else [compiled]


def launches(dtype: torch.dtype, tf32: bool, d: int, rows: int) -> List[tuple]:
    """(stage, layout, Launch) of every Triton kernel launch for one problem, on meta tensors.

    The forward's repair launch and the backward passes' launches for a wide lse spread
    (macl_kernels/backends/triton) are kernels of their own: their rows are named by
    :func:`configs.variant` ("forward online", "backward two-exp", ...).
    """
    from macl_kernels._math import accumulation_dtype
    from macl_kernels.backends.triton import backward, forward, prologue

    acc = accumulation_dtype(dtype)
    meta = dict(device="meta")
    x = torch.empty(rows, d, dtype=dtype, **meta)
    excluded = torch.empty(rows, 2, dtype=torch.int32, **meta)
    tau = torch.empty((), dtype=acc, **meta)
    lse = torch.empty(rows, dtype=acc, **meta)
    grad = torch.empty(rows, dtype=acc, **meta)
    stages = [
        ("forward", "ntxent", forward.forward_launches(x, None, excluded, tau, tf32, product=False)),
        ("backward", "ntxent", backward.rows_launches(x, excluded, tau, lse, grad, tf32)),
        ("forward", "cross", forward.forward_launches(x, x, excluded, tau, tf32, product=True)),
        ("columns", "cross", backward.columns_launches(x, x, excluded, tau, lse, grad, tf32)),
    ]
    found = [(stage, layout, launch) for stage, layout, stage_launches in stages for launch in stage_launches]
    if not tf32:  # the prologue has no dots
        found.append(("normalize", "-", prologue.normalize_launch(x, x)))
        found.append(("normalize_backward", "-", prologue.normalize_backward_launch(x, x, lse, lse, x, x, grad)))
    return found


def kernel_name(stage: str, launch) -> str:
    from macl_kernels.backends.triton import configs

    return configs.variant(stage, launch.args) if stage in ("forward", "backward", "columns") else stage


def _constants(compiled) -> Dict[str, object]:
    names = compiled.src.fn.arg_names
    return {names[key[0]]: value for key, value in compiled.src.constants.items() if len(key) == 1}


def analyze_cubin(cubin: bytes, cache: str) -> dict:
    """SASS functions and resource usage of a cubin (cached by its hash)."""
    digest = hashlib.sha256(cubin).hexdigest()[:32]
    path = os.path.join(cache, "sass", digest + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cubin_path = path[: -len(".json")] + ".cubin"
    with open(cubin_path, "wb") as f:
        f.write(cubin)
    found = {"sass": run_tool(tool("cuobjdump"), "-sass", cubin_path)}
    found["res_usage"] = run_tool(tool("cuobjdump"), "-res-usage", cubin_path)
    os.remove(cubin_path)
    with open(path, "w") as f:
        json.dump(found, f)
    return found


def triton_row(kernel: str, layout: str, arch: int, dtype: str, d: int, compiled, cache: str) -> dict:
    consts = _constants(compiled)
    meta = compiled.metadata
    found = analyze_cubin(compiled.asm["cubin"], cache)
    (function,) = sass.parse_sass(found["sass"])
    (usage,) = sass.parse_res_usage(found["res_usage"])
    block_m, block_n = consts.get("BLOCK_M", ""), consts.get("BLOCK_N", "")
    block_d = consts.get("BLOCK_D", "")
    threads = 32 * meta.num_warps
    elements = block_m * block_n / threads if block_m and block_n else None
    trips = 1 if consts.get("SINGLE_CHUNK", True) else math.ceil(d / block_d)
    smem = max(meta.shared, usage["shared"])
    return {
        "kernel": kernel,
        "layout": layout,
        "arch": arch,
        "dtype": dtype,
        "d": d,
        "block_m": block_m,
        "block_n": block_n,
        "block_d": block_d,
        "warps": meta.num_warps,
        "stages": meta.num_stages,
        "mma": sass.mma_kind_of_ptx(compiled.asm["ptx"]),
        "pipeline": sass.pipeline_of_ptx(compiled.asm["ptx"]),
        "regs": usage["regs"],
        "spill_bytes": sass.spill_bytes(function),
        "smem_bytes": smem,
        "fits": "yes" if smem <= SMEM_PER_BLOCK[arch] else "no",
        **sass.per_element(sass.tile_loops(function, trips), elements),
        "picked": "yes",  # ``--all-configs`` sets it from what compiled clean
    }


def candidates(launch) -> tuple:
    """(configs to compile first, configs to try in order until one is clean) for ``--all-configs``."""
    from macl_kernels.backends.triton import configs

    if launch.kernel.configs == configs.GPU_TUNED_CONFIGS:
        return configs.GPU_CONFIGS, configs.TINY_CONFIGS
    return [], configs.GPU_FIXED_CONFIGS


def clean(row: dict) -> bool:
    return int(row["spill_bytes"]) == 0 and row["fits"] == "yes"


def triton_rows(
    archs: List[int], subset: Dict[str, int], widths, cache: str, log, all_configs: bool = False
) -> List[dict]:
    """One row per compiled kernel: the configs the prune hook keeps or, ``all_configs``, every config tried.

    ``all_configs`` compiles every tuned GPU config, then the tiny ones in order until one is
    clean (untuned kernels: the small config, then the tiny ones); the rows get ``picked``
    from :func:`configs.select` over what compiled clean, as the prune hook would with the
    table written from them.
    """
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    cases = [
        (arch, name, d, problem)
        for arch in archs
        for name, largest in subset.items()
        for d in widths
        if d <= largest
        for problem in (LARGE_ROWS, SMALL_ROWS)
    ]
    rows, seen = [], set()
    for arch, name, d, problem in cases:
        dtype, tf32 = DTYPES[name]
        for stage, layout, launch in launches(dtype, tf32, d, problem):
            kernel = kernel_name(stage, launch)
            started = time.time()
            if all_configs and stage in ("forward", "backward", "columns"):
                compiled = configs_tried(launch, arch, cache)
            else:
                compiled = compile_launch(launch, arch)
            for one in compiled:
                row = triton_row(kernel, layout, arch, name, d, one, cache)
                key = (kernel, layout, arch, name, d, row["block_m"], row["block_n"], row["warps"], row["stages"])
                if key not in seen:  # the small problem's tile is often one of the tuned ones
                    seen.add(key)
                    rows.append(row)
            log(f"sm_{arch} {name} D={d} {kernel} {layout} rows={problem}: {time.time() - started:.1f} s")
    if all_configs:
        mark_picked(rows)
    return rows


def configs_tried(launch, arch: int, cache: str) -> list:
    """The CompiledKernel of every config ``--all-configs`` compiles for one launch (see :func:`triton_rows`)."""
    first, in_order = candidates(launch)
    found = [compiled for config in first for compiled in compile_launch(launch, arch, [config])]
    if not any(spill_free(compiled, arch, cache) for compiled in found):
        for config in in_order:
            found += compile_launch(launch, arch, [config])
            if spill_free(found[-1], arch, cache):
                break
    return found


def spill_free(compiled, arch: int, cache: str) -> bool:
    """No spills and shared memory within the block limit, as the report's row says."""
    found = analyze_cubin(compiled.asm["cubin"], cache)
    (function,) = sass.parse_sass(found["sass"])
    (usage,) = sass.parse_res_usage(found["res_usage"])
    smem = max(compiled.metadata.shared, usage["shared"])
    return sass.spill_bytes(function) == 0 and smem <= SMEM_PER_BLOCK[arch]


def mark_picked(rows: List[dict]) -> None:
    """The ``picked`` column of ``--all-configs`` rows: what the prune hook keeps given the clean ones."""
    from macl_kernels.backends.triton import configs

    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        if row["block_m"] != "":  # the prologue's kernels have one fixed config
            groups.setdefault(tuple(row[c] for c in ("kernel", "layout", "arch", "dtype", "d")), []).append(row)
    for members in groups.values():
        by_shape = {tuple(int(r[c]) for c in ("block_m", "block_n", "warps", "stages")): r for r in members}
        clean_shapes = {shape for shape, row in by_shape.items() if clean(row)}

        def usable(config, clean_shapes=clean_shapes):
            return configs.shape(config) in clean_shapes

        # Every variant runs untuned (small problems, fallbacks); those with more GPU configs also tuned.
        picked = {configs.shape(c) for c in configs.select(configs.GPU_FIXED_CONFIGS, usable, tuned=False)}
        if any(configs.shape(c) in by_shape for c in configs.GPU_CONFIGS if c is not configs.SMALL_CONFIG):
            chosen = configs.select(configs.GPU_TUNED_CONFIGS, usable, tuned=True, stage=members[0]["kernel"])
            picked |= {configs.shape(c) for c in chosen}
        for shape, row in by_shape.items():
            row["picked"] = "yes" if shape in picked else "no"


def verified_table(rows: List[dict]) -> Dict[tuple, tuple]:
    """The prune hook's table (macl_kernels/backends/triton/verified.py) from ``--all-configs`` rows."""
    table: Dict[tuple, set] = {}
    for row in rows:
        if row["block_m"] == "":  # the prologue's and the CUDA extension's kernels: not pruned
            continue
        arch, d, block_d = int(row["arch"]), int(row["d"]), int(row["block_d"])
        key = (arch, row["kernel"], row["dtype"], block_d, d > block_d)
        shapes = table.setdefault(key, set())
        if clean(row):
            shapes.add((int(row["block_m"]), int(row["block_n"]), int(row["warps"]), int(row["stages"])))
    return {key: tuple(sorted(shapes, reverse=True)) for key, shapes in sorted(table.items())}


def write_table(table: Dict[tuple, tuple], path: str, command: str) -> None:
    import triton

    lines = [
        '"""The configs that compile without spilling and fit, per target: the prune hook\'s table (configs.pruner).',
        "",
        "Generated by",
        *textwrap.wrap(f"``{command}``", 110, break_long_words=False, break_on_hyphens=False),
        f"(triton {triton.__version__}, {time.strftime('%Y-%m-%d')}); do not edit.",
        "Key: (arch, kernel variant, dtype, BLOCK_D, D walked in chunks); value: (BLOCK_M, BLOCK_N, warps, stages).",
        '"""',
        "",
        f'TRITON = "{triton.__version__}"',
        "CLEAN: dict = {",
    ]
    for key, shapes in table.items():
        name = ", ".join(f'"{part}"' if isinstance(part, str) else str(part) for part in key)
        value = f"({shapes[0]},)" if len(shapes) == 1 else f"({', '.join(map(str, shapes))})"
        line = f"    ({name}): {value},"
        if len(line) <= 120:
            lines.append(line)
        else:  # as ruff formats it: one config per line
            lines += [f"    ({name}): ("] + [f"        {shape}," for shape in shapes] + ["    ),"]
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


CUDA_TYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "double": "fp64"}
# (negative_lse_symmetric_grad<In, true | false>: one exp per score, or two: "..._two_exp" as
# tools/cuda_inner_loops.py names it.)
CUDA_NAME = re.compile(r"(?P<kernel>negative_lse_\w+)<(?P<input>[\w:]+)(?:, (?P<variant>true|false))?>")


def cuda_kernel_of(parsed) -> str:
    """The kernel's name in the report (and in tools/cuda_inner_loops.py's counts) from a CUDA_NAME match."""
    return parsed["kernel"] + ("_two_exp" if parsed["variant"] == "false" else "")


def demangle(names: List[str]) -> List[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def cuda_loops(arch: int, log) -> Dict[tuple, dict]:
    """The loop columns of the CUDA kernels, per (kernel, input type): {} where they cannot be counted.

    tools/cuda_inner_loops.py compiles csrc/cuda with the rare paths (masked tiles, the
    chunked layout, the forward's repair) replaced by traps and counts what a thread executes
    per streamed tile at D = CUDA_LOOP_D, each nested loop (the k loop, the cp.async copies,
    the gradient product) times its trips, over the score elements it holds per tile (its
    TILES and FORWARD_TILES: 32 for fp16, bf16 and fp32, 64 in the fp16/bf16 forward, 16 for
    fp64, as csrc/cuda/negative_lse_kernels.cu's header says).
    The extension's own loop, counted statically as the Triton kernels' are, would mislead:
    its body also holds the rare paths, and its nested loops would count once.
    """
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import cuda_inner_loops

    try:
        counts = cuda_inner_loops.measure(str(arch), CUDA_LOOP_D)
    except (OSError, subprocess.CalledProcessError, SystemExit) as error:  # no nvcc, or a loop it cannot read
        log(f"CUDA loop columns left empty for sm_{arch}: {error}")
        return {}
    return {
        key: {
            "d": CUDA_LOOP_D,
            "sass_per_element": round(c["instructions"] / c["elements"], 2),
            "mufu_per_element": round(c["MUFU"] / c["elements"], 3),
            "sass_per_element_max": "",
            "top_opcodes": f"common path: {c['instructions']:.0f} instructions / {c['elements']} elements per tile",
        }
        for key, c in counts.items()
    }


def cuda_rows(library: str, archs: List[int], log=print) -> List[dict]:
    """One row per kernel and architecture of the CUDA extension's shared library."""
    loops = {arch: cuda_loops(arch, log) for arch in archs}
    functions = sass.parse_sass(run_tool(tool("cuobjdump"), "-sass", library))
    usage = {
        (u["name"], u["arch"]): u for u in sass.parse_res_usage(run_tool(tool("cuobjdump"), "-res-usage", library))
    }
    readable = demangle([f.name for f in functions])
    rows = []
    for function, name in zip(functions, readable):
        arch = int(re.sub(r"\D", "", function.arch))
        if arch not in archs or not function.instructions:
            continue
        parsed = CUDA_NAME.search(name)
        kernel = cuda_kernel_of(parsed) if parsed else name
        dtype = CUDA_TYPES.get(parsed["input"], parsed["input"]) if parsed else ""
        res = usage.get((function.name, function.arch), {})
        smem = res.get("shared", "")
        empty = {"d": "", "sass_per_element": "", "mufu_per_element": "", "sass_per_element_max": "", "top_opcodes": ""}
        columns = loops[arch].get((kernel, parsed["input"] if parsed else ""), empty)
        rows.append(
            {
                "kernel": f"cuda:{kernel}",
                "layout": "-",
                "arch": arch,
                "dtype": dtype,
                "block_m": "",
                "block_n": "",
                "block_d": "",
                "warps": "",
                "stages": "",
                "mma": sass.mma_kind_of_sass(function),
                "pipeline": sass.pipeline_of_sass(function),
                "regs": res.get("regs", ""),
                "spill_bytes": sass.spill_bytes(function),
                "smem_bytes": smem,
                "fits": "" if smem == "" else ("yes" if smem <= SMEM_PER_BLOCK[arch] else "no"),
                **columns,
                "picked": "yes",
            }
        )
    return rows


def problems(rows: List[dict]) -> List[str]:
    """What --check fails on: a config the kernels may pick that spills, or needs shared memory over the block limit."""
    found = []
    for row in rows:
        if row.get("picked") == "no":  # --all-configs: compiled, but the prune hook does not keep it
            continue
        where = f"{row['kernel']} {row['layout']} sm_{row['arch']} {row['dtype']} D={row['d']} "
        where += f"{row['block_m']}x{row['block_n']} w{row['warps']} s{row['stages']}"
        if int(row["spill_bytes"] or 0):
            found.append(f"{where}: {row['spill_bytes']} spill bytes")
        if row["fits"] == "no":
            found.append(f"{where}: {row['smem_bytes']} B of shared memory > {SMEM_PER_BLOCK[int(row['arch'])]}")
    return found


def write_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown(rows: List[dict], header: str) -> str:
    shown = [c for c in COLUMNS if c != "top_opcodes"]
    lines = [header, "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in shown) + " |")
    return "\n".join(lines) + "\n"


def _number(value) -> Optional[float]:
    return float(value) if value not in ("", None) else None


def summary(rows: List[dict]) -> Dict[tuple, dict]:
    """Per (kernel, layout, arch, dtype, d): configs, the best interior loop, worst spills, whether all fit."""
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row[c]) for c in ("kernel", "layout", "arch", "dtype", "d")), []).append(row)
    found = {}
    for key, members in groups.items():
        loops = [(_number(r["sass_per_element"]), _number(r["mufu_per_element"])) for r in members]
        loops = [loop for loop in loops if loop[0] is not None]
        best = min(loops) if loops else (None, None)
        found[key] = {
            "configs": len(members),
            "sass": best[0],
            "sass_worst": max(loops)[0] if loops else None,
            "mufu": best[1],
            "spill": max(int(r["spill_bytes"]) for r in members),
            "fits": all(r["fits"] != "no" for r in members),
        }
    return found


def comparison(before: List[dict], after: List[dict]) -> str:
    """A markdown table: per kernel and case, before and after.

    Each cell: SASS per element of the interior loop, best-worst over the pickable
    configs (the best one's MUFU per element), the worst config's spill bytes, whether
    all fit, how many configs.
    """

    def cell(entry: Optional[dict]) -> str:
        if entry is None:
            return "-"
        worst = "" if entry["sass_worst"] == entry["sass"] else f"-{entry['sass_worst']:g}"
        loop = "" if entry["sass"] is None else f"{entry['sass']:g}{worst} ({entry['mufu']:g} MUFU), "
        fits = "" if entry["fits"] else ", **does not fit**"
        return f"{loop}{entry['spill']} B spilled{fits}, {entry['configs']} cfg"

    old, new = summary(before), summary(after)
    lines = [
        "| kernel | layout | arch | dtype | D | before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in sorted(set(old) | set(new), key=lambda k: (k[2], k[3], int(k[4] or 0), k[1], k[0])):
        lines.append("| " + " | ".join(key) + f" | {cell(old.get(key))} | {cell(new.get(key))} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_PER_BLOCK), help="default: 90")
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "codegen"))
    parser.add_argument("--cache", default=os.path.join(ROOT, "build", "codegen-cache"))
    parser.add_argument("--subset", choices=sorted(SUBSETS), default="all")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="only these dtypes")
    parser.add_argument("--d", type=int, action="append", choices=D_CLASSES, help="only these D classes")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension's kernels")
    parser.add_argument("--check", action="store_true", help="exit 1 if a kernel spills or does not fit")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE_CSV", "AFTER_CSV"), help="only write compare.md")
    parser.add_argument(
        "--all-configs", action="store_true", help="compile every config, not only those the prune hook keeps"
    )
    parser.add_argument("--write-table", metavar="PATH", help="write the prune hook's table (with --all-configs)")
    parser.add_argument("--from-csv", nargs="+", metavar="CSV", help="write the table from these --all-configs CSVs")
    args = parser.parse_args(argv)
    if args.write_table and args.from_csv:
        command = f"python -m benchmarks.codegen {' '.join(argv if argv is not None else sys.argv[1:])}"
        write_table(
            verified_table([row for path in args.from_csv for row in read_csv(path)]), args.write_table, command
        )
        return 0
    if args.compare:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compare.md"), "w") as f:
            f.write(comparison(*(read_csv(path) for path in args.compare)))
        return 0
    if "macl_kernels.backends.triton" in sys.modules:
        raise RuntimeError("run benchmarks.codegen in its own process: the kernels must not be interpreted")
    os.environ["TRITON_INTERPRET"] = "0"  # read when triton.jit decorates the kernels, on their import

    subset_archs, subset = SUBSETS[args.subset]
    archs = sorted(a for a in (args.arch or [90]) if a in subset_archs)
    if args.dtype:
        subset = {name: largest for name, largest in subset.items() if name in args.dtype}
    started = time.time()
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    rows = triton_rows(archs, subset, args.d or D_CLASSES, args.cache, log, all_configs=args.all_configs)
    command = f"python -m benchmarks.codegen {' '.join(argv if argv is not None else sys.argv[1:])}"
    if args.write_table:
        write_table(verified_table(rows), args.write_table, command)
    libraries = sorted(glob.glob(os.path.join(ROOT, "macl_kernels", "_C*.so")))
    if not args.no_cuda and libraries:
        rows += [r for r in cuda_rows(libraries[0], archs, log) if r["dtype"] in subset]
    os.makedirs(args.out, exist_ok=True)
    write_csv(rows, os.path.join(args.out, "codegen.csv"))
    import triton

    header = (
        f"# Codegen report\n\n`{command}`"
        f" (triton {triton.__version__}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
        f"{time.time() - started:.0f} s). Columns: benchmarks/codegen.py."
    )
    with open(os.path.join(args.out, "codegen.md"), "w") as f:
        f.write(markdown(rows, header))
    print(f"{len(rows)} kernels in {time.time() - started:.0f} s -> {args.out}/codegen.csv, codegen.md")
    found = problems(rows)
    for line in found:
        print("FAIL", line)
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
