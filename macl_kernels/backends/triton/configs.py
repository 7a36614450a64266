"""Tile shapes: autotuned per size class on GPUs, one fixed shape for small problems and the interpreter.

The embedding width is not tuned: ``BLOCK_D`` is chosen on the host from D (one
chunk up to ``MAX_BLOCK_D``, wider embeddings are walked in chunks), so each
kernel is compiled for the widths actually used and the autotuner only picks the
anchor/candidate tile and the pipeline depth.
"""

from __future__ import annotations

import os

import triton

MAX_BLOCK_D = 256  # widest embedding chunk held in one tile
MIN_BLOCK = 16  # tl.dot needs every tile dimension >= 16 on GPUs
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

# Ampere (sm_80) and Hopper (sm_90): 64/128-row anchor tiles for the tensor cores,
# deeper pipelines for the candidate stream. Configs that do not fit in shared
# memory for a given BLOCK_D fail to compile and are skipped by the autotuner.
GPU_CONFIGS = [
    _config(128, 64, 4, 3),
    _config(128, 128, 8, 3),
    _config(64, 64, 4, 4),
    _config(64, 128, 4, 3),
    _config(128, 32, 4, 4),
]

TUNED_CONFIGS = [INTERPRETER_CONFIG] if INTERPRET else GPU_CONFIGS
FIXED_CONFIGS = [INTERPRETER_CONFIG] if INTERPRET else [SMALL_CONFIG]

# Autotuning is keyed by size class (the next power of two of the anchor and
# candidate counts) and the embedding chunk, not by the exact sizes.
TUNING_KEY = ["ROWS_CLASS", "COLS_CLASS", "BLOCK_D", "SINGLE_CHUNK", "TF32"]


def size_class(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def block_d(d: int) -> int:
    """The embedding chunk: all of D (rounded up to a power of two) when it fits in one tile."""
    return max(MIN_BLOCK, min(triton.next_power_of_2(d), MAX_BLOCK_D))


def is_small(rows: int, cols: int) -> bool:
    return rows * cols < SMALL_PROBLEM
