// The CUDA kernels of macl_kernels::negative_lse and its backward (backend "cuda").
//
// A CTA owns a block of BM anchor rows (or, in the column pass, BN candidate columns)
// and walks the other side block by block. Each step builds one BM x BN tile of
// logits in shared memory: tensor-core WMMA tiles for fp16/bf16 inputs (fp32
// accumulators), CUDA-core tiles for fp32/fp64. The forward folds a tile into each
// row's online log-sum-exp; the backward turns it into the weights E and multiplies
// them into the gradient: a pass that owns row blocks (dx += E y) and a pass that
// owns column blocks (dy += E^T x), so every output element has one writer and the
// result is deterministic (no atomics). The per-element math is csrc/lse_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "../lse_math.h"
#include "launch.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "macl_kernels' CUDA kernels need compute capability >= 8.0 (bf16 tensor cores): set TORCH_CUDA_ARCH_LIST"
#endif

namespace macl::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

template <typename In>
constexpr bool kTensorCores = std::is_same_v<In, __half> || std::is_same_v<In, __nv_bfloat16>;

// Tile shapes per input type, sized so that a CTA's shared memory stays under the
// 48 KiB of static shared memory: BM x BN logits, dot products in chunks of KC
// features, gradients in chunks of DC features.
template <typename In>
struct Tiles {
  static constexpr int BM = 64, BN = 64, KC = 32, DC = 64;  // fp16 / bf16
};
template <>
struct Tiles<float> {
  static constexpr int BM = 64, BN = 64, KC = 16, DC = 32;
};
template <>
struct Tiles<double> {
  static constexpr int BM = 32, BN = 32, KC = 16, DC = 32;
};

// Row padding of shared arrays: 16 bytes, which keeps WMMA pointers 32-byte aligned
// and staggers rows across banks.
template <typename T>
constexpr int kPad = 16 / sizeof(T);

__device__ inline float to_acc(float v) { return v; }
__device__ inline double to_acc(double v) { return v; }

template <typename In, typename Acc>
__device__ inline In from_acc(Acc v) {
  if constexpr (std::is_same_v<In, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<In, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<In>(v);
  }
}

// The type whose rounding the products of In see (lse_math.h's weight_operand).
template <typename In>
struct OperandOf {
  using type = In;
};
template <>
struct OperandOf<__half> {
  using type = c10::Half;
};
template <>
struct OperandOf<__nv_bfloat16> {
  using type = c10::BFloat16;
};

// A weight's operand in the input type: p * factor rounded (lse_math.h).
template <typename In, typename Acc>
__device__ inline In weight_operand_of(Acc probability, Acc factor) {
  return static_cast<In>(weight_operand<typename OperandOf<In>::type>(probability, factor));
}

template <typename In, typename Acc>
struct Params {
  const In* x;
  const In* y;
  const int32_t* excluded;
  const Acc* tau;
  const Acc* grad_lse;      // backward only
  const Acc* lse;           // backward only
  const Acc* max_abs_coef;  // backward only: max_r |grad_lse[r] / tau|, for the column view
  Acc* out;             // lse (forward), dx (row pass) or dy (column pass)
  int64_t rows, cols, dim;
};

template <typename In, typename Acc>
struct SharedTiles {
  using T = Tiles<In>;
  static constexpr int kMaxBlock = T::BM > T::BN ? T::BM : T::BN;
  static constexpr int KP = T::KC + kPad<In>;
  static constexpr int DP = T::DC + kPad<In>;
  static constexpr int NP = T::BN + kPad<Acc>;
  static constexpr int OP = T::DC + kPad<Acc>;
  static constexpr int WP = T::BN + kPad<In>;

  union {
    struct {
      alignas(32) In a[T::BM][KP];  // anchors' feature chunk
      alignas(32) In b[T::BN][KP];  // candidates' feature chunk
    } dot;
    alignas(32) In chunk[kMaxBlock][DP];  // the other side's feature chunk, for the gradient product
  } operands;
  union {
    alignas(32) Acc logits[T::BM][NP];        // x.y of the tile (not yet divided by tau)
    alignas(32) Acc product[kMaxBlock][OP];   // a chunk of the gradient product
  } result;
  alignas(32) In weights[T::BM][WP];  // E of the tile, in the input type for the tensor cores
  Acc row_max[T::BM], row_sum[T::BM];  // forward: running log-sum-exp of each row
  Acc row_shift[T::BM], row_factor[T::BM], row_after[T::BM];  // backward: lse and the view's factors
  int32_t row_excluded[T::BM][2];
};

