// A CTA's tile of scores and its gradient product on the tensor cores (fp16 / bf16
// inputs, fp32 accumulators), with mma.sync m16n8k16 fed by ldmatrix from shared memory.
//
// The CTA has 4 warps; each owns kRowBlocks blocks of 16 rows (kOwned = 64 kRowBlocks
// rows per CTA) and meets kStreamed = 64 streamed rows per tile. Warp w holds the scores
// of its rows in the m16n8 accumulator layout: lane l (g = l / 4, t = l % 4) holds, of row
// block b, rows 16 (kRowBlocks w + b) + g and + 8, and of each 8-column block, columns
// 8 block + 2 t and + 1: 2 kRowBlocks x 16 scores per thread. Two row blocks (the
// forward) use each streamed fragment for both, halving the per-score share of its
// ldmatrix, of the copies and of the loop; the gradient passes keep one (their product's
// accumulators take the registers). The same registers, rounded to the input type in
// pairs, are the A operand of the product with the streamed rows (P . B, as
// FlashAttention-2 does): no trip through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../lse_math.h"
#include "ptx.cuh"

namespace macl::cuda {

template <typename In, int kRowBlocks = 1>
struct MmaTile {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kOwned = 16 * kRowBlocks * kWarps;  // rows per CTA
  static constexpr int kStreamed = 64;        // rows per streamed tile
  static constexpr int kBlocks = kStreamed / 8;  // 8-column blocks of the scores
  static constexpr int kRows = 2 * kRowBlocks;  // owned rows per thread
  static constexpr int kCols = 2 * kBlocks;    // streamed columns per thread and row
  static constexpr int kRowLanes = 4;          // lanes sharing a row (a quad)
  // Gradient features per CTA (registers: 64 per thread), and the chunked layout's step
  // (tile_stream.cuh): 64 features for two row blocks (the forward, no product), so that
  // two stages of 128 owned rows fit in 99 KiB of shared memory.
  static constexpr int kOutput = 128 / kRowBlocks;
  static constexpr int kStep = 16;             // features per mma
  static constexpr int kScratchBytes = 0;      // (the weights stay in registers)
  static constexpr int kSlackBytes = kOutput * sizeof(In);  // read past the streamed rows' end

  float s[kRowBlocks][kBlocks][4];  // scores: element (i, j) is s[i / 2][j / 2][2 (i % 2) + j % 2]
  uint32_t operand[kRows][kCols / 2];  // the weights as input-type pairs, columns (2 k, 2 k + 1)

  __device__ explicit MmaTile(void*) {}

  __device__ static int warp() { return threadIdx.x / 32; }
  __device__ static int lane() { return threadIdx.x % 32; }
  // The CTA-local owned row of this thread's row i, and the streamed column of its column j.
  __device__ static int row(int i) { return 16 * (kRowBlocks * warp() + i / 2) + lane() / 4 + 8 * (i % 2); }
  __device__ static int col(int j) { return 8 * (j / 2) + 2 * (lane() % 4) + j % 2; }

  __device__ float& at(int i, int j) { return s[i / 2][j / 2][2 * (i % 2) + j % 2]; }

  // s = A B^T (or s += A B^T when `accumulate`) over `features` (a multiple of kStep): A
  // the owned rows, B the streamed rows, both row-major in shared memory with leading
  // dimensions lda, ldb (in elements).
  __device__ void add_scores(const In* a, int lda, const In* b, int ldb, int features, bool accumulate) {
    const int l = lane();
    // ldmatrix rows: A's 16 x 16 block as (rows 0-7, 8-15) x (features 0-7, 8-15); B's as
    // (columns 0-7: features 0-7, 8-15; columns 8-15: features 0-7, 8-15). Shared-memory
    // addresses in bytes, one per 16-row block of A and 16-column pair of B, advanced 32
    // bytes per step.
    uint32_t a_rows[kRowBlocks];
#pragma unroll
    for (int rb = 0; rb < kRowBlocks; ++rb) {
      a_rows[rb] = ptx::shared_address(a + (16 * (kRowBlocks * warp() + rb) + l % 16) * lda + (l / 16) * 8);
    }
    uint32_t b_rows[kBlocks / 2];
#pragma unroll
    for (int pair = 0; pair < kBlocks / 2; ++pair) {
      b_rows[pair] = ptx::shared_address(b + (16 * pair + (l / 16) * 8 + l % 8) * ldb + ((l / 8) % 2) * 8);
    }
    // One step: features [k, k + 16) of every row block against every column pair.
    auto step = [&](int k, bool first) {
      uint32_t fa[kRowBlocks][4];
#pragma unroll
      for (int rb = 0; rb < kRowBlocks; ++rb) ptx::ldmatrix_x4(fa[rb], a_rows[rb] + k * sizeof(In));
#pragma unroll
      for (int pair = 0; pair < kBlocks / 2; ++pair) {
        uint32_t fb[4];
        ptx::ldmatrix_x4(fb, b_rows[pair] + k * sizeof(In));
#pragma unroll
        for (int rb = 0; rb < kRowBlocks; ++rb) {
          if (first) {  // overwrites s: no zeroing
            ptx::mma_m16n8k16_first<In>(s[rb][2 * pair], fa[rb], fb[0], fb[1]);
            ptx::mma_m16n8k16_first<In>(s[rb][2 * pair + 1], fa[rb], fb[2], fb[3]);
          } else {
            ptx::mma_m16n8k16<In>(s[rb][2 * pair], fa[rb], fb[0], fb[1]);
            ptx::mma_m16n8k16<In>(s[rb][2 * pair + 1], fa[rb], fb[2], fb[3]);
          }
        }
      }
    };
    int k = 0;
    if (!accumulate) {
      step(0, true);
      k = kStep;
    }
#pragma unroll 2
    for (; k < features; k += kStep) step(k, false);
  }

