// The CUDA kernels' entry points, on raw pointers, so that negative_lse_kernels.cu
// needs no ATen headers (fast nvcc builds) and negative_lse_cuda.cpp owns the tensors.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace macl::cuda {

enum class InputType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// The row length (in elements) the kernels read: dim rounded up to their feature step
// (16 values for fp16/bf16, 16 bytes for float32/float64).
int64_t padded_features(InputType type, int64_t dim);

// x and y are "padded operands": row r starts at r * ld elements, 16-byte aligned, and
// features [dim, ld) are zeros (ld = padded_features(type, dim)). Every pointer is on
// the current device; floating-point arguments other than x and y are in the
// accumulation type (float64 for float64 inputs, else float32).
struct LseArgs {
  const void* x;            // rows x ld anchors, input dtype
  const void* y;            // cols x ld candidates, input dtype; equal to x when y is None
  const int32_t* excluded;  // rows x 2 excluded columns per anchor, -1 for none
  const void* tau;          // one value
  int64_t rows, cols, dim, ld;
};

// lse (rows values): the negatives' log-sum-exp of each anchor.
cudaError_t launch_negative_lse(InputType type, const LseArgs& args, void* lse, cudaStream_t stream);

// lse as launch_negative_lse, and P y (rows x dim, contiguous, accumulation type): P[r, c] =
// exp(x[r].y[c] / tau - lse[r]) on the negative columns, 0 elsewhere (a row without
// negatives: lse = -inf, a zero row).
cudaError_t launch_negative_lse_product(InputType type, const LseArgs& args, void* lse, void* product,
                                        cudaStream_t stream);

// The backward's per-anchor inputs, in the accumulation type, on the device, and its
// scratch (backward_workspace_bytes(type, rows) bytes, 16-byte aligned).
struct BackwardArgs {
  const void* grad_lse;      // rows values
  const void* lse;           // rows values
  // max |grad_lse[r] / tau| over each group of column_scale_rows(type is fp16, rows)
  // anchors (lse_math.h's column view): one value per group
  const void* max_abs_coef;
  // y = None only (else null): {shift, one_exp, weight scale}, the symmetric pass's shared
  // shift (symmetric_grad.cuh): min over the rows with a finite lse of lse log2(e); 1 if
  // the spread of those values is at most kSymmetricMaxSpread (lse_math.h), else 0; and
  // column_view_scale(max |grad_lse / tau|)
  const void* shared_shift;
  void* workspace;
};

size_t backward_workspace_bytes(InputType type, int64_t rows);

// dx (rows x dim, contiguous) = E y unless dx is null (then dx comes from the product
// forward's P y); then, if dy is not null, dy (cols x dim) = E^T x; or, when dy is dx
// (y is x), dx = (E + E^T) x in one pass; with E[r, c] = grad_lse[r] / tau *
// exp(x[r].y[c] / tau - lse[r]) on negative columns (lse_math.h's rounding rules for
// fp16/bf16 inputs).
cudaError_t launch_negative_lse_backward(InputType type, const LseArgs& args, const BackwardArgs& b, void* dx,
                                         void* dy, cudaStream_t stream);

}  // namespace macl::cuda