// An M x N accumulator tile on CUDA cores: thread (tr, tc) of an 8 x 16 grid holds
// rows tr + 8 i and columns tc + 16 j.
template <typename In, typename Acc, int M, int N, typename Enable = void>
struct TileAccumulator {
  static_assert(M % 8 == 0 && N % 16 == 0 && kThreads == 128, "8 x 16 thread grid");
  Acc v[M / 8][N / 16];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < M / 8; ++i)
#pragma unroll
      for (int j = 0; j < N / 16; ++j) v[i][j] = Acc(0);
  }

  // v += A B over K, A(m, k) and B(k, n) read from shared memory in the given layouts.
  template <bool kARowMajor, bool kBRowMajor>
  __device__ void mma(const In* A, int lda, const In* B, int ldb, int K) {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
    for (int k = 0; k < K; ++k) {
      Acc a[M / 8], b[N / 16];
#pragma unroll
      for (int i = 0; i < M / 8; ++i) {
        const int m = tr + 8 * i;
        a[i] = to_acc(kARowMajor ? A[m * lda + k] : A[k * lda + m]);
      }
#pragma unroll
      for (int j = 0; j < N / 16; ++j) {
        const int n = tc + 16 * j;
        b[j] = to_acc(kBRowMajor ? B[k * ldb + n] : B[n * ldb + k]);
      }
#pragma unroll
      for (int i = 0; i < M / 8; ++i)
#pragma unroll
        for (int j = 0; j < N / 16; ++j) v[i][j] = fma(a[i], b[j], v[i][j]);
    }
  }

  __device__ void store(Acc* out, int ldo) const {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < M / 8; ++i)
#pragma unroll
      for (int j = 0; j < N / 16; ++j) out[(tr + 8 * i) * ldo + tc + 16 * j] = v[i][j];
  }
};

// The same tile on tensor cores (WMMA 16x16x16, fp32 accumulators): warp w holds
// rows 16 w .. 16 w + 15 and every column.
template <typename In, int M, int N>
struct TileAccumulator<In, float, M, N, std::enable_if_t<kTensorCores<In>>> {
  static_assert(M == 16 * kWarps && N % 16 == 0, "one 16-row strip per warp");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> v[N / 16];

  __device__ void zero() {
#pragma unroll
    for (int j = 0; j < N / 16; ++j) nvcuda::wmma::fill_fragment(v[j], 0.0f);
  }

  template <bool kARowMajor, bool kBRowMajor>
  __device__ void mma(const In* A, int lda, const In* B, int ldb, int K) {
    namespace wmma = nvcuda::wmma;
    using LayoutA = std::conditional_t<kARowMajor, wmma::row_major, wmma::col_major>;
    using LayoutB = std::conditional_t<kBRowMajor, wmma::row_major, wmma::col_major>;
    const int m0 = 16 * (threadIdx.x / 32);
    for (int k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, In, LayoutA> a;
      wmma::load_matrix_sync(a, kARowMajor ? A + m0 * lda + k : A + k * lda + m0, lda);
#pragma unroll
      for (int j = 0; j < N / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, In, LayoutB> b;
        wmma::load_matrix_sync(b, kBRowMajor ? B + k * ldb + 16 * j : B + 16 * j * ldb + k, ldb);
        wmma::mma_sync(v[j], a, b, v[j]);
      }
    }
  }

  __device__ void store(float* out, int ldo) const {
    const int m0 = 16 * (threadIdx.x / 32);
#pragma unroll
    for (int j = 0; j < N / 16; ++j) {
      nvcuda::wmma::store_matrix_sync(out + m0 * ldo + 16 * j, v[j], ldo, nvcuda::wmma::mem_row_major);
    }
  }
};

