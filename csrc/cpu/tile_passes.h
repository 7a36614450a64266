// The vectorized passes of the CPU kernel over one tile of logits (at::vec, SLEEF exp).
//
// A tile is a rows x cols block of logits s / tau, row-major with leading dimension
// ld, produced by one gemm (cpu/negative_lse_cpu.cpp). Masked entries are -inf when a
// pass is called (the driver masks and, for pair_weights, repairs them). Like ATen's
// kernels, tile_passes.cpp is compiled once per instruction set (setup.py) into the
// namespaces below, and tile_passes<T>() picks the best one the CPU supports.
#pragma once

#include <cstdint>

namespace macl::cpu {

template <typename T>
struct TilePasses {
  // Fold each row's logits into the running (max, sum) of that row.
  void (*fold_rows)(const T* tile, int64_t rows, int64_t cols, int64_t ld, T* row_max, T* row_sum);
  // Fold each column's logits into the running (max, sum) of that column.
  void (*fold_columns)(const T* tile, int64_t rows, int64_t cols, int64_t ld, T* col_max, T* col_sum);
  // In place: tile[i][j] = row_coef[i] * exp(tile[i][j] - row_shift[i]).
  void (*row_weights)(T* tile, int64_t rows, int64_t cols, int64_t ld, const T* row_shift, const T* row_coef);
  // In place: tile[i][j] = row_coef[i] * exp(t - row_shift[i]) + col_coef[j] * exp(t - col_shift[j]),
  // t = tile[i][j]: the weights of a tile seen from its rows and from its columns at once.
  void (*pair_weights)(T* tile, int64_t rows, int64_t cols, int64_t ld, const T* row_shift, const T* row_coef,
                       const T* col_shift, const T* col_coef);
};

#define MACL_DECLARE_TILE_PASSES(capability) \
  namespace capability {                     \
  template <typename T>                      \
  TilePasses<T> tile_passes();               \
  }

MACL_DECLARE_TILE_PASSES(DEFAULT)
#if defined(MACL_CPU_AVX2)
MACL_DECLARE_TILE_PASSES(AVX2)
#endif
#if defined(MACL_CPU_AVX512)
MACL_DECLARE_TILE_PASSES(AVX512)
#endif
#undef MACL_DECLARE_TILE_PASSES

// The variant for this CPU (ATen's choice, so ATEN_CPU_CAPABILITY applies too).
template <typename T>
const TilePasses<T>& tile_passes();

}  // namespace macl::cpu
