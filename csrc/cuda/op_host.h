// The host side of the CUDA ops, whatever runs the kernels (negative_lse_cuda.cpp on a
// GPU; the tests' CPU emulation): dtype, padded operands, outputs, and the calls into
// launch.h's entry points, passed in as `launch` callables that also check the status.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../lse_math.h"
#include "launch.h"

namespace macl::cuda {

inline InputType input_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return InputType::kFloat32;
    case at::kDouble:
      return InputType::kFloat64;
    case at::kHalf:
      return InputType::kFloat16;
    case at::kBFloat16:
      return InputType::kBFloat16;
    default:
      TORCH_CHECK(false, "negative_lse: the CUDA kernels take float32, float64, float16 or bfloat16, got ", type);
  }
}

// The "padded operand" of launch.h: a contiguous, aligned t whose rows already have ld
// elements is used as is; anything else (a strided or offset view, a dim that is not a
// multiple of the kernels' step) is copied once into a zero-padded buffer, O(rows * dim).
inline at::Tensor padded_operand(const at::Tensor& t, int64_t ld) {
  const bool aligned = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  if (t.is_contiguous() && t.size(1) == ld && aligned) {
    return t;
  }
  at::Tensor padded = at::zeros({t.size(0), ld}, t.options());
  padded.narrow(1, 0, t.size(1)).copy_(t);
  return padded;
}

struct Inputs {
  at::Tensor x, y, excluded, tau;  // x, y padded operands; y is x when the op got no y
  InputType type;
  LseArgs args;

  Inputs(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in, const at::Tensor& excluded_in,
         const at::Tensor& tau_in, int64_t (*features)(InputType, int64_t)) {
    check_negative_lse_args(x_in, y_in, excluded_in, tau_in);
    // Tile and row indices are 32-bit in the kernels (as the excluded table's columns are).
    constexpr int64_t kMaxRows = (int64_t{1} << 31) - 1024;
    TORCH_CHECK(x_in.size(0) < kMaxRows && (!y_in.has_value() || y_in->size(0) < kMaxRows),
                "negative_lse: the CUDA kernels take fewer than 2^31 - 1024 anchors and candidates, got ",
                x_in.size(0), " and ", y_in.has_value() ? y_in->size(0) : x_in.size(0));
    type = input_type(x_in.scalar_type());
    const int64_t dim = x_in.size(1), ld = features(type, dim);
    x = padded_operand(x_in, ld);
    y = y_in.has_value() ? padded_operand(*y_in, ld) : x;
    excluded = excluded_in.contiguous();
    tau = tau_in.to(accumulation_type(x_in.scalar_type())).contiguous();
    args = LseArgs{x.const_data_ptr(), y.const_data_ptr(), excluded.const_data_ptr<int32_t>(),
                   tau.const_data_ptr(), x_in.size(0), y_in.has_value() ? y_in->size(0) : x_in.size(0), dim, ld};
  }
};

// lse; launch(type, args, lse pointer) runs launch_negative_lse.
template <typename Launch>
at::Tensor negative_lse_with(const Inputs& in, const Launch& launch) {
  const at::TensorOptions acc = in.x.options().dtype(accumulation_type(in.x.scalar_type()));
  at::Tensor lse = at::empty({in.args.rows}, acc);
  if (in.args.rows > 0) {
    launch(in.type, in.args, lse.data_ptr());
  }
  return lse;
}

// (lse, P y) of the product op; launch(type, args, lse pointer, product pointer) runs
// launch_negative_lse_product; empty(sizes, options) allocates outputs the kernel writes in full.
template <typename Launch, typename Empty>
std::tuple<at::Tensor, at::Tensor> negative_lse_product_with(const Inputs& in, const Launch& launch,
                                                             const Empty& empty) {
  const at::TensorOptions acc = in.x.options().dtype(accumulation_type(in.x.scalar_type()));
  at::Tensor lse = empty({in.args.rows}, acc);
  at::Tensor product = empty({in.args.rows, in.args.dim}, acc);
  if (in.args.rows > 0) {
    launch(in.type, in.args, lse.data_ptr(), product.data_ptr());
  }
  return {lse, product};
}

