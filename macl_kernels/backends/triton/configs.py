"""Tile shapes: autotuned per size class for tensor-core dots, one fixed shape otherwise.

The embedding width is not tuned: ``BLOCK_D`` is chosen on the host from D and
the dtype (one chunk up to ``MAX_ROW_BYTES`` per row on GPUs, wider embeddings
are walked in chunks), so each kernel is compiled for the widths actually used
and the autotuner only picks the anchor/candidate tile and the pipeline depth.

Compilation time is budgeted too (a GPU session has minutes): only tensor-core
dots (fp16, bf16, fp32 as TF32 or tf32x3) at sizes above ``SMALL_PROBLEM`` are
autotuned, over the configs the prune hook keeps. fp64 dots (DMMA) and small
problems use one tile: the small one, or the first tiny one that compiles clean
(the prune hook's table, :mod:`.verified`); the interpreter uses one tile as well.
The shape-derived flags (dot precision, one chunk or several, D a multiple of the
chunk) are ``triton.heuristics``.
"""

from __future__ import annotations

import os

import torch
import triton

from . import verified

MAX_BLOCK_D = 256  # widest embedding chunk held in one tile
MAX_GRADIENT_BLOCK_D = 128  # widest chunk of a gradient (fp32 accumulator) tile
MAX_SPLIT_BLOCK_D = 64  # widest chunk of tf32x3 dots, whose operands are split in registers (wider spilled)
# One operand row of a tile in shared memory: 256 bf16/fp16, 128 fp32 or 64 fp64 values, so that
# a 64 x BLOCK_D anchor tile and two stages of candidate tiles fit an A100's 164 KiB.
MAX_ROW_BYTES = 512
MIN_BLOCK_D = 64  # tl.dot needs >= 16; 64 lets every D <= 64 share one compiled kernel
SMALL_PROBLEM = 1 << 20  # M * C below this: one fixed tile, no autotuning (tests, tiny batches)
PROLOGUE_ROWS = 32  # rows per program of the normalization kernels
# The prologue's backward holds four tiles (u0, u1 and their upstream gradients) in the accumulation
# dtype: at most this many elements per tile by input itemsize, or it spilled (codegen report).
PROLOGUE_BACKWARD_ELEMENTS = {2: 4096, 4: 2048, 8: 512}


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
# the streamed tiles. The prune hook keeps those that compile without spilling and fit
# (see :func:`pruner`).
GPU_CONFIGS = [
    _config(128, 64, 4, 3),
    _config(64, 128, 4, 3),
    _config(128, 128, 8, 3),
    _config(128, 64, 8, 2),
    SMALL_CONFIG,
]
# Smaller tiles, in order, for a kernel none of the above (or, untuned, not the small one) runs
# without spilling: the fp32 (tf32x3) and fp64 gradient kernels.
TINY_CONFIGS = [_config(64, 32, 4, 2), _config(32, 64, 4, 2), _config(32, 32, 4, 2), _config(32, 16, 4, 2)]

GPU_TUNED_CONFIGS = GPU_CONFIGS + TINY_CONFIGS
GPU_FIXED_CONFIGS = [SMALL_CONFIG] + TINY_CONFIGS
TUNED_CONFIGS = [INTERPRETER_CONFIG] if INTERPRET else GPU_TUNED_CONFIGS
FIXED_CONFIGS = [INTERPRETER_CONFIG] if INTERPRET else GPU_FIXED_CONFIGS

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
# Registers a thread may hold in tiles before the kernels spill (of 255): the estimate used for
# targets the verified table does not cover.
TILE_REGISTERS = 144


def dot_precision(dtype: torch.dtype, tf32: bool) -> str:
    """fp32 dots on tensor cores: TF32 when allowed, else the fp32-accurate three-pass tf32x3; fp64 on FMA units."""
    if dtype == torch.float32:
        return "tf32" if tf32 else "tf32x3"
    return "ieee"  # fp64; unused for fp16 / bf16


def current_arch() -> int:
    """The compute capability Triton compiles for (e.g. 90), from its active driver."""
    from triton.runtime import driver

    return driver.active.get_current_target().arch


def shared_memory_limit(arch: int) -> int:
    return SHARED_MEMORY.get(arch, SMALLEST_SHARED_MEMORY)


def shape(config: triton.Config) -> tuple:
    """(BLOCK_M, BLOCK_N, warps, stages): how the verified table names a config."""
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def dtype_name(dtype: torch.dtype, tf32: bool) -> str:
    """bf16, fp16, tf32 (fp32 data, TF32 dots), fp32 (tf32x3 dots) or fp64."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
    return names.get(dtype, "tf32" if tf32 else "fp32")


def variant(stage: str, args: dict) -> str:
    """The compiled variant of a stage's kernel, from its constexpr flags (as the codegen report names them)."""
    if stage == "forward":
        name = "forward+product" if args.get("WITH_PRODUCT") else "forward"
        return name + (" online" if args.get("ONLINE") else "")
    if stage in ("backward", "columns") and not args.get("ONE_EXP", True):
        return stage + (" two-exp" if stage == "backward" else " two-factor")
    return stage


def table_key(stage: str, args: dict, arch: int) -> tuple:
    """(arch, variant, dtype, BLOCK_D, D walked in chunks): what a kernel's register use depends on."""
    return (
        arch,
        variant(stage, args),
        dtype_name(args["x_ptr"].dtype, args["TF32"]),
        args["BLOCK_D"],
        args["D"] > args["BLOCK_D"],
    )


def crowded(stage: str, config: triton.Config) -> bool:
    """8 warps on the column pass's 64 resident candidates: two warpgroups split its tiles, 2x the SASS."""
    return stage.startswith("columns") and config.num_warps * 16 != config.kwargs["BLOCK_N"]


