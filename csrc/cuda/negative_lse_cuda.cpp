// The CUDA registrations of the ops: the host side of op_host.h with launches on the
// current stream of the inputs' device; the kernels are in negative_lse_kernels.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "launch.h"
#include "op_host.h"

namespace macl::cuda {
namespace {

Inputs prepare(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& excluded,
               const at::Tensor& tau) {
  TORCH_CHECK(x.is_cuda(), "negative_lse: the CUDA kernels need CUDA tensors, got ", x.device());
  return Inputs(x, y, excluded, tau, &padded_features);
}

at::Tensor negative_lse_cuda(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& excluded,
                             const at::Tensor& tau) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return negative_lse_with(prepare(x, y, excluded, tau), [&](InputType type, const LseArgs& args, void* lse) {
    C10_CUDA_CHECK(launch_negative_lse(type, args, lse, stream));
  });
}

std::tuple<at::Tensor, at::Tensor> negative_lse_product_cuda(const at::Tensor& x, const at::Tensor& y,
                                                             const at::Tensor& excluded, const at::Tensor& tau) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return negative_lse_product_with(
      prepare(x, y, excluded, tau),
      [&](InputType type, const LseArgs& args, void* lse, void* product) {
        C10_CUDA_CHECK(launch_negative_lse_product(type, args, lse, product, stream));
      },
      [](at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); });
}

std::tuple<at::Tensor, at::Tensor> negative_lse_backward_cuda(const at::Tensor& grad_lse, const at::Tensor& x,
                                                              const std::optional<at::Tensor>& y,
                                                              const at::Tensor& excluded, const at::Tensor& tau,
                                                              const at::Tensor& lse, bool need_dy, bool need_dx) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Inputs in = prepare(x, y, excluded, tau);
  check_backward_args(grad_lse, x, lse);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return negative_lse_backward_with(
      in, grad_lse, lse, y.has_value(), need_dy, need_dx, x.scalar_type(),
      [&](InputType type, const LseArgs& args, const BackwardArgs& b, void* dx, void* dy) {
        C10_CUDA_CHECK(launch_negative_lse_backward(type, args, b, dx, dy, stream));
      },
      [](at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); });
}

}  // namespace
}  // namespace macl::cuda

TORCH_LIBRARY_IMPL(macl_kernels, CUDA, m) {
  m.impl("negative_lse", &macl::cuda::negative_lse_cuda);
  m.impl("negative_lse_product", &macl::cuda::negative_lse_product_cuda);
  m.impl("negative_lse_backward", &macl::cuda::negative_lse_backward_cuda);
}