// launch.h's BackwardArgs::shared_shift for the lse of the rows and max |coef| per group
// of anchors, on the device (no synchronization): {min lse2 over the finite rows, whether
// the spread of those lse2 is at most kSymmetricMaxSpread, the weight scale}.
inline at::Tensor shared_shift(const at::Tensor& lse, const at::Tensor& max_abs_coef) {
  const at::Tensor lse2 = lse.mul(kLog2e);
  const at::Tensor finite = lse2.isfinite();
  const at::Tensor low = at::where(finite, lse2, at::full_like(lse2, INFINITY)).amin();
  const at::Tensor high = at::where(finite, lse2, at::full_like(lse2, -INFINITY)).amax();
  const at::Tensor one_exp = high.sub(low).le(kSymmetricMaxSpread).to(lse.scalar_type());
  const at::Tensor top = max_abs_coef.amax();
  const at::Tensor scale = at::where(top.gt(0), top, at::ones_like(top));  // column_view_scale
  return at::stack({low, one_exp, scale});
}

// (dx, dy) as the op schema says; launch(type, args, backward args, dx, dy) runs
// launch_negative_lse_backward; empty(sizes, options) allocates outputs the kernels write
// in full.
template <typename Launch, typename Empty>
std::tuple<at::Tensor, at::Tensor> negative_lse_backward_with(const Inputs& in, const at::Tensor& grad_lse,
                                                              const at::Tensor& lse, bool has_y, bool need_dy,
                                                              bool need_dx, at::ScalarType out_type,
                                                              const Launch& launch, const Empty& empty) {
  const at::ScalarType acc = accumulation_type(out_type);
  const at::TensorOptions options = in.x.options().dtype(acc);
  const at::Tensor g = grad_lse.to(acc).contiguous();
  const at::Tensor l = lse.to(acc).contiguous();
  // Gradients in the accumulation type; y = None: dx takes both roles ((E + E^T) x, one symmetric pass).
  check_need_dx(has_y, need_dx);
  at::Tensor dx = need_dx ? empty({in.args.rows, in.args.dim}, options) : at::Tensor();
  at::Tensor dy = (has_y && need_dy) ? empty({in.args.cols, in.args.dim}, options) : at::Tensor();
  void* columns_out = has_y ? (dy.defined() ? dy.data_ptr() : nullptr) : dx.data_ptr();
  if (in.args.rows > 0 && (dx.defined() || dy.defined())) {
    // On the device, without a synchronization: max |coef| per group of anchors that share
    // a column-view scale (lse_math.h), zeros past the last anchor.
    const int64_t group = column_scale_rows(in.type == InputType::kFloat16, in.args.rows);
    const int64_t groups = (in.args.rows + group - 1) / group;
    const at::Tensor abs_coef = g.mul(in.tau.reciprocal()).abs();
    const at::Tensor max_abs_coef =
        at::constant_pad_nd(abs_coef, {0, groups * group - in.args.rows}).view({groups, group}).amax(1);
    const at::Tensor shift = has_y ? at::Tensor() : shared_shift(l, max_abs_coef);
    const at::Tensor workspace =
        at::empty({static_cast<int64_t>(backward_workspace_bytes(in.type, in.args.rows))}, options.dtype(at::kByte));
    const BackwardArgs b{g.const_data_ptr(), l.const_data_ptr(), max_abs_coef.const_data_ptr(),
                         has_y ? nullptr : shift.const_data_ptr(), workspace.data_ptr()};
    launch(in.type, in.args, b, dx.defined() ? dx.data_ptr() : nullptr, columns_out);
  } else if (dy.defined()) {
    dy.zero_();  // no anchors: no gradient for the candidates
  }
  const at::Tensor none = at::empty({0}, in.x.options());
  return {dx.defined() ? dx.to(out_type) : none, dy.defined() ? dy.to(out_type) : none};
}

}  // namespace macl::cuda
