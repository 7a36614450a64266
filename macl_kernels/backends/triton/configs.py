"""Tile shapes: autotuned per size class for tensor-core dots, one fixed shape otherwise.

The embedding width is not tuned: ``BLOCK_D`` is chosen on the host from D and
the dtype (one chunk up to ``MAX_ROW_BYTES`` per row on GPUs, wider embeddings
are walked in chunks), so each kernel is compiled for the widths actually used
and the autotuner only picks the anchor/candidate tile and the pipeline depth.

Compilation time is budgeted too (a GPU session has minutes): only tensor-core
dots (fp16, bf16, fp32 as TF32 or tf32x3) at sizes above ``SMALL_PROBLEM`` are
autotuned, over the configs the prune hook keeps. fp64 dots run on the FMA units
and, like small problems, use one 64 x 64 tile; the interpreter uses one tile as well.
The shape-derived flags (dot precision, one chunk or several, D a multiple of the
chunk) are ``triton.heuristics``.
"""

from __future__ import annotations

import os

import torch
import triton

MAX_BLOCK_D = 256  # widest embedding chunk held in one tile
MAX_GRADIENT_BLOCK_D = 128  # widest chunk of a gradient (fp32 accumulator) tile
# One operand row of a tile in shared memory: 256 bf16/fp16, 128 fp32 or 64 fp64 values, so that
# a 64 x BLOCK_D anchor tile and two stages of candidate tiles fit an A100's 164 KiB.
MAX_ROW_BYTES = 512
MIN_BLOCK_D = 64  # tl.dot needs >= 16; 64 lets every D <= 64 share one compiled kernel
SMALL_PROBLEM = 1 << 20  # M * C below this: one fixed tile, no autotuning (tests, tiny batches)
PROLOGUE_ROWS = 32  # rows per program of the normalization kernels


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read when triton.jit decorates)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRET = interpreting()


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# The interpreter pays per operation, not per element: big tiles are fastest.
INTERPRETER_CONFIG = _config(64, 64, 4, 1)
SMALL_CONFIG = _config(64, 64, 4, 2)

# Ampere (sm_80) and Hopper (sm_90) tensor cores: 64/128-row tiles, 2-3-stage pipelines for
# the streamed tiles. prune_configs drops those that cannot fit a block's shared memory or
# would spill (benchmarks/codegen.py checks both on the compiled kernels); the last one fits
# everywhere, so there is always a candidate.
GPU_CONFIGS = [
    _config(128, 64, 4, 3),
    _config(64, 128, 4, 3),
    _config(128, 128, 8, 3),
    _config(128, 64, 8, 2),
    SMALL_CONFIG,
]

TUNED_CONFIGS = [INTERPRETER_CONFIG] if INTERPRET else GPU_CONFIGS
FIXED_CONFIGS = [INTERPRETER_CONFIG] if INTERPRET else [SMALL_CONFIG]

# Row counts only bound row masks: not specializing them on divisibility by 16 saves a
# compilation per new batch size. D and the strides stay specialized: a D divisible by 16
# makes the column mask constant over 16 values, which vectorized loads and the
# cp.async pipelining of the streamed tiles need (checked in the sm_80/sm_90 PTX).
SIZES = ["M", "C", "ROWS_CLASS", "COLS_CLASS"]
ROW_COUNTS = ["N"]

# Autotuning is keyed by size class (the next power of two of the anchor and
# candidate counts), the embedding width and the dot precision, not by the exact sizes.
TUNING_KEY = ["ROWS_CLASS", "COLS_CLASS", "D", "TF32"]

# Flags derived from the launch's arguments (triton.heuristics): the dots' input precision,
# whether all of D fits one chunk, whether D needs no mask.
HEURISTICS = {
    "PRECISION": lambda args: dot_precision(args["x_ptr"].dtype, args["TF32"]),
    "SINGLE_CHUNK": lambda args: args["D"] <= args["BLOCK_D"],
    "EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0,
}