// Copies rows [row0, row0 + R) x features [k0, k0 + K) of src (n x dim) into dst
// (R x K, leading dimension ld), zero outside src.
template <int R, int K, typename In>
__device__ void load_chunk(In* dst, int ld, const In* src, int64_t row0, int64_t n, int64_t k0, int64_t dim) {
  for (int idx = threadIdx.x; idx < R * K; idx += kThreads) {
    const int r = idx / K, k = idx % K;
    const int64_t row = row0 + r, feature = k0 + k;
    dst[r * ld + k] = (row < n && feature < dim) ? src[row * dim + feature] : from_acc<In>(0.0f);
  }
}

// s.result.logits = x[row0 ...] . y[col0 ...]^T, the BM x BN tile, for all threads.
template <typename In, typename Acc>
__device__ void compute_logits(const Params<In, Acc>& p, SharedTiles<In, Acc>& s, int64_t row0, int64_t col0) {
  using T = Tiles<In>;
  using S = SharedTiles<In, Acc>;
  TileAccumulator<In, Acc, T::BM, T::BN> acc;
  acc.zero();
  for (int64_t k0 = 0; k0 < p.dim; k0 += T::KC) {
    __syncthreads();  // the previous users of the operands (and of result) are done
    load_chunk<T::BM, T::KC>(&s.operands.dot.a[0][0], S::KP, p.x, row0, p.rows, k0, p.dim);
    load_chunk<T::BN, T::KC>(&s.operands.dot.b[0][0], S::KP, p.y, col0, p.cols, k0, p.dim);
    __syncthreads();
    acc.template mma<true, false>(&s.operands.dot.a[0][0], S::KP, &s.operands.dot.b[0][0], S::KP, T::KC);
  }
  acc.store(&s.result.logits[0][0], S::NP);
  __syncthreads();
}

// Which products a backward pass builds (lse_math.h): the row view for dx = E y, the
// column view for dy = E^T x. The forward needs neither.
enum class View { kNone, kRow, kColumn };

// Loads the excluded columns (and in the backward, the shift and the view's factors) of
// the anchors row0 .. row0 + BM - 1 into shared memory.
template <typename In, typename Acc>
__device__ void load_rows(const Params<In, Acc>& p, SharedTiles<In, Acc>& s, int64_t row0, Acc inv_tau, View view) {
  for (int r = threadIdx.x; r < Tiles<In>::BM; r += kThreads) {
    const int64_t row = row0 + r;
    const bool inside = row < p.rows;
    s.row_excluded[r][0] = inside ? p.excluded[2 * row] : -1;
    s.row_excluded[r][1] = inside ? p.excluded[2 * row + 1] : -1;
    if (view != View::kNone) {
      const Acc coef = inside ? p.grad_lse[row] * inv_tau : Acc(0);
      const OperandFactors<Acc> f = view == View::kRow ? row_view_factors(coef)
                                                       : column_view_factors(coef, column_view_scale(*p.max_abs_coef));
      s.row_shift[r] = inside ? weight_shift(p.lse[row]) : Acc(0);
      s.row_factor[r] = f.factor;
      s.row_after[r] = f.after;
    } else {
      s.row_max[r] = negative_infinity<Acc>();
      s.row_sum[r] = Acc(0);
    }
  }
}

// The masked logit of tile entry (r, c), -inf for padding and excluded columns.
template <typename In, typename Acc>
__device__ inline Acc tile_logit(const Params<In, Acc>& p, const SharedTiles<In, Acc>& s, int64_t row0, int64_t col0,
                                 int r, int c, Acc inv_tau) {
  const int64_t column = col0 + c;
  const bool outside = row0 + r >= p.rows || column >= p.cols;
  return masked_logit(s.result.logits[r][c], inv_tau,
                      outside || is_excluded(column, s.row_excluded[r][0], s.row_excluded[r][1]));
}

// s.weights = the operands of the tile's weights E (lse_math.h: p * factor, rounded to
// In; the products are multiplied by the view's `after` when added to the output), 0 on
// padding and excluded entries.
template <typename In, typename Acc>
__device__ void compute_weights(const Params<In, Acc>& p, SharedTiles<In, Acc>& s, int64_t row0, int64_t col0,
                                Acc inv_tau) {
  using T = Tiles<In>;
#pragma unroll 1  // unrolled, fp64's exp calls spill registers in the column pass
  for (int idx = threadIdx.x; idx < T::BM * T::BN; idx += kThreads) {
    const int r = idx / T::BN, c = idx % T::BN;
    const Acc logit = tile_logit(p, s, row0, col0, r, c, inv_tau);
    const Acc probability = logit == negative_infinity<Acc>() ? Acc(0) : exp_of(logit - s.row_shift[r]);
    s.weights[r][c] = weight_operand_of<In>(probability, s.row_factor[r]);
  }
  __syncthreads();
}

