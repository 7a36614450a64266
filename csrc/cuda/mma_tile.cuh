// A CTA's tile of scores and its gradient product on the tensor cores (fp16 / bf16
// inputs, fp32 accumulators), with mma.sync m16n8k16 fed by ldmatrix from shared memory.
//
// The CTA owns kOwned = 64 rows (4 warps x 16) and meets kStreamed = 64 streamed rows per
// tile. Warp w holds the 16 x 64 scores of its rows in the m16n8 accumulator layout:
// lane l (g = l / 4, t = l % 4) holds rows 16 w + g and 16 w + g + 8 (i = 0, 1) and, of
// each 8-column block b, columns 8 b + 2 t and + 1: 2 x 16 scores per thread. The same
// registers, rounded to the input type in pairs, are the A operand of the product with
// the streamed rows (P . B, as FlashAttention-2 does): no trip through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ptx.cuh"

namespace macl::cuda {

template <typename In>
struct MmaTile {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kOwned = 16 * kWarps;  // rows per CTA
  static constexpr int kStreamed = 64;        // rows per streamed tile
  static constexpr int kBlocks = kStreamed / 8;  // 8-column blocks of the scores
  static constexpr int kRows = 2;              // owned rows per thread
  static constexpr int kCols = 2 * kBlocks;    // streamed columns per thread and row
  static constexpr int kRowLanes = 4;          // lanes sharing a row (a quad)
  static constexpr int kOutput = 128;          // gradient features per CTA (registers: 64 per thread)
  static constexpr int kStep = 16;             // features per mma
  static constexpr int kScratchBytes = 0;      // (the weights stay in registers)

  float s[kBlocks][4];                // scores, then weights: element (i, j) is s[j / 2][2 i + j % 2]
  uint32_t operand[kRows][kCols / 2];  // the weights as input-type pairs, columns (2 k, 2 k + 1)

  __device__ explicit MmaTile(void*) {}

  __device__ static int warp() { return threadIdx.x / 32; }
  __device__ static int lane() { return threadIdx.x % 32; }
  // The CTA-local owned row of this thread's row i, and the streamed column of its column j.
  __device__ static int row(int i) { return 16 * warp() + lane() / 4 + 8 * i; }
  __device__ static int col(int j) { return 8 * (j / 2) + 2 * (lane() % 4) + j % 2; }

  __device__ float& at(int i, int j) { return s[j / 2][2 * i + j % 2]; }

  __device__ void zero() {
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[b][e] = 0.0f;
    }
  }

  // s += A B^T over `features` (a multiple of kStep): A the owned rows, B the streamed rows,
  // both row-major in shared memory with leading dimensions lda, ldb (in elements).
  __device__ void add_scores(const In* a, int lda, const In* b, int ldb, int features) {
    const int l = lane();
    // ldmatrix rows: A's 16 x 16 block as (rows 0-7, 8-15) x (features 0-7, 8-15); B's as
    // (columns 0-7: features 0-7, 8-15; columns 8-15: features 0-7, 8-15).
    const In* a_row = a + (16 * warp() + l % 16) * lda + (l / 16) * 8;
    const In* b_row = b + ((l / 16) * 8 + l % 8) * ldb + ((l / 8) % 2) * 8;
#pragma unroll 2
    for (int k = 0; k < features; k += kStep) {
      uint32_t fa[4];
      ptx::ldmatrix_x4(fa, a_row + k);
#pragma unroll
      for (int pair = 0; pair < kBlocks / 2; ++pair) {
        uint32_t fb[4];
        ptx::ldmatrix_x4(fb, b_row + 16 * pair * ldb + k);
        ptx::mma_m16n8k16<In>(s[2 * pair], fa, fb[0], fb[1]);
        ptx::mma_m16n8k16<In>(s[2 * pair + 1], fa, fb[2], fb[3]);
      }
    }
  }

  // Columns j, j + 1 (j even) of row i as product operands (lse_math.h's weight_operand).
  template <typename Operand>
  __device__ void set_operands(int i, int j, Operand w0, Operand w1) {
    operand[i][j / 2] = static_cast<uint32_t>(w0.x) | (static_cast<uint32_t>(w1.x) << 16);
  }

  // Entry (i, j) as a zero operand.
  __device__ void clear_operand(int i, int j) { operand[i][j / 2] &= j % 2 == 0 ? 0xffff0000u : 0x0000ffffu; }

  // The gradient product: out (kOutput features per owned row) += weights . B.
  struct Product {
    static constexpr int kBlocks = kOutput / 8;
    static constexpr int kFeatures = 2 * kBlocks;  // per thread and row
    float o[kBlocks][4];  // element (i, d): o[d / 8][2 i + d % 2], feature 8 (d / 8) + 2 t + d % 2

    __device__ static int feature(int d) { return 8 * (d / 2) + 2 * (lane() % 4) + d % 2; }
    __device__ float& at(int i, int d) { return o[d / 2][2 * i + d % 2]; }

    __device__ void zero() {
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[b][e] = 0.0f;
      }
    }

    // o += W B[:, 0 : features] for the tile's operands W (16 x 64 per warp) and the
    // streamed rows B (64 x features, row-major, leading dimension ldb); features is a
    // multiple of 16, at most kOutput.
    __device__ void add(const MmaTile& w, const In* b, int ldb, int features) {
      const int l = lane();
      // ldmatrix.trans rows: B's 16 x 16 block as (rows 0-15) x (features 0-7, 8-15).
      const In* b_row = b + (l % 16) * ldb + (l / 16) * 8;
#pragma unroll
      for (int kk = 0; kk < kStreamed / 16; ++kk) {
        const uint32_t fa[4] = {w.operand[0][2 * kk], w.operand[1][2 * kk], w.operand[0][2 * kk + 1],
                                w.operand[1][2 * kk + 1]};
#pragma unroll
        for (int pair = 0; pair < kBlocks / 2; ++pair) {
          if (16 * pair < features) {
            uint32_t fb[4];
            ptx::ldmatrix_x4_trans(fb, b_row + 16 * kk * ldb + 16 * pair);
            ptx::mma_m16n8k16<In>(o[2 * pair], fa, fb[0], fb[1]);
            ptx::mma_m16n8k16<In>(o[2 * pair + 1], fa, fb[2], fb[3]);
          }
        }
      }
    }
  };
};

}  // namespace macl::cuda
