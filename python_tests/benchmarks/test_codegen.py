"""The codegen report's parsing of SASS, resource usage and PTX, on small hand-written listings.

Compiling the real kernels takes minutes: ``make codegen`` does that (benchmarks/codegen.py).
"""

from collections import Counter

from benchmarks import codegen, sass

# A cuobjdump -sass listing: a prologue, a tile loop with a nested two-instruction chunk loop
# (0x0040-0x0050), two exps and a spill, and a loop without exp (0x00d0-0x00e0).
LISTING = """
	code for sm_90a
		Function : kernel_a
	.headerflags	@"EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                     /* 0x0000000000007919 */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR6][R4.64] ;
        /*0040*/                   FFMA R2, R2, R3, R4 ;
        /*0050*/              @!P0 BRA 0x40 ;
        /*0060*/                   MUFU.EX2 R5, R5 ;
        /*0070*/                   MUFU.EX2 R6, R6 ;
        /*0080*/                   STL.64 [R1], R6 ;
        /*0090*/                   FSEL R7, R7, -INF , P1 ;
        /*00a0*/                   LDL R8, [R1+0x8] ;
        /*00b0*/              @!P2 BRA 0x20 ;
        /*00c0*/                   IADD3 R9, R9, 0x1, RZ ;
        /*00d0*/                   IADD3 R9, R9, 0x1, RZ ;
        /*00e0*/              @P3 BRA 0xd0 ;
        /*00f0*/                   EXIT ;
		Function : kernel_b
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   EXIT ;
"""