def select(configs: list, usable, tuned: bool, stage: str = "") -> list:
    """The configs a kernel may run, of ``configs`` (in order) given which are ``usable``.

    Tuned: every usable GPU config (not a :func:`crowded` one if another is left), else the
    first usable tiny one; untuned: the first usable one. If none is usable, the last
    (smallest) config: the codegen report's ``--check`` fails then.
    """
    kept = [c for c in configs if usable(c)]
    if tuned:
        kept = [c for c in kept if c in GPU_CONFIGS and not crowded(stage, c)] or kept[:1]
    return kept[: None if tuned else 1] or [configs[-1]]


def estimated_fit(config: triton.Config, args: dict, arch: int, resident: str, score_tiles: int) -> bool:
    """Whether a config fits shared memory and a register budget, estimated before compiling.

    Used only for targets the verified table does not cover. Shared memory: the resident
    tile (``resident``: "BLOCK_M" for the row-block kernels, "BLOCK_N" for the column pass),
    ``num_stages`` streamed tiles of the other side (the resident side streamed too when D
    is walked in chunks) and, with ``score_tiles`` (the kernels with an output tile), the
    tile fed to the second dot. Registers: the score tiles (one more when D is chunked) and
    the output tile, spread over the threads; the output tiles need one warpgroup per 64
    resident rows.
    """
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    itemsize, width = args["x_ptr"].element_size(), args["BLOCK_D"]
    own, other = (block_m, block_n) if resident == "BLOCK_M" else (block_n, block_m)
    chunked = args["D"] > width
    smem = itemsize * width * (own + config.num_stages * other)
    if chunked:
        smem += itemsize * width * (config.num_stages - 1) * own
    threads = 32 * config.num_warps
    tiles = score_tiles + 1 if score_tiles and chunked else score_tiles
    words = 2 if args["x_ptr"].dtype == torch.float64 else 1
    regs = words * max(1, tiles) * block_m * block_n // threads
    if score_tiles:
        smem += itemsize * block_m * block_n
        regs += words * own * width // threads
        if config.num_warps * 16 != own:  # one warpgroup per 64 resident rows
            return False
    return smem <= shared_memory_limit(arch) and regs <= TILE_REGISTERS


def pruner(stage: str, resident: str, score_tiles: int, tuned: bool):
    """The autotuner's prune hook: the configs that compile without spilling and fit this GPU's shared memory.

    Which do is read from :mod:`.verified` (the codegen report compiled every config for
    sm_80 and sm_90: ``python -m benchmarks.codegen --all-configs --write-table``); other
    targets get :func:`estimated_fit`. ``make codegen`` checks the table still holds.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        arch = current_arch()
        clean = verified.CLEAN.get(table_key(stage, args, arch))
        if clean is None:
            return select(configs, lambda c: estimated_fit(c, args, arch, resident, score_tiles), tuned, stage)
        return select(configs, lambda c: shape(c) in clean, tuned, stage)

    return prune


def tuned(kernel, stage: str, resident: str = "BLOCK_M", score_tiles: int = 0):
    """``kernel`` autotuned over the GPU configs that fit (see :func:`pruner`), with the shape-derived flags."""
    prune = None if INTERPRET else {"early_config_prune": pruner(stage, resident, score_tiles, tuned=True)}
    return triton.autotune(configs=TUNED_CONFIGS, key=TUNING_KEY, prune_configs_by=prune)(
        triton.heuristics(HEURISTICS)(kernel)
    )


def fixed(kernel, stage: str, resident: str = "BLOCK_M", score_tiles: int = 0):
    """``kernel`` with one tile (the small one, else the first tiny one that fits) and the shape-derived flags.

    The autotuner never benchmarks a single config, and its cache is keyed by the arguments'
    dtypes, so each dtype keeps its tile.
    """
    prune = None if INTERPRET else {"early_config_prune": pruner(stage, resident, score_tiles, tuned=False)}
    return triton.autotune(configs=FIXED_CONFIGS, key=[], prune_configs_by=prune)(triton.heuristics(HEURISTICS)(kernel))


def size_class(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def block_d(d: int, itemsize: int, gradient: bool = False, split: bool = False) -> int:
    """The embedding chunk: all of D (rounded up to a power of two) when it fits in one tile.

    Kernels that hold a ``gradient`` tile in fp32 registers take chunks of at most
    ``MAX_GRADIENT_BLOCK_D`` on GPUs, and tf32x3 dots (``split``) of at most
    ``MAX_SPLIT_BLOCK_D``: wider ones spill (codegen report).
    """
    if INTERPRET:
        return max(MIN_BLOCK_D, min(triton.next_power_of_2(d), MAX_BLOCK_D))
    widest = min(MAX_BLOCK_D, MAX_ROW_BYTES // itemsize)
    if gradient:
        widest = min(widest, MAX_GRADIENT_BLOCK_D)
    if split:
        widest = min(widest, MAX_SPLIT_BLOCK_D)
    return max(MIN_BLOCK_D, min(triton.next_power_of_2(d), widest))


def chunk_of(x: torch.Tensor, tf32: bool, gradient: bool = False) -> int:
    """:func:`block_d` for the kernels reading ``x`` with the dots ``tf32`` implies."""
    split = dot_precision(x.dtype, tf32) == "tf32x3"
    return block_d(x.shape[1], x.element_size(), gradient=gradient, split=split)


def autotuned(rows: int, cols: int, dtype: torch.dtype) -> bool:
    """Whether a problem gets the autotuned kernels (else the one fixed tile): tensor-core dots, big enough."""
    return dtype != torch.float64 and rows * cols >= SMALL_PROBLEM
