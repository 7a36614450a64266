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

#include "../lse_math.h"
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
  static constexpr int kSlackBytes = kOutput * sizeof(In);  // read past the streamed rows' end

  float s[kBlocks][4];                // scores, then weights: element (i, j) is s[j / 2][2 i + j % 2]
  uint32_t operand[kRows][kCols / 2];  // the weights as input-type pairs, columns (2 k, 2 k + 1)

  __device__ explicit MmaTile(void*) {}

  __device__ static int warp() { return threadIdx.x / 32; }
  __device__ static int lane() { return threadIdx.x % 32; }
  // The CTA-local owned row of this thread's row i, and the streamed column of its column j.
  __device__ static int row(int i) { return 16 * warp() + lane() / 4 + 8 * i; }
  __device__ static int col(int j) { return 8 * (j / 2) + 2 * (lane() % 4) + j % 2; }

  __device__ float& at(int i, int j) { return s[j / 2][2 * i + j % 2]; }

  // s = A B^T (or s += A B^T when `accumulate`) over `features` (a multiple of kStep): A
  // the owned rows, B the streamed rows, both row-major in shared memory with leading
  // dimensions lda, ldb (in elements).
  __device__ void add_scores(const In* a, int lda, const In* b, int ldb, int features, bool accumulate) {
    const int l = lane();
    // ldmatrix rows: A's 16 x 16 block as (rows 0-7, 8-15) x (features 0-7, 8-15); B's as
    // (columns 0-7: features 0-7, 8-15; columns 8-15: features 0-7, 8-15). Shared-memory
    // addresses in bytes, one per 16-column pair of B, advanced 32 bytes per step.
    uint32_t a_row = ptx::shared_address(a + (16 * warp() + l % 16) * lda + (l / 16) * 8);
    uint32_t b_rows[kBlocks / 2];
#pragma unroll
    for (int pair = 0; pair < kBlocks / 2; ++pair) {
      b_rows[pair] = ptx::shared_address(b + (16 * pair + (l / 16) * 8 + l % 8) * ldb + ((l / 8) % 2) * 8);
    }
    int k = 0;
    if (!accumulate) {  // the first step overwrites s: no zeroing
      uint32_t fa[4];
      ptx::ldmatrix_x4(fa, a_row);
#pragma unroll
      for (int pair = 0; pair < kBlocks / 2; ++pair) {
        uint32_t fb[4];
        ptx::ldmatrix_x4(fb, b_rows[pair]);
        ptx::mma_m16n8k16_first<In>(s[2 * pair], fa, fb[0], fb[1]);
        ptx::mma_m16n8k16_first<In>(s[2 * pair + 1], fa, fb[2], fb[3]);
      }
      k = kStep;
    }
#pragma unroll 2
    for (; k < features; k += kStep) {
      uint32_t fa[4];
      ptx::ldmatrix_x4(fa, a_row + k * sizeof(In));
#pragma unroll
      for (int pair = 0; pair < kBlocks / 2; ++pair) {
        uint32_t fb[4];
        ptx::ldmatrix_x4(fb, b_rows[pair] + k * sizeof(In));
        ptx::mma_m16n8k16<In>(s[2 * pair], fa, fb[0], fb[1]);
        ptx::mma_m16n8k16<In>(s[2 * pair + 1], fa, fb[2], fb[3]);
      }
    }
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
    // in fresh fp32 accumulators (8 registers), multiplied by scale and added to o
    // (lse_math.h's column view for fp16: each tile of anchors has its own scale).
    __device__ void add_scaled(const MmaTile& w, const In* b, int ldb, float scale) {
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
          o[2 * pair][e] = fmaf(scale, part[0][e], o[2 * pair][e]);
          o[2 * pair + 1][e] = fmaf(scale, part[1][e], o[2 * pair + 1][e]);
        }
      }
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