# Shared memory per block (opt-in maximum) by compute capability; others get the smallest.
SHARED_MEMORY = {80: 163 * 1024, 87: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
SMALLEST_SHARED_MEMORY = 99 * 1024
# Registers a thread may hold in tiles before the kernels spill (of 255), by the codegen report.
TILE_REGISTERS = 144


def dot_precision(dtype: torch.dtype, tf32: bool) -> str:
    """fp32 dots on tensor cores: TF32 when allowed, else the fp32-accurate three-pass tf32x3; fp64 on FMA units."""
    if dtype == torch.float32:
        return "tf32" if tf32 else "tf32x3"
    return "ieee"  # fp64; unused for fp16 / bf16


def shared_memory_limit() -> int:
    """The current CUDA target's shared memory per block (the one Triton compiles for)."""
    from triton.runtime import driver

    arch = driver.active.get_current_target().arch
    return SHARED_MEMORY.get(arch, SMALLEST_SHARED_MEMORY)


def tile_footprint(config: triton.Config, itemsize: int, width: int, resident: str, score_tiles: int) -> tuple:
    """(shared memory bytes, tile registers per thread) of a config, estimated before compiling.

    Shared memory: the resident tile (``resident``: "BLOCK_M" for the row-block kernels,
    "BLOCK_N" for the column pass), ``num_stages`` streamed tiles of the other side and,
    for the backward passes, the weight tile fed to the second dot.
    Registers: ``score_tiles`` fp32 score tiles live at once (0 for the forward's one, which
    has no output tile), plus the backward's fp32 output tile, spread over the threads.
    """
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    own, other = (block_m, block_n) if resident == "BLOCK_M" else (block_n, block_m)
    smem = itemsize * width * (own + config.num_stages * other)
    threads = 32 * config.num_warps
    regs = max(1, score_tiles) * block_m * block_n // threads
    if score_tiles:
        smem += itemsize * block_m * block_n
        regs += own * width // threads
    return smem, regs


def pruner(resident: str, score_tiles: int):
    """The autotuner's prune hook: the configs that fit this GPU's shared memory and the register budget.

    The backward passes also need one warpgroup (4 warps) per 64 resident rows: 8 warps
    on 64 rows spill in the column pass, 4 warps on 128 rows in the row pass (fp16,
    TF32). The budgets come from the codegen report.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        itemsize, width = args["x_ptr"].element_size(), args["BLOCK_D"]
        limit = shared_memory_limit()
        kept = []
        # Walking D in chunks keeps one more score tile live in the backward passes.
        chunked = args["D"] > width
        tiles = score_tiles + 1 if score_tiles and chunked else score_tiles
        for config in configs:
            smem, regs = tile_footprint(config, itemsize, width, resident, tiles)
            if chunked:  # the resident side is streamed chunk by chunk too (sm_80 report: 192 KiB)
                smem += itemsize * width * (config.num_stages - 1) * config.kwargs[resident]
            warps_per_row = config.num_warps / config.kwargs[resident]  # 4 or 8 warps on 64 or 128 rows
            crowded = score_tiles and warps_per_row != 1 / 16  # one warpgroup per 64 resident rows
            if smem <= limit and regs <= TILE_REGISTERS and not crowded:
                kept.append(config)
        return kept or [configs[-1]]

    return prune


def tuned(kernel, resident: str = "BLOCK_M", score_tiles: int = 0):
    """``kernel`` autotuned over the GPU configs that fit (see :func:`pruner`), with the shape-derived flags."""
    prune = None if INTERPRET else {"early_config_prune": pruner(resident, score_tiles)}  # no GPU to fit
    return triton.autotune(configs=TUNED_CONFIGS, key=TUNING_KEY, prune_configs_by=prune)(
        triton.heuristics(HEURISTICS)(kernel)
    )


def fixed(kernel):
    """``kernel`` with the one small-problem tile and the shape-derived flags."""
    return triton.autotune(configs=FIXED_CONFIGS, key=[])(triton.heuristics(HEURISTICS)(kernel))


def size_class(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def block_d(d: int, itemsize: int, gradient: bool = False) -> int:
    """The embedding chunk: all of D (rounded up to a power of two) when it fits in one tile.

    Kernels that hold a ``gradient`` tile in fp32 registers take chunks of at most
    ``MAX_GRADIENT_BLOCK_D`` on GPUs: wider ones spill (codegen report).
    """
    if INTERPRET:
        return max(MIN_BLOCK_D, min(triton.next_power_of_2(d), MAX_BLOCK_D))
    widest = min(MAX_BLOCK_D, MAX_ROW_BYTES // itemsize, MAX_GRADIENT_BLOCK_D if gradient else MAX_BLOCK_D)
    return max(MIN_BLOCK_D, min(triton.next_power_of_2(d), widest))


def autotuned(rows: int, cols: int, dtype: torch.dtype) -> bool:
    """Whether a problem gets the autotuned kernels (else the one fixed tile): tensor-core dots, big enough."""
    return dtype != torch.float64 and rows * cols >= SMALL_PROBLEM
