"""Tile shapes: autotuned per size class for tensor-core dots, one fixed shape otherwise.

The embedding width is not tuned: ``BLOCK_D`` is chosen on the host from D and
the dtype (one chunk up to ``MAX_ROW_BYTES`` per row on GPUs, wider embeddings
are walked in chunks), so each kernel is compiled for the widths actually used
and the autotuner only picks the anchor/candidate tile and the pipeline depth.

Compilation time is budgeted too (a GPU session has minutes): only tensor-core
dots (fp16, bf16, fp32 with TF32) at sizes above ``SMALL_PROBLEM`` are
autotuned, over four configs. IEEE fp32 and fp64 dots run on the FMA units,
where a 128-row tile takes a minute to compile and gains little, so they and
small problems use one 64 x 64 tile; the interpreter uses one tile as well.
"""

from __future__ import annotations

import os

import torch
import triton

MAX_BLOCK_D = 256  # widest embedding chunk held in one tile
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

# Ampere (sm_80) and Hopper (sm_90) tensor cores: 64/128-row tiles, 3-stage pipelines for
# the streamed tiles. A config that does not fit in shared memory for a given BLOCK_D
# (128 x 128 at D = 256) fails at its first launch and is skipped by the autotuner; the
# last one fits everywhere (<= 160 KiB for bf16 D > 256 on sm_90, 96 KiB on sm_80, by the
# compiled kernels' metadata), so there is always a candidate.
GPU_CONFIGS = [
    _config(128, 64, 4, 3),
    _config(64, 128, 4, 3),
    _config(128, 128, 8, 3),
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
# candidate counts) and the embedding chunk, not by the exact sizes.
TUNING_KEY = ["ROWS_CLASS", "COLS_CLASS", "BLOCK_D", "SINGLE_CHUNK", "TF32"]


def size_class(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def block_d(d: int, itemsize: int) -> int:
    """The embedding chunk: all of D (rounded up to a power of two) when it fits in one tile."""
    widest = MAX_BLOCK_D if INTERPRET else min(MAX_BLOCK_D, MAX_ROW_BYTES // itemsize)
    return max(MIN_BLOCK_D, min(triton.next_power_of_2(d), widest))


def autotuned(rows: int, cols: int, dtype: torch.dtype, tf32: bool) -> bool:
    """Whether a problem gets the autotuned kernels (else the one fixed tile)."""
    tensor_cores = dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and tf32)
    return tensor_cores and rows * cols >= SMALL_PROBLEM
