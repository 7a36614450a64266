"""SASS instructions per score element in the inner loops of csrc/cuda's kernels.

Compiles csrc/cuda/negative_lse_kernels.cu to a cubin (device code only, no GPU needed)
with -DMACL_CUDA_COMMON_PATH_ONLY and line information, and disassembles it (nvdisasm
-gi). That build computes every rare path's condition and branches on it, but to a trap
instead of the path (tile_stream.cuh's rare(): masked tiles, the last partial tile, the
chunked layout, the forward's repair, the forward_product's rescale of a row whose running
max rises: counted is a tile that raises none), so each kernel keeps one loop over streamed tiles,
the one that holds the barrier and the copies, and its body is what a thread executes per
tile in the common case. Each loop nested in it counts its body times its trip count at
the given D, from the function it belongs to (the k loop of add_scores, the gradient
product, the cp.async copies). Divided by the score elements a thread holds per tile:
"instructions per score element".

Prints one line per kernel; exits 1 if a kernel's loops are not as expected.

    python tools/cuda_inner_loops.py [--arch 90] [--dim 128]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_spills  # noqa: E402  (the extension's nvcc flags)

SOURCE = os.path.join(ROOT, "csrc", "cuda", "negative_lse_kernels.cu")

# Per input type (kernels.cuh's Config): threads, streamed rows per tile, score elements per
# thread and tile, scores per row a thread holds (the k loop's width), gradient features per
# CTA, bytes per value, 16-row blocks per warp (MmaTile's kRowBlocks): the gradient passes'
# tile (Config::Tile), with the forward's changes (Config::ForwardTile) in FORWARD_TILES.
TILES = {
    "__half": dict(threads=128, streamed=64, elements=32, cols=16, output=128, size=2, row_blocks=1),
    "__nv_bfloat16": dict(threads=128, streamed=64, elements=32, cols=16, output=128, size=2, row_blocks=1),
    "float": dict(threads=64, streamed=32, elements=32, cols=32, output=64, size=4, row_blocks=1),
    "double": dict(threads=64, streamed=16, elements=16, cols=16, output=32, size=8, row_blocks=1),
}
FORWARD_TILES = {
    "__half": dict(elements=64, row_blocks=2),
    "__nv_bfloat16": dict(elements=64, row_blocks=2),
}


def tile_of(kernel: str, dtype: str) -> Dict[str, int]:
    """The tile figures of a kernel (negative_lse_forward, ..._forward_product, ..._rows_grad, ..._cols_grad,
    ..._symmetric_grad) for an input type: the forward_product has the gradient passes' tile."""
    return {**TILES[dtype], **(FORWARD_TILES.get(dtype, {}) if kernel == "negative_lse_forward" else {})}


Chain = Tuple[Tuple[str, int], ...]  # (file, line) from the innermost inlined call outwards


def nvdisasm() -> str:
    import torch.utils.cpp_extension as ext

    candidates = [os.path.join(ext.CUDA_HOME, "bin", "nvdisasm")] if ext.CUDA_HOME else []
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm"))
    except ImportError:
        pass
    for path in candidates:
        if os.path.exists(path):
            return path
    raise SystemExit("cuda_inner_loops: nvdisasm not found (CUDA_HOME/bin or triton's bundled one)")


