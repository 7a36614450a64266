// The per-element math every kernel of macl_kernels shares (MATH.md sections 3-4),
// written once for host code (the CPU kernel) and device code (the CUDA kernels).
//
// The kernels compute, per anchor row r, the log-sum-exp of its negative logits
//     lse[r] = log sum_{c not excluded for r} exp(s[r, c] / tau)
// and, in the backward, the weights E[r, c] = coef[r] * exp(s[r, c] / tau - lse[r])
// with coef[r] = dL/dlse[r] / tau. The per-anchor loss itself stays in Python
// (macl_kernels/_math.py), shared by every backend.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

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

// The backward weight of one negative: coef * exp(logit - shift) (MATH.md section 4).
template <typename T>
C10_HOST_DEVICE inline T negative_weight(T logit, T shift, T coef) {
  return coef * exp_of(logit - shift);
}

}  // namespace macl
