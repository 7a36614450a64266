// The per-element math every kernel of macl_kernels shares (MATH.md sections 3-4),
// written once for host code (the CPU kernel) and device code (the CUDA kernels).
//
// The kernels compute, per anchor row r, the log-sum-exp of its negative logits
//     lse[r] = log sum_{c not excluded for r} exp(s[r, c] / tau)
// and, in the backward, the weights E[r, c] = coef[r] * exp(s[r, c] / tau - lse[r])
// with coef[r] = dL/dlse[r] / tau (MATH.md section 4), as operands of products in the
// input type (see weight_operand below). The per-anchor loss itself stays in Python
// (macl_kernels/_math.py), shared by every backend.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace macl {

template <typename T>
C10_HOST_DEVICE inline T negative_infinity() {
  return static_cast<T>(-INFINITY);
}

// The exp choice: IEEE exp on the host (vectorized code uses SLEEF's, 1 ulp); on the
// device, single precision uses the hardware exp2 with log2(e) folded into the argument
// (about 2 ulp, plenty for MATH.md's 1e-5 on sums of positive terms), double uses exp.
C10_HOST_DEVICE inline float exp_of(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x * 1.4426950408889634f);
#else
  return std::exp(x);
#endif
}

C10_HOST_DEVICE inline double exp_of(double x) {
  return exp(x);
}

C10_HOST_DEVICE inline float log_of(float x) {
  return logf(x);
}

C10_HOST_DEVICE inline double log_of(double x) {
  return log(x);
}

// The masked-logit rule: column c is not a negative of row r when it is one of the (up
// to two) excluded columns of r; -1 (or anything outside [0, C)) never matches a column.
C10_HOST_DEVICE inline bool is_excluded(int64_t column, int32_t first, int32_t second) {
  return column == first || column == second;
}

template <typename T>
C10_HOST_DEVICE inline T masked_logit(T similarity, T inv_tau, bool excluded) {
  return excluded ? negative_infinity<T>() : similarity * inv_tau;
}

// Online log-sum-exp: a running (max, sum) with sum = sum_i exp(logit_i - max).
// An empty state is (-inf, 0); -inf logits (masked) leave a state unchanged.
template <typename T>
C10_HOST_DEVICE inline void lse_add(T& max, T& sum, T logit) {
  if (logit == negative_infinity<T>()) {
    return;
  }
  if (logit > max) {
    sum = sum * exp_of(max - logit) + T(1);  // max = -inf gives exp(-inf) = 0
    max = logit;
  } else {
    sum += exp_of(logit - max);
  }
}

// Merge state (other_max, other_sum) into (max, sum); either may be empty.
template <typename T>
C10_HOST_DEVICE inline void lse_merge(T& max, T& sum, T other_max, T other_sum) {
  if (!(other_sum > T(0))) {
    return;
  }
  if (!(sum > T(0))) {
    max = other_max;
    sum = other_sum;
  } else if (other_max > max) {
    sum = sum * exp_of(max - other_max) + other_sum;
    max = other_max;
  } else {
    sum += other_sum * exp_of(other_max - max);
  }
}

// log(sum exp): -inf for a row without negatives.
template <typename T>
C10_HOST_DEVICE inline T lse_value(T max, T sum) {
  return sum > T(0) ? max + log_of(sum) : negative_infinity<T>();
}

// The shift the backward subtracts from a row's logits: its lse, or +inf for a row
// without negatives (all its columns are masked, and exp(logit - inf) = 0 is never NaN).
template <typename T>
C10_HOST_DEVICE inline T weight_shift(T lse) {
  return lse == negative_infinity<T>() ? static_cast<T>(INFINITY) : lse;
}

// ---- The backward's weights as operands of a product in the input type ----
//
// For fp16/bf16 inputs the weights meet the other side's rows in a product of the input
// type (the GPU's tensor cores), so they are rounded to it; the CPU kernel rounds the same
// values the same way (round to nearest even), so that it shows the same numbers.
// E = coef * p itself is never rounded: coef = dL/dlse / tau is about 1 / (M tau), and at
// M = 65536, tau = 0.1 the median E is ~1.6e-9, below fp16's smallest subnormal (6e-8):
// nearly every weight would round to 0 and the gradient of the negatives would vanish
// with the batch size (issue 11). What is rounded is p * factor, with
// p = exp(logit - lse) <= 1 and |factor| <= 1, and the product is multiplied by the rest
// of coef afterwards, in the accumulation type:
//
//   row view    (dx = E y, each output row one anchor):  factor 1,               after coef[r]
//   column view (dy = E^T x, a sum over the anchors):    factor coef[r] / scale, after scale
//
// The column view's products sum over anchors, so its `after` is shared by the anchors
// of one product: scale = max |coef| over a group of anchors (column_view_scale). For fp16
// operands a group is one streamed tile of kColumnScaleRows consecutive anchors (the
// CUDA column pass multiplies each tile's product by its scale in fp32 before adding it):
// with one scale for the whole problem, one anchor with a large upstream gradient (a
// per-sample weight, MACL's reweighting) would shrink every other anchor's factor until
// p * factor fell below fp16's subnormals, at a ratio that falls as M grows (issue 11).
// Now only the anchors of the same tile share a scale, whatever M. bf16 has float32's
// exponent range, so its factors cannot underflow that way: one group for the whole
// problem keeps its products scale-free (column_scale_rows). These are the rules of the
// Triton kernels too (macl_kernels/backends/triton/backward.py, which mirrors this
// comment with its own tile of anchors).
template <typename T>
struct OperandFactors {
  T factor;  // multiplies p before the rounding; |factor| <= 1
  T after;   // multiplies the product, in the accumulation type
};