// The forward: one CTA per BM anchors, every candidate block in order.
template <typename In, typename Acc>
__global__ void __launch_bounds__(kThreads) negative_lse_kernel(Params<In, Acc> p) {
  using T = Tiles<In>;
  __shared__ SharedTiles<In, Acc> s;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * T::BM;
  const Acc inv_tau = Acc(1) / *p.tau;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_rows(p, s, row0, inv_tau, View::kNone);
  for (int64_t col0 = 0; col0 < p.cols; col0 += T::BN) {
    compute_logits(p, s, row0, col0);
    // A warp folds whole rows: each lane an online log-sum-exp over its columns, then a
    // butterfly merge (symmetric, so every lane agrees) and lane 0 updates the row.
    for (int r = warp; r < T::BM; r += kWarps) {
      Acc max = negative_infinity<Acc>(), sum = Acc(0);
      for (int c = lane; c < T::BN; c += 32) {
        lse_add(max, sum, tile_logit(p, s, row0, col0, r, c, inv_tau));
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        const Acc other_max = __shfl_xor_sync(0xffffffffu, max, offset);
        const Acc other_sum = __shfl_xor_sync(0xffffffffu, sum, offset);
        lse_merge(max, sum, other_max, other_sum);
      }
      if (lane == 0) {
        lse_merge(s.row_max[r], s.row_sum[r], max, sum);
      }
    }
  }
  __syncthreads();
  for (int r = threadIdx.x; r < T::BM; r += kThreads) {
    if (row0 + r < p.rows) {
      p.out[row0 + r] = lse_value(s.row_max[r], s.row_sum[r]);
    }
  }
}

// out[rows of block] += after[r] * result.product (R x DC), for features d0 ..; one
// writer per element. after: the view's factor per product row, or null with `scale`.
template <int R, typename In, typename Acc>
__device__ void add_product(Acc* out, const SharedTiles<In, Acc>& s, int64_t first, int64_t n, int64_t d0,
                            int64_t dim, const Acc* after, Acc scale) {
  constexpr int DC = Tiles<In>::DC;
  for (int idx = threadIdx.x; idx < R * DC; idx += kThreads) {
    const int r = idx / DC, d = idx % DC;
    if (first + r < n && d0 + d < dim) {
      out[(first + r) * dim + d0 + d] += (after != nullptr ? after[r] : scale) * s.result.product[r][d];
    }
  }
}

// The backward's row pass: one CTA per BM anchors, out (= dx) += E y.
template <typename In, typename Acc>
__global__ void __launch_bounds__(kThreads) rows_backward_kernel(Params<In, Acc> p) {
  using T = Tiles<In>;
  using S = SharedTiles<In, Acc>;
  __shared__ S s;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * T::BM;
  const Acc inv_tau = Acc(1) / *p.tau;
  load_rows(p, s, row0, inv_tau, View::kRow);
  for (int64_t col0 = 0; col0 < p.cols; col0 += T::BN) {
    compute_logits(p, s, row0, col0);
    compute_weights(p, s, row0, col0, inv_tau);
    for (int64_t d0 = 0; d0 < p.dim; d0 += T::DC) {
      load_chunk<T::BN, T::DC>(&s.operands.chunk[0][0], S::DP, p.y, col0, p.cols, d0, p.dim);
      __syncthreads();
      TileAccumulator<In, Acc, T::BM, T::DC> acc;
      acc.zero();
      acc.template mma<true, true>(&s.weights[0][0], S::WP, &s.operands.chunk[0][0], S::DP, T::BN);
      acc.store(&s.result.product[0][0], S::OP);
      __syncthreads();
      add_product<T::BM>(p.out, s, row0, p.rows, d0, p.dim, s.row_after, Acc(0));
      __syncthreads();
    }
  }
}

