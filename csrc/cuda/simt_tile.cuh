// A CTA's tile of scores and its gradient product on the CUDA cores (float32 and float64
// inputs, IEEE FMAs in the input type): the interface of MmaTile with another layout.
//
// Thread t owns row t of the CTA's kOwned = kThreads rows and holds all kStreamed scores of
// that row against a streamed tile, so a row needs no shuffles. Its own row is read from
// shared memory 16 bytes at a time; the streamed rows are the same address for every
// lane of a warp (broadcast reads, no bank conflicts). Its weights go to its own row of
// shared memory, and the product reads them back one at a time against 16-byte vectors
// of the streamed rows (again broadcast).
#pragma once

#include <cstdint>

#include "../lse_math.h"

namespace macl::cuda {

template <typename T>
struct Vec16;  // 16 bytes of T
template <>
struct alignas(16) Vec16<float> {
  static constexpr int kSize = 4;
  float v[4];
};
template <>
struct alignas(16) Vec16<double> {
  static constexpr int kSize = 2;
  double v[2];
};

template <typename In, int kThreadCount, int kStreamedRows, int kOutputFeatures>
struct SimtTile {
  using V = Vec16<In>;
  static constexpr int kThreads = kThreadCount;
  static constexpr int kOwned = kThreads;
  static constexpr int kStreamed = kStreamedRows;
  static constexpr int kRows = 1;
  static constexpr int kCols = kStreamed;
  static constexpr int kRowLanes = 1;
  static constexpr int kOutput = kOutputFeatures;
  static constexpr int kStep = V::kSize;
  // Each thread's weights go through its own row of shared memory (stride kStreamed + 1:
  // conflict-free), so that the product can walk them with a run-time index.
  static constexpr int kScratchStride = kStreamed + 1;
  static constexpr int kScratchBytes = kOwned * kScratchStride * sizeof(In);
  static constexpr int kSlackBytes = kOutput * sizeof(In);  // read past the streamed rows' end

  In s[kCols];     // scores, then weights
  In* weights;     // this thread's scratch row

  __device__ explicit SimtTile(void* scratch) : weights(static_cast<In*>(scratch) + threadIdx.x * kScratchStride) {}

  __device__ static int row(int) { return threadIdx.x; }
  __device__ static int col(int j) { return j; }

  __device__ In& at(int, int j) { return s[j]; }

  // s = A B^T (or s += A B^T when `accumulate`) over `features` (a multiple of kStep), A
  // the owned rows, B the streamed rows.
  __device__ void add_scores(const In* a, int lda, const In* b, int ldb, int features, bool accumulate) {
    if (!accumulate) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) s[j] = In(0);
    }
    const In* a_row = a + threadIdx.x * lda;
#pragma unroll 1
    for (int k = 0; k < features; k += kStep) {
      const V av = *reinterpret_cast<const V*>(a_row + k);
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const V bv = *reinterpret_cast<const V*>(b + j * ldb + k);
#pragma unroll
        for (int e = 0; e < kStep; ++e) s[j] = fma(av.v[e], bv.v[e], s[j]);
      }
    }
  }

  // Columns j, j + 1 as product operands: p * factor (lse_math.h's weight_operand, no
  // rounding: In is the accumulation type).
  template <typename Operand>
  __device__ void set_operands(int, int j, In p0, In f0, In p1, In f1) {
    weights[j] = weight_operand<Operand>(p0, f0);
    weights[j + 1] = weight_operand<Operand>(p1, f1);
  }

  __device__ void clear_operand(int, int j) { weights[j] = In(0); }

  struct Product {
    static constexpr int kFeatures = kOutput;  // per thread and row
    In o[kOutput];  // element (0, d): feature d

    __device__ static int feature(int d) { return d; }
    __device__ In& at(int, int d) { return o[d]; }

    __device__ void zero() {
#pragma unroll
      for (int d = 0; d < kOutput; ++d) o[d] = In(0);
    }

    // o += w B for kOutput features of the streamed rows B (leading dimension ldb).
    // Features past the rows' end are read too (they only reach output features that are
    // never written; the shared allocation has kSlackBytes past its end for them).
    __device__ void add(const SimtTile& w, const In* b, int ldb) {
#pragma unroll 2
      for (int j = 0; j < kCols; ++j) {
        const In weight = w.weights[j];
#pragma unroll
        for (int d = 0; d < kOutput; d += kStep) {
          const V bv = *reinterpret_cast<const V*>(b + j * ldb + d);
#pragma unroll
          for (int e = 0; e < kStep; ++e) o[d + e] = fma(weight, bv.v[e], o[d + e]);
        }
      }
    }
  };
};

}  // namespace macl::cuda