  // Columns j, j + 1 (j even) of row i as product operands: p * factor rounded to In
  // (lse_math.h's weight_operand, both at once).
  template <typename Operand>
  __device__ void set_operands(int i, int j, float p0, float f0, float p1, float f1) {
    operand[i][j / 2] = weight_operand_pair<Operand>(p0, f0, p1, f1);
  }

  // The A fragment of the gradient product for streamed columns [16 kk, 16 kk + 16): the
  // operands of both rows, as mma.m16n8k16 takes them.
  __device__ void a_fragment(int kk, uint32_t (&fa)[4]) const {
    fa[0] = operand[0][2 * kk];
    fa[1] = operand[1][2 * kk];
    fa[2] = operand[0][2 * kk + 1];
    fa[3] = operand[1][2 * kk + 1];
  }

  // Entry (i, j) as a zero operand.
  __device__ void clear_operand(int i, int j) { operand[i][j / 2] &= j % 2 == 0 ? 0xffff0000u : 0x0000ffffu; }

  // The gradient product: out (kOutput features per owned row) += weights . B.
  struct Product {
    static constexpr int kBlocks = kOutput / 8;
    static constexpr int kFeatures = 2 * kBlocks;  // per thread and row
    float o[kBlocks][4];  // element (i, d): o[d / 2][2 i + d % 2], feature 8 (d / 2) + 2 t + d % 2

    __device__ static int feature(int d) { return 8 * (d / 2) + 2 * (lane() % 4) + d % 2; }
    __device__ float& at(int i, int d) { return o[d / 2][2 * i + d % 2]; }

    __device__ void zero() {
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[b][e] = 0.0f;
      }
    }

    // o += W B for the tile's operands W (16 x 64 per warp) and kOutput features of the
    // streamed rows B (row-major, leading dimension ldb). Features past the rows' end are
    // read too (they only reach output features that are never written; the shared
    // allocation has kSlackBytes past its end for them).
    __device__ void add(const MmaTile& w, const In* b, int ldb) {
      static_assert(kRowBlocks == 1, "the gradient product takes one row block per warp");
      const uint32_t b_rows = b_address(b, ldb);
#pragma unroll
      for (int kk = 0; kk < kStreamed / 16; ++kk) {
        uint32_t fa[4];
        w.a_fragment(kk, fa);
        const uint32_t rows = b_rows + 16 * kk * ldb * sizeof(In);
#pragma unroll
        for (int pair = 0; pair < kBlocks / 2; ++pair) {
          uint32_t fb[4];
          ptx::ldmatrix_x4_trans(fb, rows + 16 * pair * sizeof(In));
          ptx::mma_m16n8k16<In>(o[2 * pair], fa, fb[0], fb[1]);
          ptx::mma_m16n8k16<In>(o[2 * pair + 1], fa, fb[2], fb[3]);
        }
      }
    }

    // o += scale * (W B), as add otherwise: the tile's product for 16 features at a time
    // in fresh fp32 accumulators (8 registers), each row i multiplied by scale[i] and added
    // to o (lse_math.h's fp16 views: the column view's scale per tile of anchors, the
    // symmetric view's per output row and streamed tile).
    __device__ void add_scaled(const MmaTile& w, const In* b, int ldb, const float (&scale)[kRows]) {
      static_assert(kRowBlocks == 1, "the gradient product takes one row block per warp");
      const uint32_t b_rows = b_address(b, ldb);
#pragma unroll
      for (int pair = 0; pair < kBlocks / 2; ++pair) {
        float part[2][4];
#pragma unroll
        for (int kk = 0; kk < kStreamed / 16; ++kk) {
          uint32_t fa[4], fb[4];
          w.a_fragment(kk, fa);
          ptx::ldmatrix_x4_trans(fb, b_rows + (16 * kk * ldb + 16 * pair) * sizeof(In));
          if (kk == 0) {
            ptx::mma_m16n8k16_first<In>(part[0], fa, fb[0], fb[1]);
            ptx::mma_m16n8k16_first<In>(part[1], fa, fb[2], fb[3]);
          } else {
            ptx::mma_m16n8k16<In>(part[0], fa, fb[0], fb[1]);
            ptx::mma_m16n8k16<In>(part[1], fa, fb[2], fb[3]);
          }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          o[2 * pair][e] = fmaf(scale[e / 2], part[0][e], o[2 * pair][e]);
          o[2 * pair + 1][e] = fmaf(scale[e / 2], part[1][e], o[2 * pair + 1][e]);
        }
      }
    }

    // The same scale for every row.
    __device__ void add_scaled(const MmaTile& w, const In* b, int ldb, float scale) {
      const float each[kRows] = {scale, scale};
      add_scaled(w, b, ldb, each);
    }

   private:
    // ldmatrix.trans rows: B's 16 x 16 block as (rows 0-15) x (features 0-7, 8-15).
    __device__ static uint32_t b_address(const In* b, int ldb) {
      const int l = lane();
      return ptx::shared_address(b + (l % 16) * ldb + (l / 16) * 8);
    }
  };
};

}  // namespace macl::cuda