template <typename T>
C10_HOST_DEVICE inline OperandFactors<T> row_view_factors(T coef) {
  return {T(1), coef};
}

template <typename T>
C10_HOST_DEVICE inline OperandFactors<T> column_view_factors(T coef, T scale) {
  return {coef / scale, scale};
}

// A group's column-view scale from max |coef| over its anchors; 1 when every coef of the
// group is 0 (no gradient).
template <typename T>
C10_HOST_DEVICE inline T column_view_scale(T max_abs_coef) {
  return max_abs_coef > T(0) ? max_abs_coef : T(1);
}

// The symmetric view (y = x, ntxent: dx = (E + E^T) x in one pass, csrc/cuda/
// symmetric_grad.cuh and the Triton backend's symmetric row pass): one operand holds
// E[r, c] + E[c, r] = scale (w[r] P[r, c] + w[c] P[c, r]) with w = coef / scale,
// scale = column_view_scale(max |coef| over all anchors), so |w| <= 1, P <= 1 and the
// operand w[r] P[r, c] + w[c] P[c, r] (|.| <= 2) is rounded; the product is multiplied
// by scale afterwards. For fp16 that one scale is not enough, for the column view's
// reason (one large |coef[c]| pushes every other term below fp16's subnormals): each
// output row r and streamed tile of kColumnScaleRows anchors has its own scale,
// symmetric_row_scale (the largest |coef| among r and the tile's anchors), the operand
// is (E[r, c] + E[c, r]) / it and each tile's product is multiplied by it in fp32 before
// it is added. Both terms share one exp when the spread of lse log2(e) over the rows
// (those with negatives) is at most kSymmetricMaxSpread: with shift = its minimum,
// w P[r, c] = 2^(logit2 - shift) alpha[r] with |alpha| = |w| 2^(shift - lse2) >= |w| 2^-96,
// a normal float32 while |w| >= 2^-30 (else each term takes its own exp; an anchor whose
// upstream gradient is over 2^30 times below the largest loses bits of alpha only near a
// spread of 96, where its terms weigh nothing next to that anchor's). The Triton kernels mirror
// this (macl_kernels/backends/triton/backward.py: _tile_scales, MAX_SPREAD).
constexpr double kSymmetricMaxSpread = 96.0;
constexpr double kLog2e = 1.4426950408889634;  // log2(e): exp(x) = exp2(x log2(e))

// The fp16 symmetric view's scale of output row r against a streamed tile of anchors: from
// |coef[r]| and the tile's max |coef| (its group of kColumnScaleRows); 1 when both are 0.
template <typename T>
C10_HOST_DEVICE inline T symmetric_row_scale(T row_abs_coef, T tile_max_abs_coef) {
  return column_view_scale(row_abs_coef > tile_max_abs_coef ? row_abs_coef : tile_max_abs_coef);
}

// Anchors per streamed tile of the CUDA column pass for fp16 (MmaTile::kStreamed, checked
// there): the anchors [g k, (g + 1) k) of group g share a column-view scale.
constexpr int64_t kColumnScaleRows = 64;

// Anchors per group of the column view's scale, of `rows` anchors whose weights are
// rounded to fp16 (`fp16_operands`) or not: groups of kColumnScaleRows, or one group.
C10_HOST_DEVICE inline int64_t column_scale_rows(bool fp16_operands, int64_t rows) {
  return fp16_operands ? kColumnScaleRows : (rows > 0 ? rows : 1);
}

// The operand of one weight: p * factor rounded to the nearest Operand (c10::Half,
// c10::BFloat16), or left as is (float, double).
template <typename Operand, typename T>
C10_HOST_DEVICE inline Operand weight_operand(T probability, T factor) {
  return static_cast<Operand>(probability * factor);
}

// Two fp16/bf16 operands at once, packed as a tensor-core register holds them (the first
// in the low 16 bits): weight_operand of each, with one conversion instruction on the GPU
// (cvt.rn.f16x2.f32 / cvt.rn.bf16x2.f32, the same round to nearest even).
template <typename Operand>
C10_HOST_DEVICE inline uint32_t weight_operand_pair(float p0, float f0, float p1, float f1) {
  static_assert(std::is_same_v<Operand, c10::Half> || std::is_same_v<Operand, c10::BFloat16>);
#if defined(__CUDA_ARCH__)
  uint32_t packed;
  if constexpr (std::is_same_v<Operand, c10::Half>) {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(p1 * f1), "f"(p0 * f0));
  } else {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(p1 * f1), "f"(p0 * f0));
  }
  return packed;
#else
  return static_cast<uint32_t>(weight_operand<Operand>(p0, f0).x) |
         (static_cast<uint32_t>(weight_operand<Operand>(p1, f1).x) << 16);
#endif
}

}  // namespace macl
