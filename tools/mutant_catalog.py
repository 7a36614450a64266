"""The mutants of ``make mutants`` (run by tools/mutants.py; docs/MUTANTS.md says how to read the run).

Each mutant is one deliberate bug: an exact snippet of one file (``original``, which
must occur there exactly once, else the mutant is reported stale and must be
refreshed) and what replaces it, with the focused pytest selection that must catch
it, mostly from the test file that mirrors the mutated module. ``rebuild`` names
what the file is compiled into ("cpu": the C++ CPU ops; "emulator": the CPU
emulator of the CUDA kernels). A mutant proven to compute the same results is kept
with ``equivalent`` saying why, and is not run.

The oracle (macl_kernels/backends/reference.py) is never mutated: it is what the
tests check against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str
    replacement: str
    tests: Tuple[str, ...]
    why: str  # the bug it stands for
    rebuild: Tuple[str, ...] = ()
    equivalent: str = ""


MATH = "macl_kernels/_math.py"
LAYOUTS = "macl_kernels/_layouts.py"
FUSED = "macl_kernels/_fused.py"
DISTRIBUTED = "macl_kernels/distributed.py"
TORCH = "macl_kernels/backends/torch_chunked.py"
CUDA_KERNELS = "csrc/cuda/kernels.cuh"
CUDA_SYMMETRIC = "csrc/cuda/symmetric_grad.cuh"
TRITON = "macl_kernels/backends/triton"

T_MATH = "python_tests/test_math.py"
T_LAYOUTS = "python_tests/test_layouts.py"
T_TORCH = "python_tests/backends/test_torch_chunked.py"
T_CPP = "python_tests/backends/test_cpp.py"
T_EMULATED = "python_tests/backends/test_cuda_emulated.py"
T_TRITON = "python_tests/backends/test_triton.py"
TRITON_EDGES = f"{T_TRITON}::test_block_edges_and_embedding_chunks"
T_TRAINING = "python_tests/conformance/test_training_api.py"
T_REFERENCE = "python_tests/conformance/test_against_reference.py"
T_DISTRIBUTED = "python_tests/test_distributed.py"
# One world size's group runs every case once (~20 s); these are its cheapest views of a wrong gradient or loss.
RANKS_MATCH = (
    f"{T_DISTRIBUTED}::test_ranks_reproduce_the_single_process_loss[world2-torch-ntxent-linear-V-float64-mean-function]"
)

MUTANTS = [
    # ---- the shared per-anchor math (_math.py) ----
    Mutant(
        "math-eps-ignored",
        MATH,
        "return _AnchorLoss.apply(d, cfg.reweight, cfg.eps)",
        "return _AnchorLoss.apply(d, cfg.reweight, 1e-8)",
        (
            f"{T_MATH}::test_anchor_loss_and_its_gradient_equal_the_closed_forms",
            f"{T_REFERENCE}::test_losses_and_statistics_equal_a_hand_computation[torch-ntxent-0.3]",
        ),
        "cfg.eps ignored, always lightly's 1e-8 (survived the whole suite in the issue-15 audit)",
    ),
    Mutant(
        "math-eps-dropped",
        MATH,
        "return nll / (torch.sigmoid(-d) + eps)",
        "return nll / torch.sigmoid(-d)",
        (f"{T_MATH}::test_loss_value_equals_the_closed_form",),
        "eps left out of V = 1 / (1 - P + eps) in the loss's value",
    ),
    Mutant(
        "math-v-not-detached",
        MATH,
        "return _AnchorLoss.apply(d, cfg.reweight, cfg.eps)",
        "return anchor_loss_value(d, cfg.reweight, cfg.eps)",
        (f"{T_MATH}::test_anchor_loss_and_its_gradient_equal_the_closed_forms",),
        "autograd of the closed form: V gets a gradient instead of being a constant",
    ),
    Mutant(
        "math-tau-floor-dropped",
        MATH,
        "return tau.clamp_min(cfg.min_temperature)",
        "return tau",
        (f"{T_MATH}::test_temperature_floor_instead_of_nonpositive_tau",),
        "tau not floored at min_temperature: tau <= 0 turns the loss around or divides by 0",
    ),
    Mutant(
        "math-schedule-A0-sign",
        MATH,
        "tau = base * (1.0 + cfg.alpha * (alignment - cfg.A_0))",
        "tau = base * (1.0 + cfg.alpha * (alignment + cfg.A_0))",
        (f"{T_MATH}::test_linear_and_exp_schedules",),
        "the linear schedule's A_0 with the wrong sign",
    ),
    Mutant(
        "math-softplus-threshold",
        MATH,
        "nll = F.softplus(-d, threshold=40)",
        "nll = F.softplus(-d)",
        (f"{T_MATH}::test_loss_value_past_the_softplus_threshold_in_float64",),
        "softplus's default threshold 20: -log P off by 1e-10 relative in float64",
    ),
    Mutant(
        "math-no-negatives-eps0-loss",
        MATH,
        'return torch.where(d == float("inf"), 0.0, nll + tail)',
        "return nll + tail",
        (f"{T_MATH}::test_a_row_without_negatives_has_no_loss_and_no_slope",),
        "eps = 0: a row without negatives (d = +inf) gets the limit 1 instead of loss 0",
    ),
    Mutant(
        "math-no-negatives-eps0-slope",
        MATH,
        'return (d != float("inf")).to(d.dtype)',
        "return torch.ones_like(d)",
        (f"{T_MATH}::test_a_row_without_negatives_has_no_loss_and_no_slope",),
        "eps = 0: a row without negatives gets slope 1, so its positive a gradient",
    ),
    Mutant(
        "math-second-derivative",
        MATH,
        "slope = slope * torch.exp(log_one_minus_p - log_one_minus_p.detach())",
        "slope = slope * torch.exp(log_one_minus_p.detach() - log_one_minus_p.detach())",
        (f"{T_MATH}::test_anchor_loss_second_derivative_holds_v_constant",),
        "the recorded backward treats the slope as a constant: second derivatives lose a term",
    ),
    # ---- the layouts (_layouts.py) ----
    Mutant(
        "layouts-ntxent-positive-not-excluded",
        LAYOUTS,
        "columns = [direction.candidates.index(v) * total + rows for v in direction.excluded_views(view)]",
        "columns = [direction.candidates.index(v) * total + rows for v in direction.excluded_views(view)[:1]]",
        (f"{T_LAYOUTS}::test_negatives_per_anchor_match_math",),
        "ntxent: the positive stays among an anchor's negatives (only the anchor itself is excluded)",
    ),
    Mutant(
        "layouts-rank-offset",
        LAYOUTS,
        "rows = torch.arange(n, device=device) + rank * n\n    total = world_size * n",
        "rows = torch.arange(n, device=device)\n    total = world_size * n",
        (f"{T_LAYOUTS}::test_excluded_columns_are_the_anchor_and_its_positive",),
        "across ranks, every rank excludes the columns of rank 0's rows",
    ),
    Mutant(
        "layouts-own-anchor-rows",
        LAYOUTS,
        "return torch.cat([rows + block * world_size * n for block in range(len(views))])",
        "return torch.cat([rows + block * n for block in range(len(views))])",
        (f"{T_LAYOUTS}::test_own_anchor_rows_partition_the_global_anchors",),
        "a rank's second block of anchors taken at the local, not the global, offset",
    ),
    Mutant(
        "layouts-cross-sym-extra-negatives",
        LAYOUTS,
        "Direction((U1,), (U0,), extra_negatives=False)",
        "Direction((U1,), (U0,), extra_negatives=True)",
        (f"{T_LAYOUTS}::test_extra_negatives_reach_the_anchors_of_math_section_8",),
        "cross_sym: the u1 -> u0 direction sees the extra negatives too",
    ),
    # ---- the fused path (_fused.py) ----
    Mutant(
        "fused-tau-grad-symmetric-not-halved",
        FUSED,
        "    if symmetric:\n        ratio = ratio.sqrt()\n",
        "",
        (f"{T_TRAINING}::test_learnable_temperature_and_negatives_match_reference[torch-linear-0.5-ntxent-in-batch]",),
        "a tensor temperature's gradient through ntxent's y=None call counted twice",
    ),
    Mutant(
        "fused-tau-grad-sign",
        FUSED,
        "ratio = tau.detach() / tau",
        "ratio = tau / tau.detach()",
        (f"{T_TRAINING}::test_learnable_temperature_and_negatives_match_reference[torch-linear-0.5-cross-in-batch]",),
        "a tensor temperature's gradient through the negatives with the wrong sign",
    ),
    Mutant(
        "fused-tau-grad-extra-halved",
        FUSED,
        "anchors = _with_tau_gradient(x, tau, symmetric=False)",
        "anchors = _with_tau_gradient(x, tau, symmetric=True)",
        (f"{T_TRAINING}::test_learnable_temperature_and_negatives_match_reference[torch-linear-0.5-ntxent-negatives]",),
        "a tensor temperature's gradient through the extra negatives halved",
    ),
    Mutant(
        "fused-negatives-joined-by-max",
        FUSED,
        "return parts[0] if len(parts) == 1 else torch.logaddexp(parts[0], parts[1])",
        "return parts[0] if len(parts) == 1 else torch.maximum(parts[0], parts[1])",
        (f"{T_TRAINING}::test_learnable_temperature_and_negatives_match_reference[torch-linear-0.5-cross-negatives]",),
        "in-batch and extra negatives joined by a max instead of a logaddexp",
    ),
    Mutant(
        "fused-global-alignment-local",
        FUSED,
        "alignment = distributed.global_mean(positive_cos) if across_ranks else positive_cos.detach().mean()",
        "alignment = positive_cos.detach().mean()",
        (RANKS_MATCH,),
        "across ranks, each rank's own A and tau instead of the global batch's",
    ),
    # ---- the distributed path (distributed.py) ----
    Mutant(
        "distributed-check-without-layout",
        DISTRIBUTED,
        "LAYOUTS.index(layout), k]",
        "0, k]",
        (f"{T_DISTRIBUTED}::test_a_layout_that_differs_across_ranks_fails_on_every_rank[world2]",),
        "check_same_problem does not compare the layout (survived the whole suite in the issue-15 audit)",
    ),
    Mutant(
        "distributed-gradients-averaged",
        DISTRIBUTED,
        "        dist.all_reduce(total)\n        count =",
        "        dist.all_reduce(total)\n        total = total / dist.get_world_size()\n        count =",
        (RANKS_MATCH,),
        "the gathered candidates' gradients averaged across ranks instead of summed",
    ),
    Mutant(
        "distributed-global-mean-local-count",
        DISTRIBUTED,
        "return total / (values.numel() * dist.get_world_size())",
        "return total / values.numel()",
        (RANKS_MATCH,),
        "the global A divided by one rank's count: tau off by the world size",
    ),
    Mutant(
        "distributed-gathered-views-order",
        DISTRIBUTED,
        "return tuple(gathered.transpose(0, 1).reshape(len(views), -1, d).unbind(0))",
        "return tuple(gathered.reshape(len(views), -1, d).unbind(0))",
        (RANKS_MATCH,),
        "the views gathered in one collective split rank-major: rows of z0 and z1 mixed up",
    ),
    # ---- the memory bank and GradCache ----
    Mutant(
        "memory-bank-pointer-wrap",
        "macl_kernels/memory_bank.py",
        "torch.where(after >= self.size, torch.zeros_like(after), after)",
        "torch.where(after > self.size, torch.zeros_like(after), after)",
        ("python_tests/test_memory_bank.py",),
        "the FIFO pointer not wrapped when a batch ends exactly at the bank's end: updates stop",
    ),
    Mutant(
        "memory-bank-wraps-instead-of-dropping",
        "macl_kernels/memory_bank.py",
        "offset = torch.arange(self.size, device=bank.device) - self.pointer",
        "offset = (torch.arange(self.size, device=bank.device) - self.pointer) % self.size",
        ("python_tests/test_memory_bank.py",),
        "rows past the bank's end written at its start (lightly drops them)",
    ),
    Mutant(
        "grad-cache-rng-not-replayed",
        "macl_kernels/grad_cache.py",
        "tower.rng[k].restore(plan.cuda_devices)",
        "pass",
        ("python_tests/test_grad_cache.py::test_same_gradient_as_the_uncached_step[mlp-dropout-3-torch.float64]",),
        "GradCache's second pass draws new dropout masks instead of replaying the first pass's",
    ),
    # ---- the torch backend (backends/torch_chunked.py) ----
    Mutant(
        "torch-block-edge",
        TORCH,
        "yield block * step, (block + 1) * step",
        "yield block * step, (block + 1) * step - 1",
        (f"{T_TORCH}::test_many_small_blocks_match_reference",),
        "an off-by-one at a block edge: the last row of each block is never computed",
    ),
    Mutant(
        "torch-second-exclusion-ignored",
        TORCH,
        "hidden = (columns == excluded_block[:, :1]) | (columns == excluded_block[:, 1:])",
        "hidden = columns == excluded_block[:, :1]",
        (f"{T_TORCH}::test_many_small_blocks_match_reference",),
        "the second excluded column of each anchor (ntxent's positive) counted as a negative",
    ),
    Mutant(
        "torch-backward-scale-1e-5",
        TORCH,
        "scale = (grad_lse.to(acc) * inv_tau)[:, None]",
        "scale = (grad_lse.to(acc) * inv_tau * (1 + 1e-5))[:, None]",
        (f"{T_TORCH}::test_many_small_blocks_match_reference",),
        "the backward scaled by 1 + 1e-5 (the audit's subtle scale bug)",
    ),
    Mutant(
        "torch-symmetric-backward",
        TORCH,
        "return (dx + dcand).to(x.dtype), None, None, None",
        "return (dx + dx).to(x.dtype), None, None, None",
        (f"{T_TORCH}::test_many_small_blocks_match_reference",),
        "ntxent's y=None backward as 2 E X instead of (E + E^T) X",
    ),
    Mutant(
        "torch-row-without-negatives-nan",
        TORCH,
        'shift = torch.where(lse == float("-inf"), float("inf"), lse)',
        "shift = lse",
        (f"{T_REFERENCE}::test_negative_lse_op_rows_without_negatives[torch-True-torch.float64]",),
        "a row whose every candidate is excluded: exp(-inf - (-inf)) makes its gradient NaN",
    ),
    Mutant(
        "torch-negatives-gradient-not-required",
        TORCH,
        "need_dy = y is None or ctx.needs_input_grad[1]",
        "need_dy = True",
        (f"{T_TORCH}::test_no_gradient_work_for_negatives_that_do_not_require_one",),
        "extra negatives that do not require a gradient still get one computed (and thrown away)",
    ),
    # ---- the compiled ops' autograd (_extension_ops.py, shared by cpp and cuda) ----
    Mutant(
        "extension-ops-negatives-gradient-not-required",
        "macl_kernels/_extension_ops.py",
        "if need_dy:  # the column pass alone",
        "if y is not None:  # the column pass alone",
        (f"{T_CPP}::test_candidates_get_gradient_work_only_when_they_require_a_gradient",),
        "the kernels compute the gradient of extra negatives that do not require one (thrown away); the snippet "
        "is the product forward's backward, the path of every layout with candidates whose anchors need a gradient",
    ),
    # ---- the C++ CPU kernel (csrc/cpu, csrc/lse_math.h): each one rebuilds the CPU ops ----
    Mutant(
        "cpp-partial-vector-dropped",
        "csrc/cpu/tile_passes.cpp",
        "vsum += (load_partial(row + body, cols - body, ninf) - shift).exp();",
        "(void)0;  // mutant: the partial vector's terms are dropped",
        (f"{T_CPP}::test_rectangular_block_edges[cross]", f"{T_CPP}::test_op_matches_torch_backend_on_any_exclusions"),
        "the forward drops the last, partial SIMD vector of each tile row (the audit's C++ mutant)",
        rebuild=("cpu",),
    ),
    Mutant(
        "cpp-backward-scale-1.001",
        "csrc/cpu/negative_lse_cpu.cpp",
        "coef[r] = g[r] * p.inv_tau;",
        "coef[r] = g[r] * p.inv_tau * T(1.001);",
        (f"{T_CPP}::test_op_matches_torch_backend_on_any_exclusions",),
        "the backward scaled by 1.001 (the audit's scale bug)",
        rebuild=("cpu",),
    ),
    Mutant(
        "cpp-fp16-weight-rounding-rule",
        "csrc/lse_math.h",
        "return {coef / scale, scale};",
        "return {coef, T(1)};",
        (f"{T_CPP}::test_fp16_weights_do_not_underflow_at_32k",),
        "fp16 column-view weights rounded as E = coef * p (issue 11: below fp16's subnormals at large N)",
        rebuild=("cpu",),
    ),
    Mutant(
        "fp16-column-scale-whole-problem",
        "csrc/lse_math.h",
        "return fp16_operands ? kColumnScaleRows : (rows > 0 ? rows : 1);",
        "return rows > 0 ? rows : 1;",
        (
            f"{T_CPP}::test_fp16_column_weights_do_not_underflow_next_to_large_upstream_gradients",
            f"{T_EMULATED}::test_fp16_column_weights_do_not_underflow_next_to_a_large_upstream_gradient",
        ),
        "fp16 column-view weights scaled by one max |coef| for the whole problem, not per tile of 64 anchors: one "
        "large upstream gradient pushes every other anchor's weight below fp16's subnormals (issue 11)",
        rebuild=("cpu", "emulator"),
    ),
    # ---- the CUDA kernels (csrc/cuda), run by the CPU emulator of python_tests/backends/cuda_emulation ----
    Mutant(
        "cuda-symmetric-one-fp16-scale",
        CUDA_SYMMETRIC,
        "const Acc tile_max = kTileScales ? p.max_abs_coef[t] : Acc(0);",
        "const Acc tile_max = kTileScales ? weight_scale : Acc(0);",
        (f"{T_EMULATED}::test_fp16_symmetric_weights_do_not_underflow_next_to_a_large_upstream_gradient",),
        "ntxent's symmetric backward in fp16 with one scale for all anchors, not one per output row and streamed "
        "tile: one large upstream gradient pushes every other entry's operand below fp16's subnormals (issue 11)",
        rebuild=("emulator",),
    ),
    Mutant(
        "cuda-symmetric-column-mask-from-rows",
        CUDA_SYMMETRIC,
        "return value(i, j, score, mask.masked(i, j), col_masked);",
        "return value(i, j, score, mask.masked(i, j), mask.masked(i, j));",
        (f"{T_EMULATED}::test_symmetric_pass_with_an_asymmetric_table[torch.float32]",),
        "ntxent's symmetric backward takes the exclusion table as symmetric: E[j, i] dropped where anchor i "
        "excludes j instead of where anchor j excludes i",
        rebuild=("emulator",),
    ),
    Mutant(
        "cuda-column-shift-without-log2e",
        CUDA_KERNELS,
        "record.shift2 = weight_shift(lse[r]) * Acc(kLog2e);",
        "record.shift2 = weight_shift(lse[r]);",
        (f"{T_EMULATED}::test_matches_float64[float32-cross-n70-d40]",),
        "the exp2 folding: the column pass's lse shift left in base e while the logits are in base 2",
        rebuild=("emulator",),
    ),
    Mutant(
        "cuda-product-without-rescale",
        "csrc/cuda/forward_product.cuh",
        "rescale_row<Tile>(i, max2[i], next, sum[i], product);",
        "",
        (f"{T_EMULATED}::test_product_matches_float64[float32-cross-n70-d40]",),
        "the forward with P y: a rising row max leaves the sum and product of the earlier tiles unrescaled",
        rebuild=("emulator",),
    ),
    Mutant(
        "cuda-product-fixed-shift",
        "csrc/cuda/forward_product.cuh",
        "max2[i] = negative_infinity<Acc>();",
        "max2[i] = scale2;",
        (f"{T_EMULATED}::test_fp16_product_of_far_apart_rows_at_a_tiny_tau",),
        "the forward with P y shifted by the logit of a score of 1 (log2(e) / tau) instead of each row's running "
        "max: at a tiny tau a row's largest fp16 operands fall to fp16's subnormals or 0",
        rebuild=("emulator",),
    ),
    Mutant(
        "cpu-product-without-rescale",
        "csrc/cpu/tile_passes.cpp",
        """      for (int64_t d = 0; d < features; ++d) {
        out[d] *= factor;
      }""",
        "",
        (f"{T_CPP}::test_product_matches_float64[cross-torch.float32]",),
        "the CPU forward with P y: a rising row max leaves the product of the earlier column blocks unrescaled",
        rebuild=("cpu",),
    ),
    Mutant(
        "cuda-ragged-tile-off-by-one",
        CUDA_KERNELS,
        "valid = min(cols - col0, Tile::kStreamed);",
        "valid = min(cols - col0 + 1, Tile::kStreamed);",
        (f"{T_EMULATED}::test_matches_float64[float32-cross-n70-d40]",),
        "an off-by-one at the ragged last tile: one column past the candidates counted as a negative",
        rebuild=("emulator",),
    ),
    # ---- the Triton kernels (macl_kernels/backends/triton), in Triton's interpreter ----
    Mutant(
        "triton-edge-mask",
        f"{TRITON}/helpers.py",
        'sim = tl.where(hidden | (b_idx[None, :] >= n_b), float("-inf"), sim)',
        'sim = tl.where(hidden, float("-inf"), sim)',
        (f"{TRITON_EDGES}[13-5-cross]",),
        "the ragged last tile's columns past the candidates (zeros) counted as negatives (the audit's Triton mutant)",
    ),
    Mutant(
        "triton-ragged-tile-skipped",
        f"{TRITON}/forward.py",
        "for j in range(0, (len1 + len2 + (n_full * BLOCK_N < C).to(tl.int32)) * active):",
        "for j in range(0, (len1 + len2) * active):",
        (f"{TRITON_EDGES}[13-5-cross]",),
        "the forward never visits the ragged last tile of candidates",
    ),
    Mutant(
        "triton-extra-empty-tile",
        f"{TRITON}/forward.py",
        "for j in range(0, (len1 + len2 + (n_full * BLOCK_N < C).to(tl.int32)) * active):",
        "for j in range(0, (len1 + len2 + (n_full * BLOCK_N <= C).to(tl.int32)) * active):",
        (f"{TRITON_EDGES}[16-16-cross]",),
        "the other side of that off-by-one: one more tile, past the candidates, when BLOCK_N divides C",
        equivalent=(
            "the extra tile's columns are all >= C: it is a masked tile, so its loads give 0 and every score is "
            "-inf; each term is exp2(-inf) = 0 (the fixed shift and the running maximum alike: the maximum stays "
            "as it was, its factor is 1), so the sum, lse and P y are the same bits (only a tile of work is wasted)"
        ),
    ),
    Mutant(
        "triton-backward-lse-without-log2e",
        f"{TRITON}/backward.py",
        "lse2 = lse.to(acc) * LOG2E_VALUE",
        "lse2 = lse.to(acc)",
        (f"{TRITON_EDGES}[13-5-cross]", f"{TRITON_EDGES}[13-5-ntxent]"),
        "the exp2 folding: the backward passes shift base-2 logits by a base-e lse",
    ),
    Mutant(
        "triton-forward-repair-condition",
        f"{TRITON}/forward.py",
        "exact = (total >= LOWEST_SUM) & (total <= HIGHEST_SUM)",
        "exact = total <= HIGHEST_SUM",
        (f"{T_TRITON}::test_forward_repairs_only_the_rows_the_fixed_shift_cannot_hold",),
        "the fixed-shift forward does not send rows whose terms underflowed (tiny tau) to the repair launch",
    ),
    Mutant(
        "triton-product-not-rescaled",
        f"{TRITON}/forward.py",
        "        if WITH_PRODUCT:\n            acc = acc * factor[:, None]\n",
        "",
        (
            f"{T_TRITON}::test_forward_repairs_only_the_rows_the_fixed_shift_cannot_hold",
            f"{T_TRITON}::test_half_precision_chunks",
        ),
        "the cross forward's P y accumulator not rescaled when the running maximum grows (repair, fp16)",
    ),
    Mutant(
        "triton-symmetric-two-exp-column-shift",
        f"{TRITON}/backward.py",
        "both += weight_c[None, :] * exp2(sim * scale - lse2_c[None, :])",
        "both += weight_c[None, :] * exp2(sim * scale - lse2[:, None])",
        (f"{T_TRITON}::test_symmetric_backward_is_exact_with_one_exp_and_with_two",),
        "the symmetric ntxent backward's two-exp fallback: E^T's term shifted by the row's lse, not the column's",
    ),
]
