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

// How the backward's weights are rounded before their products (csrc/lse_math.h,
// weight_operand): not at all for float32/float64 inputs, to fp16 or bf16 (round to
// nearest even) for those inputs, as the GPU's tensor cores see them.
enum class Rounding { kNone, kHalf, kBFloat16 };

// One view of the weights (lse_math.h's OperandFactors), per anchor: the weight of a logit t
// of anchor a is after[a] * round(factor[a] * exp(t - shift[a])).
template <typename T>
struct WeightView {
  const T* shift;
  const T* factor;
  const T* after;

  WeightView at(int64_t first) const { return {shift + first, factor + first, after + first}; }
};

template <typename T>
struct TilePasses {
  // Fold each row's logits into the running (max, sum) of that row.
  void (*fold_rows)(const T* tile, int64_t rows, int64_t cols, int64_t ld, T* row_max, T* row_sum);
  // Fold each column's logits into the running (max, sum) of that column.
  void (*fold_columns)(const T* tile, int64_t rows, int64_t cols, int64_t ld, T* col_max, T* col_sum);
  // The forward with P y (online softmax): fold each row's logits into its running (max,
  // sum) with the new max applied to the tile itself, tile[i][j] = exp(tile[i][j] - max[i])
  // rounded as the GPU's product operands, after rescaling the row's running product
  // (`features` values at product + i * product_ld) to that max.
  void (*product_weights)(T* tile, int64_t rows, int64_t cols, int64_t ld, T* row_max, T* row_sum, T* product,
                          int64_t product_ld, int64_t features, Rounding rounding);
  // out[i][j] = the weight of tile[i][j] for anchor i of `rows_view` (out may be tile).
  void (*weights)(const T* tile, T* out, int64_t rows, int64_t cols, int64_t ld, WeightView<T> rows_view,
                  Rounding rounding);
  // out[i][j] = the weight of t = tile[i][j] for anchor i of `rows_view` plus its weight for
  // anchor j of `cols_view`: a tile of logits seen from its rows and its columns at once.
  void (*pair_weights)(const T* tile, T* out, int64_t rows, int64_t cols, int64_t ld, WeightView<T> rows_view,
                       WeightView<T> cols_view, Rounding rounding);
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