// The backward's column pass: one CTA per BN candidates, out (= dy, or dx when y is x)
// += E^T x, with E built from the anchors' side exactly as in the row pass.
template <typename In, typename Acc>
__global__ void __launch_bounds__(kThreads) columns_backward_kernel(Params<In, Acc> p) {
  using T = Tiles<In>;
  using S = SharedTiles<In, Acc>;
  __shared__ S s;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * T::BN;
  const Acc inv_tau = Acc(1) / *p.tau;
  const Acc scale = column_view_scale(*p.max_abs_coef);  // the column view's `after`
  for (int64_t row0 = 0; row0 < p.rows; row0 += T::BM) {
    __syncthreads();  // the previous block's rows are no longer read
    load_rows(p, s, row0, inv_tau, View::kColumn);
    compute_logits(p, s, row0, col0);  // its barriers publish the rows loaded above
    compute_weights(p, s, row0, col0, inv_tau);
    for (int64_t d0 = 0; d0 < p.dim; d0 += T::DC) {
      load_chunk<T::BM, T::DC>(&s.operands.chunk[0][0], S::DP, p.x, row0, p.rows, d0, p.dim);
      __syncthreads();
      TileAccumulator<In, Acc, T::BN, T::DC> acc;
      acc.zero();
      acc.template mma<false, true>(&s.weights[0][0], S::WP, &s.operands.chunk[0][0], S::DP, T::BM);
      acc.store(&s.result.product[0][0], S::OP);
      __syncthreads();
      add_product<T::BN>(p.out, s, col0, p.cols, d0, p.dim, static_cast<const Acc*>(nullptr), scale);
      __syncthreads();
    }
  }
}

unsigned int blocks(int64_t n, int block) {
  return static_cast<unsigned int>((n + block - 1) / block);
}

template <typename In, typename Acc>
Params<In, Acc> make_params(const LseArgs& a) {
  Params<In, Acc> p{};
  p.x = static_cast<const In*>(a.x);
  p.y = static_cast<const In*>(a.y);
  p.excluded = a.excluded;
  p.tau = static_cast<const Acc*>(a.tau);
  p.rows = a.rows;
  p.cols = a.cols;
  p.dim = a.dim;
  return p;
}

template <typename In, typename Acc>
cudaError_t forward(const LseArgs& args, void* lse, cudaStream_t stream) {
  Params<In, Acc> p = make_params<In, Acc>(args);
  p.out = static_cast<Acc*>(lse);
  negative_lse_kernel<In, Acc><<<blocks(p.rows, Tiles<In>::BM), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename In, typename Acc>
cudaError_t backward(const LseArgs& args, const BackwardArgs& b, void* dx, void* dy, cudaStream_t stream) {
  Params<In, Acc> p = make_params<In, Acc>(args);
  p.grad_lse = static_cast<const Acc*>(b.grad_lse);
  p.lse = static_cast<const Acc*>(b.lse);
  p.max_abs_coef = static_cast<const Acc*>(b.max_abs_coef);
  p.out = static_cast<Acc*>(dx);
  rows_backward_kernel<In, Acc><<<blocks(p.rows, Tiles<In>::BM), kThreads, 0, stream>>>(p);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || dy == nullptr || p.cols == 0) {
    return status;  // (a grid of 0 blocks would be a launch error)
  }
  p.out = static_cast<Acc*>(dy);
  columns_backward_kernel<In, Acc><<<blocks(p.cols, Tiles<In>::BN), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_negative_lse(InputType type, const LseArgs& args, void* lse, cudaStream_t stream) {
  switch (type) {
    case InputType::kFloat32:
      return forward<float, float>(args, lse, stream);
    case InputType::kFloat64:
      return forward<double, double>(args, lse, stream);
    case InputType::kFloat16:
      return forward<__half, float>(args, lse, stream);
    case InputType::kBFloat16:
      return forward<__nv_bfloat16, float>(args, lse, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_negative_lse_backward(InputType type, const LseArgs& args, const BackwardArgs& b, void* dx,
                                         void* dy, cudaStream_t stream) {
  switch (type) {
    case InputType::kFloat32:
      return backward<float, float>(args, b, dx, dy, stream);
    case InputType::kFloat64:
      return backward<double, double>(args, b, dx, dy, stream);
    case InputType::kFloat16:
      return backward<__half, float>(args, b, dx, dy, stream);
    case InputType::kBFloat16:
      return backward<__nv_bfloat16, float>(args, b, dx, dy, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace macl::cuda
