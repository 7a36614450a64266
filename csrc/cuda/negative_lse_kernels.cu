// The CUDA kernels of macl_kernels::negative_lse and its backward (backend "cuda"): the
// entry points of launch.h, which run launch_plan.cuh's kernels (kernels.cuh) on the GPU.
//
// Five kernels per input type (fp16 and bf16 on the tensor cores, float32 and float64
// on the CUDA cores), each a CTA that owns a block of rows and streams the other side's
// rows through shared memory (tile_stream.cuh: 16-byte cp.async copies, two stages),
// with the scores of one owned block x streamed tile in registers (mma_tile.cuh,
// simt_tile.cuh). A forward is one kernel; a backward with candidates y is the row pass
// and, when dy is needed, the column pass; a backward without (y = None, the anchors are
// the candidates, ntxent) is the symmetric pass alone:
//
//   negative_lse_forward     owns anchors, streams the candidates; sums each row's terms
//                            exp2(logit2 - log2(e) / tau) in registers (the fixed shift of
//                            kernels.cuh: no running maximum, one exp2 per score), merged
//                            across the row's lanes at the end; a CTA with a row whose sum
//                            the fixed shift cannot hold redoes its rows with the online
//                            log-sum-exp (running max and sum, base 2).
//   negative_lse_forward_product  (forward_product.cuh; op negative_lse_product, the layouts
//                            with candidates when dx will be needed) owns anchors, streams
//                            the candidates: the lse and P y for one chunk of features
//                            (grid.y), FlashAttention-2's online softmax (running max and
//                            sum per row, the product rescaled when the max rises, terms
//                            <= 1 as the product's operands). The backward's dx is then
//                            (h / tau) P y: the row pass below does not run (need_dx false).
//   negative_lse_rows_grad   owns anchors, streams candidates: dx = E y for one chunk of
//                            gradient features (grid.y), accumulated in registers over the
//                            whole candidate loop and written once (candidates whose
//                            forward kept no P y).
//   negative_lse_cols_grad   owns candidates, streams anchors: dy = E^T x, likewise.
//   negative_lse_column_params  (setup, O(rows)) the per-anchor records the column pass
//                            streams with the anchors.
//   negative_lse_symmetric_grad  (symmetric_grad.cuh) owns anchors, streams anchors: dx =
//                            (E + E^T) x, each entry's operand holding both weights from one
//                            score and (through a shared shift) one exp2; launched as two
//                            variants, one exp per score or two (a spread of the rows' lse
//                            too wide for one shift), of which the one that is not the case
//                            returns at once. Its setup negative_lse_symmetric_params writes
//                            the per-anchor records (O(rows)).
//
// Every output element has one writer and the candidates are summed in a fixed order:
// deterministic, no atomics. exp is exp2 with log2(e) / tau folded into one FMA; the
// backward's weights are rounded as lse_math.h says (weight_operand).
//
// The inner loop, for the codegen report: the loop over streamed tiles in
// tile_stream.cuh's stream_tiles, the loop that holds a barrier and issues the copies. In
// the resident layout (the owned rows and two stages of streamed rows fit in shared
// memory: D up to 576 for fp16/bf16 on sm_90, 416 on sm_80; for the forward's 128 owned
// rows 432 and 304) an iteration is one tile: wait for its copies, issue the next tile's,
// the scores (add_scores), the kernel's epilogue. Per thread and iteration:
//   fp16/bf16 (MmaTile)  gradient passes and forward_product: 64 owned x 64 streamed rows,
//                        4 warps of 16 owned rows: 2 rows x 16 columns = 32 score elements
//                        per thread. Scores: D / 16 steps of 5 ldmatrix.x4 and 8
//                        HMMA.16816; the product (P y, or the gradient) adds
//                        32 ldmatrix.x4.trans and 64 HMMA (128 gradient features), and the
//                        fp16 column and symmetric passes 64 FFMA (the tile's scales,
//                        lse_math.h); the symmetric pass adds an FADD (FFMA for fp16) and
//                        an FMUL per score (alpha[i] + alpha[j], times the exp), the
//                        streamed anchors' alphas from shared memory and the check of
//                        their exclusions.
//                        Forward: 128 x 64, 4 warps of 2 x 16 owned rows: 64 elements per
//                        thread; D / 16 steps of 6 ldmatrix.x4 and 16 HMMA.
//   float32 (SimtTile)   64 x 32, one owned row per thread: 32 elements per thread.
//   float64 (SimtTile)   64 x 16: 16 elements per thread.
// Nested in it: the k loop of add_scores (two steps per iteration for fp16/bf16), the
// cp.async copy loop (each streamed row copied by 2 threads for fp16/bf16, 4 copies of 16
// bytes per iteration: D / 64 iterations), the gradient product of SimtTile. The paths for
// masked tiles (excluded or missing columns, for the symmetric pass either way), the
// chunked layout, the forward's repair, the forward_product's rescale of a row whose max
// rises and copies left over from whole iterations sit behind tile_stream.cuh's rare();
// tools/cuda_inner_loops.py builds with each rare path replaced by a trap
// (-DMACL_CUDA_COMMON_PATH_ONLY) and counts instructions per element.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "launch.h"
#include "launch_plan.cuh"

namespace macl::cuda {
namespace {

// Launches on the current device and a stream.
class CudaRunner {
 public:
  explicit CudaRunner(cudaStream_t stream) : stream_(stream) {}

  int max_shared() const {
    int device = 0, bytes = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      return 48 * 1024;  // every device has this much (the error resurfaces at the launch)
    }
    return bytes;
  }

  template <typename... Params, typename... Args>
  cudaError_t launch(void (*kernel)(Params...), dim3 grid, int threads, size_t shared_bytes, Args... args) const {
    if (grid.x == 0 || grid.y == 0) {
      return cudaSuccess;  // (a grid of 0 blocks would be a launch error)
    }
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (status != cudaSuccess) {
      return status;
    }
    kernel<<<grid, threads, shared_bytes, stream_>>>(args...);
    return cudaGetLastError();
  }

 private:
  cudaStream_t stream_;
};

}  // namespace

int64_t padded_features(InputType type, int64_t dim) {
  return padded_features_of(type, dim);
}

size_t backward_workspace_bytes(InputType type, int64_t rows) {
  return backward_workspace_bytes_of(type, rows);
}

cudaError_t launch_negative_lse(InputType type, const LseArgs& args, void* lse, cudaStream_t stream) {
  CudaRunner runner(stream);
  return run_forward(runner, type, args, lse);
}

cudaError_t launch_negative_lse_product(InputType type, const LseArgs& args, void* lse, void* product,
                                        cudaStream_t stream) {
  CudaRunner runner(stream);
  return run_forward_product(runner, type, args, lse, product);
}

cudaError_t launch_negative_lse_backward(InputType type, const LseArgs& args, const BackwardArgs& b, void* dx,
                                         void* dy, cudaStream_t stream) {
  CudaRunner runner(stream);
  return run_backward(runner, type, args, b, dx, dy);
}

}  // namespace macl::cuda