RES_USAGE = """
Fatbin elf code:
================
arch = sm_80
Resource usage:
 Common:
  GLOBAL:0
 Function kernel_b:
  REG:96 STACK:16 SHARED:39424 LOCAL:0 CONSTANT[0]:432 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_functions_loops_and_spills_of_a_listing():
    kernel_a, kernel_b = sass.parse_sass(LISTING)
    assert (kernel_a.name, kernel_a.arch, len(kernel_a.instructions)) == ("kernel_a", "sm_90a", 16)
    assert kernel_a.instructions[5].opcode == "BRA"  # the predicate is dropped
    assert [(loop.start, loop.end) for loop in sass.loops(kernel_a)] == [(0x20, 0xB0), (0x40, 0x50), (0xD0, 0xE0)]
    assert sass.spill_bytes(kernel_a) == 8 + 4 and sass.spill_bytes(kernel_b) == 0
    assert (sass.mma_kind_of_sass(kernel_a), sass.pipeline_of_sass(kernel_a)) == ("wgmma", "cp.async")
    assert (sass.mma_kind_of_sass(kernel_b), sass.pipeline_of_sass(kernel_b)) == ("mma.sync", "none")


def test_the_tile_loop_counts_nested_chunk_loops_per_trip():
    kernel_a, _ = sass.parse_sass(LISTING)
    (loop,) = sass.tile_loops(kernel_a, inner_trips=3)  # the loop without exp is not a tile loop
    assert (loop.instructions, loop.mufu) == (8 + 3 * 2, 2)
    columns = sass.per_element([loop], elements_per_thread=2)
    assert (columns["sass_per_element"], columns["mufu_per_element"]) == (7.0, 1.0)
    assert sass.per_element([loop], None)["sass_per_element"] == ""


def test_the_interior_loop_is_the_smallest_tile_loop():
    small, large = sass.TileLoop(10, 2, Counter(FADD=10)), sass.TileLoop(30, 2, Counter())
    columns = sass.per_element([large, small], elements_per_thread=10)
    assert (columns["sass_per_element"], columns["sass_per_element_max"]) == (1.0, 3.0)


def test_resource_usage_and_ptx_features():
    assert sass.parse_res_usage(RES_USAGE) == [
        {"name": "kernel_b", "arch": "sm_80", "regs": 96, "stack": 16, "shared": 39424, "local": 0}
    ]
    assert sass.mma_kind_of_ptx("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert sass.mma_kind_of_ptx("mma.sync.aligned.m16n8k16") == "mma.sync"
    assert sass.mma_kind_of_ptx("fma.rn.f32") == "fma"
    assert sass.pipeline_of_ptx("cp.async.bulk.tensor.2d") == "tma"
    assert sass.pipeline_of_ptx("cp.async.cg.shared.global") == "cp.async"
    assert sass.pipeline_of_ptx("ld.global.v4.b32") == "none"


def test_check_fails_on_spills_and_shared_memory_only(tmp_path):
    row = {column: "" for column in codegen.COLUMNS}
    row.update(kernel="forward", arch=90, spill_bytes=0, smem_bytes=1024, fits="yes")
    assert codegen.problems([row]) == []
    spilling = {**row, "spill_bytes": 8}
    too_big = {**row, "smem_bytes": 300_000, "fits": "no"}
    assert [line.split(": ")[1] for line in codegen.problems([spilling, too_big])] == [
        "8 spill bytes",
        "300000 B of shared memory > 232448",
    ]
    codegen.write_csv([row, spilling], tmp_path / "codegen.csv")
    assert [r["spill_bytes"] for r in codegen.read_csv(tmp_path / "codegen.csv")] == ["0", "8"]
    assert codegen.markdown([row], "# t").count("\n| forward |") == 1


def test_comparison_gives_the_range_over_configs_per_case():
    def row(kernel, sass_per_element, spill):
        row = {column: "" for column in codegen.COLUMNS}
        row.update(kernel=kernel, layout="ntxent", arch="90", dtype="bf16", d="128", fits="yes")
        row.update(sass_per_element=sass_per_element, mufu_per_element="1", spill_bytes=spill)
        return row

    before = [row("forward", "18.5", "0"), row("forward", "20", "16"), row("rows", "16", "0")]
    after = [row("forward", "7.25", "0")]
    table = codegen.comparison(before, after)
    assert "| forward | ntxent | 90 | bf16 | 128 | 18.5-20 (1 MUFU), 16 B spilled, 2 cfg | 7.25 (1 MUFU), 0 B" in table
    assert "| rows | ntxent | 90 | bf16 | 128 | 16 (1 MUFU), 0 B spilled, 1 cfg | - |" in table


def _config_row(kernel, shape, spill, d="256", block_d="128", fits="yes"):
    row = {column: "" for column in codegen.COLUMNS}
    block_m, block_n, warps, stages = shape
    row.update(kernel=kernel, layout="cross", arch="90", dtype="bf16", d=d, block_d=block_d, fits=fits)
    row.update(block_m=block_m, block_n=block_n, warps=warps, stages=stages, spill_bytes=spill)
    return row


def test_all_configs_rows_give_the_prune_table_and_what_is_picked():
    # A tuned kernel: two GPU configs clean, one spilling; an untuned one whose small config spills.
    rows = [
        _config_row("columns", (128, 64, 4, 3), 352),
        _config_row("columns", (128, 64, 8, 2), 0),
        _config_row("columns", (64, 64, 4, 2), 0),
        _config_row("columns two-factor", (64, 64, 4, 2), 12),
        _config_row("columns two-factor", (64, 32, 4, 2), 0, fits="yes"),
    ]
    codegen.mark_picked(rows)
    assert [row["picked"] for row in rows] == ["no", "no", "yes", "no", "yes"]  # 8 warps on 64 resident: slow
    assert [line.split(": ")[1] for line in codegen.problems(rows)] == []  # what spills is never picked
    assert codegen.verified_table(rows) == {
        (90, "columns", "bf16", 128, True): ((128, 64, 8, 2), (64, 64, 4, 2)),
        (90, "columns two-factor", "bf16", 128, True): ((64, 32, 4, 2),),
    }


def test_the_table_module_round_trips(tmp_path):
    table = {(80, "forward", "fp32", 128, False): ((64, 64, 4, 2),)}
    path = tmp_path / "verified.py"
    codegen.write_table(table, str(path), "python -m benchmarks.codegen --all-configs")
    namespace = {}
    exec(path.read_text(), namespace)
    assert namespace["CLEAN"] == table and "--all-configs" in namespace["__doc__"]


def test_cuda_kernel_names_give_the_kernel_and_its_input_type():
    # The demangled names hold a second template (Params<T, ...>) that must not be taken for the kernel.
    name = (
        "void macl::cuda::(anonymous namespace)::negative_lse_rows_grad<__nv_bfloat16>"
        "(macl::cuda::(anonymous namespace)::Params<__nv_bfloat16, float>)"
    )
    parsed = codegen.CUDA_NAME.search(name)
    assert (codegen.cuda_kernel_of(parsed), codegen.CUDA_TYPES[parsed["input"]]) == ("negative_lse_rows_grad", "bf16")
    # The symmetric pass's two variants (one exp per score, or two).
    for variant, kernel in (("true", "negative_lse_symmetric_grad"), ("false", "negative_lse_symmetric_grad_two_exp")):
        name = (
            f"void macl::cuda::(anonymous namespace)::negative_lse_symmetric_grad<__half, {variant}>"
            "(macl::cuda::(anonymous namespace)::Params<__half, float>)"
        )
        parsed = codegen.CUDA_NAME.search(name)
        assert (codegen.cuda_kernel_of(parsed), codegen.CUDA_TYPES[parsed["input"]]) == (kernel, "fp16")
