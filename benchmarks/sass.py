"""Reading GPU machine code without a GPU: SASS listings, resource usage, PTX features, the tile loop.

The text parsed here comes from the CUDA binary tools (``cuobjdump -sass``,
``cuobjdump -res-usage``) and from PTX; :mod:`benchmarks.codegen` runs the tools.

How the innermost tile loop is found in SASS (:func:`tile_loops`): a loop is a
backward branch, a ``BRA`` whose target address is at or below its own; its body
is the address range [target, branch]. The kernels evaluate ``exp`` only on score
tiles, so a *tile loop* is a loop whose body holds ``MUFU.EX2``, minus the loops
nested in it that hold no ``MUFU.EX2`` themselves (those walk D in chunks: they
count ``inner_trips`` times each). A kernel may have several tile loops (the
unmasked interior tiles, the masked boundary tiles, the epilogues of a software
pipeline are not loops): the interior one, which does the least per element since
the boundary loop does the same work plus the masking, is reported as
``sass_per_element``; the largest is reported too. Per element means per score
element per thread: instructions / (tile elements / threads).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

SECTION = re.compile(r"^\s*code for (?P<arch>sm_\w+)")
FUNCTION = re.compile(r"^\s*Function : (?P<name>\S+)")
INSTRUCTION = re.compile(r"^\s*/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<text>[^;]*?)\s*;")
PREDICATE = re.compile(r"^@!?U?P[T\d]+\s+")
BRANCH_TARGET = re.compile(r"^BRA(?:\.\S+)?\s+(?:`\()?(?:0x)?(?P<target>[0-9a-f]+)")
RES_FUNCTION = re.compile(r"^\s*Function (?P<name>[^:\s]+):")
RES_USAGE = re.compile(r"REG:(?P<regs>\d+) STACK:(?P<stack>\d+) SHARED:(?P<shared>\d+) LOCAL:(?P<local>\d+)")
ARCH = re.compile(r"^\s*arch = (?P<arch>sm_\w+)")
LOCAL_ACCESS = re.compile(r"^(?P<op>STL|LDL)(?P<suffix>(?:\.\w+)*)")
ACCESS_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


@dataclass
class Instruction:
    addr: int
    text: str  # without the predicate

    @property
    def opcode(self) -> str:
        """The mnemonic with its modifiers, e.g. ``MUFU.EX2``."""
        return self.text.split()[0] if self.text else ""


@dataclass
class Function:
    name: str
    arch: str
    instructions: List[Instruction] = field(default_factory=list)


def parse_sass(text: str) -> List[Function]:
    """Every function of a ``cuobjdump -sass`` listing, in order, with its architecture."""
    functions: List[Function] = []
    arch = ""
    for line in text.splitlines():
        section = SECTION.match(line)
        if section:
            arch = section["arch"]
            continue
        function = FUNCTION.match(line)
        if function:
            functions.append(Function(function["name"], arch))
            continue
        instruction = INSTRUCTION.match(line)
        if instruction and functions:
            body = PREDICATE.sub("", instruction["text"].strip())
            functions[-1].instructions.append(Instruction(int(instruction["addr"], 16), body))
    return functions


def parse_res_usage(text: str) -> List[Dict[str, object]]:
    """Per function of ``cuobjdump -res-usage``: name, arch, regs, stack, shared (static), local (bytes)."""
    usage: List[Dict[str, object]] = []
    arch, name = "", None
    for line in text.splitlines():
        header = ARCH.match(line)
        if header:
            arch = header["arch"]
        function = RES_FUNCTION.match(line)
        if function:
            name = function["name"]
            continue
        numbers = RES_USAGE.search(line)
        if numbers and name is not None:
            usage.append({"name": name, "arch": arch, **{k: int(v) for k, v in numbers.groupdict().items()}})
            name = None
    return usage


def spill_bytes(function: Function) -> int:
    """Bytes moved by local-memory stores and loads (STL/LDL): what register spills compile to."""
    total = 0
    for ins in function.instructions:
        access = LOCAL_ACCESS.match(ins.opcode)
        if access:
            widths = [ACCESS_BYTES[m] for m in access["suffix"].split(".") if m in ACCESS_BYTES]
            total += widths[0] if widths else 4
    return total


def mma_kind_of_ptx(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma"


def pipeline_of_ptx(ptx: str) -> str:
    if "cp.async.bulk.tensor" in ptx:
        return "tma"
    if "cp.async" in ptx:
        return "cp.async"
    return "none"


def mma_kind_of_sass(function: Function) -> str:
    ops = {ins.opcode.split(".")[0] for ins in function.instructions}
    if "HGMMA" in ops:
        return "wgmma"
    if ops & {"HMMA", "DMMA", "IMMA"}:
        return "mma.sync"
    return "fma"


def pipeline_of_sass(function: Function) -> str:
    ops = {ins.opcode.split(".")[0] for ins in function.instructions}
    if ops & {"UTMALDG", "UBLKCP"}:
        return "tma"
    if "LDGSTS" in ops:
        return "cp.async"
    return "none"


@dataclass
class Loop:
    start: int  # address of the first instruction (the branch target)
    end: int  # address of the backward branch

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and self != other


def loops(function: Function) -> List[Loop]:
    """Every backward branch as a loop, in address order."""
    found = []
    for ins in function.instructions:
        branch = BRANCH_TARGET.match(ins.text)
        if branch and int(branch["target"], 16) <= ins.addr:
            found.append(Loop(int(branch["target"], 16), ins.addr))
    return sorted(found, key=lambda loop: (loop.start, loop.end))


def _body(function: Function, loop: Loop) -> List[Instruction]:
    return [ins for ins in function.instructions if loop.start <= ins.addr <= loop.end]


def _has_exp(instructions: List[Instruction]) -> bool:
    return any(ins.opcode.startswith("MUFU.EX2") for ins in instructions)


@dataclass
class TileLoop:
    instructions: int  # per iteration, nested chunk loops counted inner_trips times
    mufu: int
    opcodes: Counter


def tile_loops(function: Function, inner_trips: int = 1) -> List[TileLoop]:
    """The tile loops of the module docstring, in address order."""
    all_loops = loops(function)
    with_exp = [loop for loop in all_loops if _has_exp(_body(function, loop))]
    # Innermost loops that hold an exp: no other exp-loop nested inside them.
    innermost = [loop for loop in with_exp if not any(loop.contains(other) for other in with_exp)]
    result = []
    for loop in innermost:
        nested = [other for other in all_loops if loop.contains(other)]
        counts: Counter = Counter()
        mufu = 0
        for ins in _body(function, loop):
            weight = inner_trips if any(other.start <= ins.addr <= other.end for other in nested) else 1
            counts[ins.opcode.split(".")[0]] += weight
            mufu += weight if ins.opcode.startswith("MUFU") else 0
        result.append(TileLoop(sum(counts.values()), mufu, counts))
    return result


def per_element(loops_found: List[TileLoop], elements_per_thread: Optional[float]) -> Dict[str, object]:
    """The report's loop columns: interior and largest tile loop per element, MUFU per element, top opcodes."""
    if not loops_found or not elements_per_thread:
        return {"sass_per_element": "", "mufu_per_element": "", "sass_per_element_max": "", "top_opcodes": ""}
    interior = min(loops_found, key=lambda loop: loop.instructions)
    largest = max(loops_found, key=lambda loop: loop.instructions)
    top = " ".join(f"{op}:{n}" for op, n in interior.opcodes.most_common(6))
    return {
        "sass_per_element": round(interior.instructions / elements_per_thread, 2),
        "mufu_per_element": round(interior.mufu / elements_per_thread, 3),
        "sass_per_element_max": round(largest.instructions / elements_per_thread, 2),
        "top_opcodes": top,
    }
