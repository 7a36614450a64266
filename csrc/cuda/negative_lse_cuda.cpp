// The CUDA registrations of the ops: argument checks, tensors and launches on the
// current stream; the kernels are in negative_lse_kernels.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "launch.h"

namespace macl::cuda {
namespace {

InputType input_type(at::ScalarType type) {
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

struct Inputs {
  at::Tensor x, y, excluded, tau;  // contiguous; y is x when the op got no y
  LseArgs args;
};

Inputs prepare(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& excluded,
               const at::Tensor& tau) {
  check_negative_lse_args(x, y, excluded, tau);
  TORCH_CHECK(x.is_cuda(), "negative_lse: the CUDA kernels need CUDA tensors, got ", x.device());
  Inputs in;
  in.x = x.contiguous();
  in.y = y.has_value() ? y->contiguous() : in.x;
  in.excluded = excluded.contiguous();
  in.tau = tau.to(accumulation_type(x.scalar_type())).contiguous();
  in.args = LseArgs{in.x.const_data_ptr(), in.y.const_data_ptr(), in.excluded.const_data_ptr<int32_t>(),
                    in.tau.const_data_ptr(), in.x.size(0), in.y.size(0), in.x.size(1)};
  return in;
}

at::Tensor negative_lse_cuda(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& excluded,
                             const at::Tensor& tau) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Inputs in = prepare(x, y, excluded, tau);
  at::Tensor lse = at::empty({x.size(0)}, x.options().dtype(accumulation_type(x.scalar_type())));
  if (x.size(0) > 0) {
    C10_CUDA_CHECK(launch_negative_lse(input_type(x.scalar_type()), in.args, lse.data_ptr(),
                                       c10::cuda::getCurrentCUDAStream()));
  }
  return lse;
}

std::tuple<at::Tensor, at::Tensor> negative_lse_backward_cuda(const at::Tensor& grad_lse, const at::Tensor& x,
                                                              const std::optional<at::Tensor>& y,
                                                              const at::Tensor& excluded, const at::Tensor& tau,
                                                              const at::Tensor& lse, bool need_dy) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Inputs in = prepare(x, y, excluded, tau);
  check_backward_args(grad_lse, x, lse);
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const at::Tensor g = grad_lse.to(acc).contiguous();
  const at::Tensor l = lse.to(acc).contiguous();
  // Gradients accumulate in the accumulation type; y = None: dx takes both roles.
  at::Tensor dx = at::zeros(in.x.sizes(), in.x.options().dtype(acc));
  at::Tensor dy = (y.has_value() && need_dy) ? at::zeros(in.y.sizes(), in.y.options().dtype(acc)) : at::Tensor();
  void* columns_out = y.has_value() ? (dy.defined() ? dy.data_ptr() : nullptr) : dx.data_ptr();
  if (x.size(0) > 0) {
    // On the device, without a synchronization: the column view's scale (lse_math.h).
    const at::Tensor max_abs_coef = g.mul(in.tau.reciprocal()).abs().amax();
    const BackwardArgs b{g.const_data_ptr(), l.const_data_ptr(), max_abs_coef.const_data_ptr()};
    C10_CUDA_CHECK(launch_negative_lse_backward(input_type(x.scalar_type()), in.args, b, dx.data_ptr(), columns_out,
                                                c10::cuda::getCurrentCUDAStream()));
  }
  return {dx.to(x.scalar_type()), dy.defined() ? dy.to(y->scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace
}  // namespace macl::cuda

TORCH_LIBRARY_IMPL(macl_kernels, CUDA, m) {
  m.impl("negative_lse", &macl::cuda::negative_lse_cuda);
  m.impl("negative_lse_backward", &macl::cuda::negative_lse_backward_cuda);
}
