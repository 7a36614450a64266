// Argument checks shared by every device's kernels. The Python API checks its
// arguments first (macl_kernels/_config.py); these guard direct calls of the ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace macl {

inline void check_negative_lse_args(
    const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& excluded, const at::Tensor& tau) {
  TORCH_CHECK(x.dim() == 2, "negative_lse: x must be 2-D (M x D), got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), "negative_lse: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) >= 1, "negative_lse: x needs at least one feature column, got ", x.sizes());
  if (y.has_value()) {
    TORCH_CHECK(y->dim() == 2 && y->size(1) == x.size(1), "negative_lse: y must be C x ", x.size(1), ", got ",
                y->sizes());
    TORCH_CHECK(y->scalar_type() == x.scalar_type(), "negative_lse: y must have the dtype of x (", x.scalar_type(),
                "), got ", y->scalar_type());
    TORCH_CHECK(y->device() == x.device(), "negative_lse: y must be on the device of x");
  }
  TORCH_CHECK(excluded.dim() == 2 && excluded.size(0) == x.size(0) && excluded.size(1) == 2,
              "negative_lse: excluded must be M x 2, got ", excluded.sizes());
  TORCH_CHECK(excluded.scalar_type() == at::kInt, "negative_lse: excluded must be int32, got ",
              excluded.scalar_type());
  TORCH_CHECK(excluded.device() == x.device(), "negative_lse: excluded must be on the device of x");
  TORCH_CHECK(tau.numel() == 1, "negative_lse: tau must hold one value, got ", tau.sizes());
  TORCH_CHECK(tau.device() == x.device(), "negative_lse: tau must be on the device of x");
}

inline void check_backward_args(const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& lse) {
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == x.size(0), "negative_lse_backward: lse must have M = ", x.size(0),
              " entries, got ", lse.sizes());
  TORCH_CHECK(grad_lse.sizes() == lse.sizes(), "negative_lse_backward: grad_lse must match lse, got ",
              grad_lse.sizes());
  TORCH_CHECK(grad_lse.device() == x.device() && lse.device() == x.device(),
              "negative_lse_backward: grad_lse and lse must be on the device of x");
}

// need_dx = false (dx comes from the forward's P y) is for the layouts with candidates:
// without them dx holds both roles.
inline void check_need_dx(bool has_y, bool need_dx) {
  TORCH_CHECK(need_dx || has_y, "negative_lse_backward: need_dx = false needs y (without y, dx holds both roles)");
}

// Dots, log-sum-exps and gradients accumulate in float32 (float64 inputs: float64).
inline at::ScalarType accumulation_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace macl
