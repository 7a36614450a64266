// The CUDA kernels' entry points, on raw pointers, so that negative_lse_kernels.cu
// needs no ATen headers (fast nvcc builds) and negative_lse_cuda.cpp owns the tensors.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace macl::cuda {

enum class InputType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Every pointer is on the current device, row-major and contiguous. Floating-point
// arguments other than x and y are in the accumulation type (float64 for float64
// inputs, else float32).
struct LseArgs {
  const void* x;            // rows x dim anchors, input dtype
  const void* y;            // cols x dim candidates, input dtype; equal to x when y is None
  const int32_t* excluded;  // rows x 2 excluded columns per anchor, -1 for none
  const void* tau;          // one value
  int64_t rows, cols, dim;
};

// lse (rows values): the negatives' log-sum-exp of each anchor.
cudaError_t launch_negative_lse(InputType type, const LseArgs& args, void* lse, cudaStream_t stream);

// The backward's per-anchor inputs, in the accumulation type, on the device.
struct BackwardArgs {
  const void* grad_lse;      // rows values
  const void* lse;           // rows values
  const void* max_abs_coef;  // one value: max_r |grad_lse[r] / tau| (lse_math.h's column view)
};

// dx (rows x dim, zero-filled by the caller) += E y; then, if dy is not null,
// dy (cols x dim, zero-filled, or dx itself when y is x) += E^T x, with
// E[r, c] = grad_lse[r] / tau * exp(x[r].y[c] / tau - lse[r]) on negative columns.
cudaError_t launch_negative_lse_backward(InputType type, const LseArgs& args, const BackwardArgs& b, void* dx,
                                         void* dy, cudaStream_t stream);

}  // namespace macl::cuda