def disassemble(arch: str, workdir: str) -> str:
    cubin = os.path.join(workdir, f"kernels.sm_{arch}.cubin")
    command = check_spills.nvcc_command(SOURCE, arch, cubin) + ["-lineinfo", "-DMACL_CUDA_COMMON_PATH_ONLY"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return subprocess.run([nvdisasm(), "-gi", cubin], check=True, capture_output=True, text=True).stdout


def parse(listing: str) -> Dict[str, List[Tuple[str, Chain]]]:
    """Function -> its instructions as (text, chain), in order; branch targets as their index."""
    functions: Dict[str, List[Tuple[str, Chain]]] = {}
    labels: Dict[str, Dict[str, int]] = {}
    current, chain, pending, pending_labels = None, (), [], []
    for line in listing.splitlines():
        match = re.match(r"^\.text\.(\S+):", line)
        if match:
            current = match.group(1)
            functions[current], labels[current] = [], {}
            chain, pending, pending_labels = (), [], []
            continue
        if current is None:
            continue
        match = re.match(r"^(\.L_x_\d+):", line)
        if match:
            pending_labels.append(match.group(1))
            continue
        match = re.match(r'\s*//## File "([^"]+)", line (\d+)', line)
        if match:
            pending.append((os.path.basename(match.group(1)), int(match.group(2))))
            continue
        match = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if match:
            if pending:
                chain, pending = tuple(pending), []
            for label in pending_labels:
                labels[current][label] = len(functions[current])
            pending_labels = []
            functions[current].append((match.group(1), chain))
    for name, instructions in functions.items():
        resolved = []
        for text, chain in instructions:
            target = re.search(r"`\((\.L_x_\d+)\)", text)
            if target and target.group(1) in labels[name]:
                text = text.replace(target.group(0), f"@{labels[name][target.group(1)]}")
            resolved.append((text, chain))
        functions[name] = resolved
    return functions


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def back_branches(instructions) -> List[Tuple[int, int]]:
    loops = []
    for i, (text, _) in enumerate(instructions):
        match = re.search(r"\bBRA\b.*?@(\d+)", text)
        if match and int(match.group(1)) <= i:
            loops.append((int(match.group(1)), i))
    return loops


def enclosing_functions() -> Dict[Tuple[str, int], str]:
    """(file, line) -> name of the device function whose body holds that line."""
    owner = {}
    for path in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")):
        name = "?"
        for number, line in enumerate(open(path), start=1):
            match = re.match(r"\s*__device__ (?:[\w:<>,*&\s]+?\s)?(\w+)\(", line)
            if match and not line.rstrip().endswith(";"):
                name = match.group(1)
            owner[(os.path.basename(path), number)] = name
    return owner


def census(instructions, tile: Dict[str, int], dim: int, owner) -> Dict[str, float]:
    """Instructions one thread executes in one tile iteration (common path), and its MUFU count."""
    loops = back_branches(instructions)
    # The loop over streamed tiles: a barrier and the next tile's copies (a warp-divergence
    # fallback the compiler may add around a barrier outside it has no copies).
    with_barrier = [(s, e) for s, e in loops if {"BAR", "LDGSTS"} <= {opcode(t) for t, _ in instructions[s : e + 1]}]
    if len(with_barrier) != 1:
        raise SystemExit(f"cuda_inner_loops: expected one loop with a barrier and copies, found {len(with_barrier)}")
    start, end = with_barrier[0]
    nested = [(s, e) for s, e in loops if start < s and e < end]
    pieces = dim * tile["size"] // 16  # 16-byte copies per row

    def trips(s: int, e: int) -> float:
        body = instructions[s : e + 1]
        # The innermost function of a known kind along each instruction's inlining chain.
        known = ("add_scores", "add", "load", "load_records", "excludes_owned")
        functions = collections.Counter(
            next((owner.get(site) for site in chain if owner.get(site) in known), "?") for _, chain in body
        )
        function = functions.most_common(1)[0][0]
        ops = collections.Counter(opcode(text) for text, _ in body)
        if function == "add_scores":  # features per iteration from the products in the body
            if ops["HMMA"]:
                # Whole iterations of the unrolled loop after the peeled first step; the step
                # left over (7 steps at D = 128, 2 per iteration) sits outside the loop and
                # counts once.
                steps = ops["HMMA"] / (tile["streamed"] // 8 * tile["row_blocks"])  # steps per iteration
                return (dim - 16) // 16 // steps
            return dim / ((ops["FFMA"] + ops["DFMA"]) / tile["cols"])
        if function == "add":  # SimtTile's product: one weight (kOutput FMAs) per trip
            return tile["cols"] / ((ops["FFMA"] + ops["DFMA"]) / tile["output"])
        if function == "load":  # RowLoader: this thread's rows of one streamed tile
            return tile["streamed"] * pieces / tile["threads"] / max(1, ops["LDGSTS"])
        if function == "load_records":
            return tile["streamed"] / tile["threads"] / max(1, ops["LDGSTS"])
        if function == "excludes_owned":  # the column and symmetric passes' check of the tile's exclusions
            return tile["streamed"] / 32
        raise SystemExit(f"cuda_inner_loops: unrecognized loop in {function} ({dict(ops)})")

    counts = {"instructions": 0.0, "MUFU": 0.0}
    weight = [1.0] * (end - start + 1)
    for s, e in nested:
        factor = trips(s, e)
        for i in range(s, e + 1):
            weight[i - start] *= factor
    for i in range(start, end + 1):
        text, _ = instructions[i]
        if text.startswith("@!PT"):  # never-executed padding
            continue
        counts["instructions"] += weight[i - start]
        counts["MUFU"] += weight[i - start] * (opcode(text) == "MUFU")
    return counts


# (symmetric_grad<In, true> is the symmetric pass with one exp per score, <In, false> with two.)
KERNEL = re.compile(
    r"(negative_lse_(?:forward_product|forward|rows_grad|cols_grad|symmetric_grad))<(\w+)(?:, (true|false))?>"
)


def measure(arch: str, dim: int) -> Dict[Tuple[str, str], Dict[str, float]]:
    """Per (kernel, input type as in TILES): instructions and MUFU per thread and tile, and its score elements."""
    with tempfile.TemporaryDirectory() as workdir:
        functions = parse(disassemble(arch, workdir))
    owner = enclosing_functions()
    found = {}
    for mangled, name in zip(functions, check_spills.demangle(list(functions))):
        match = KERNEL.search(name)
        if match:
            kernel, dtype, one_exp = match.groups()
            tile = tile_of(kernel, dtype)
            counts = census(functions[mangled], tile, dim, owner)
            found[kernel + ("_two_exp" if one_exp == "false" else ""), dtype] = {**counts, "elements": tile["elements"]}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    parser.add_argument("--dim", type=int, default=128, help="embedding width D (default 128)")
    args = parser.parse_args()
    print(f"sm_{args.arch}, D = {args.dim}, resident layout, common path, per thread and streamed tile:")
    print(f"{'kernel':52} {'instr':>7} {'elems':>5} {'instr/elem':>10} {'MUFU/elem':>9}")
    for (kernel, dtype), counts in sorted(measure(args.arch, args.dim).items()):
        elements = counts["elements"]
        print(
            f"{kernel + '<' + dtype + '>':52} {counts['instructions']:7.0f} {elements:5d} "
            f"{counts['instructions'] / elements:10.1f} {counts['MUFU'] / elements:9.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
