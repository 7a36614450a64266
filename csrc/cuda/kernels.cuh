// The kernels of negative_lse_kernels.cu (device code only; see that file for what each
// computes and how its inner loop is built). Host code launches them through
// launch_plan.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../lse_math.h"
#include "mma_tile.cuh"
#include "ptx.cuh"
#include "simt_tile.cuh"
#include "tile_stream.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "macl_kernels' CUDA kernels need compute capability >= 8.0 (bf16 tensor cores): set TORCH_CUDA_ARCH_LIST"
#endif

namespace macl::cuda {
namespace {

constexpr int kMaxThreads = 128;  // per CTA, every tile (a bound the register allocation respects)
constexpr double kLn2 = 0.6931471805599453;

// Per input type: the tiles (the forward's, and the gradient passes'), the accumulation
// type, and the type whose rounding the products see (lse_math.h's weight_operand).
template <typename In>
struct Config;
template <>
struct Config<__half> {
  using Tile = MmaTile<__half>;
  using ForwardTile = MmaTile<__half, 2>;
  using Acc = float;
  using Operand = c10::Half;
};
template <>
struct Config<__nv_bfloat16> {
  using Tile = MmaTile<__nv_bfloat16>;
  using ForwardTile = MmaTile<__nv_bfloat16, 2>;
  using Acc = float;
  using Operand = c10::BFloat16;
};
template <>
struct Config<float> {
  using Tile = SimtTile<float, 64, 32, 64>;
  using ForwardTile = Tile;
  using Acc = float;
  using Operand = float;
};
template <>
struct Config<double> {
  using Tile = SimtTile<double, 64, 16, 32>;
  using ForwardTile = Tile;
  using Acc = double;
  using Operand = double;
};

__device__ inline float exp2_of(float x) { return ptx::exp2_approx(x); }
__device__ inline double exp2_of(double x) { return exp2(x); }

// What the column pass needs of each streamed anchor, precomputed once: its lse (as the
// base-2 shift of its logits), its column-view factor (lse_math.h) and its exclusions.
template <typename Acc>
struct alignas(16) ColumnParams {
  Acc shift2;  // weight_shift(lse) * log2(e)
  Acc factor;  // column_view_factors(grad_lse / tau, its group's scale).factor
  int32_t excluded[2];
};

template <typename In, typename Acc>
struct Params {
  const In* x;
  const In* y;  // x when the candidates are the anchors
  const int32_t* excluded;
  const Acc* tau;
  const Acc* grad_lse;      // backward
  const Acc* lse;           // backward
  const Acc* max_abs_coef;  // backward: per group of anchors sharing a column-view scale (launch.h)
  int64_t group_rows;       // backward: anchors per such group (column_scale_rows)
  const ColumnParams<Acc>* column_params;  // column pass, symmetric pass (symmetric_grad.cuh)
  const Acc* shared_shift;  // symmetric pass: its shift, formula and weight scale (symmetric_grad.cuh)
  Acc* out;                 // lse, P y (forward_product), dx, or dy
  int64_t rows, cols, dim, ld;
};

// Max and sum over the lanes that share a row (a quad for MmaTile, none for SimtTile).
template <typename Tile, typename Acc>
__device__ inline Acc row_max(Acc v) {
#pragma unroll
  for (int offset = 1; offset < Tile::kRowLanes; offset *= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
template <typename Tile, typename Acc>
__device__ inline Acc row_sum(Acc v) {
#pragma unroll
  for (int offset = 1; offset < Tile::kRowLanes; offset *= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The owned rows' exclusions (anchors: the forwards, the row and symmetric passes), -1 past the last row.
template <typename Tile>
struct RowExclusions {
  int32_t e[Tile::kRows][2];

  __device__ RowExclusions(const int32_t* excluded, int64_t row0, int64_t rows) {
#pragma unroll
    for (int i = 0; i < Tile::kRows; ++i) {
      const int64_t row = row0 + Tile::row(i);
      e[i][0] = row < rows ? excluded[2 * row] : -1;
      e[i][1] = row < rows ? excluded[2 * row + 1] : -1;
    }
  }
};

// Which streamed tiles a warp must mask for its owned rows: per exclusion slot, the run of
// tiles from the one holding the warp's smallest excluded column of that slot to the one
// holding its largest (for the usual layouts one or two tiles; any tile between them is
// masked too, harmlessly), and the tile past the last full one (missing columns). Set up
// once per kernel; a tile costs a few uniform comparisons, and only masked tiles build a
// TileMask.
template <typename Tile>
struct MaskedTiles {
  int first[2], count[2];  // per slot, the run [first, first + count); count 0 when empty
  int full;                // tiles [0, full) hold no missing column

  __device__ MaskedTiles(const RowExclusions<Tile>& rows, int cols) {
    full = cols / Tile::kStreamed;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      int lo = 1 << 30, hi = -1;
#pragma unroll
      for (int i = 0; i < Tile::kRows; ++i) {
        const int e = rows.e[i][k];
        if (0 <= e && e < cols) {  // -1 (none) and columns past the end exclude nothing
          lo = min(lo, e / Tile::kStreamed);
          hi = max(hi, e / Tile::kStreamed);
        }
      }
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
        hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
      }
      first[k] = lo;
      count[k] = hi >= lo ? hi - lo + 1 : 0;
    }
  }

  __device__ bool masked(int t) const {
    return static_cast<unsigned>(t - first[0]) < static_cast<unsigned>(count[0]) ||
           static_cast<unsigned>(t - first[1]) < static_cast<unsigned>(count[1]) || t >= full;
  }
};

// What masks the entries of a streamed tile (one MaskedTiles names) for the owned rows'
// view: the tile's columns past the last candidate, and each row's excluded columns that
// fall in the tile (as tile columns, -1 if none).
template <typename Tile>
struct TileMask {
  int valid;  // columns [0, valid) of the tile are candidates
  int e[Tile::kRows][2];

  __device__ TileMask(const RowExclusions<Tile>& rows, int col0, int cols) {
    valid = min(cols - col0, Tile::kStreamed);
#pragma unroll
    for (int i = 0; i < Tile::kRows; ++i) {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int local = rows.e[i][k] - col0;  // -1 (none) stays outside the tile
        e[i][k] = static_cast<unsigned>(local) < static_cast<unsigned>(Tile::kStreamed) ? local : -1;
      }
    }
  }

  __device__ bool masked(int i, int j) const {
    const int c = Tile::col(j);
    return c >= valid || is_excluded(c, e[i][0], e[i][1]);
  }
};

// ---- forward ----

// The fixed shift (as the Triton forward, backends/triton/forward.py): the op's rows are
// L2-normalized (backends/base.py), so every score is <= 1 and, with the shift
// scale2 = log2(e) / tau (the base-2 logit of a score of 1), every term
// exp2(score * scale2 - scale2) is <= 1: a row's sum needs no running maximum, one FFMA, one
// exp2 and one add per score. Whatever the inputs, a row's sum inside
// [kLowestSum, kHighestSum] is exact to the accumulation type's rounding: no term overflowed
// (each is <= the sum) and the terms that flushed to 0 (each < 2^-126) weigh at most
// cols * 2^-66 of it. Any other sum (a tiny tau, a row far from all its negatives, rows
// longer than unit or a negative tau whose terms overflow, no negatives at all, a NaN) sends
// the CTA to the running maximum (online_lse), the forward's only path before.
constexpr double kLowestSum = 0x1p-60;
constexpr double kHighestSum = 0x1p100;

// sum[i] += the tile's terms exp2(score * scale2 - shift2) of row i, except those of the
// entries hidden(i, j) names.
template <typename Tile, typename Acc, typename Hidden>
__device__ inline void add_terms(Tile& tile, Acc scale2, Acc shift2, Acc (&sum)[Tile::kRows], const Hidden& hidden) {
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
#pragma unroll
    for (int j = 0; j < Tile::kCols; ++j) {
      const Acc term = exp2_of(fma(tile.at(i, j), scale2, -shift2));
      sum[i] += hidden(i, j) ? Acc(0) : term;
    }
  }
}

// For the running maximum: the tile's scores as base-2 logits (times scale2), -inf where
// `mask` masks them; returns 1, the scale that turns the tile's values into logits now. (For
// a tile with masked entries, or a scale2 <= 0, which makes the max logit another score's
// than the max score's; otherwise the logits are the scores times scale2.)
template <typename Tile, typename Acc>
__device__ inline Acc to_masked_logits(Tile& tile, const TileMask<Tile>& mask, Acc scale2) {
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
#pragma unroll
    for (int j = 0; j < Tile::kCols; ++j) {
      tile.at(i, j) = mask.masked(i, j) ? negative_infinity<Acc>() : tile.at(i, j) * scale2;
    }
  }
  return Acc(1);
}

// The largest value of the tile's row i (over the lanes that share the row).
template <typename Tile>
__device__ inline auto tile_row_max(Tile& tile, int i) {
  auto top = tile.at(i, 0);
#pragma unroll
  for (int j = 1; j < Tile::kCols; ++j) top = max(top, tile.at(i, j));
  return row_max<Tile>(top);
}

// The classic online log-sum-exp (running maximum and sum, base 2) of the owned rows over
// every streamed tile: the repair of the rows the fixed shift cannot hold; lse[i] for row i.
template <typename In, typename Tile, typename Acc>
__device__ void online_lse(const Params<In, Acc>& p, const Geometry<Tile, In>& geo, const Sides<In>& sides,
                           const RowExclusions<Tile>& exclusions, const MaskedTiles<Tile>& masked_tiles, Tile& tile,
                           unsigned char* smem, Acc scale2, Acc (&lse)[Tile::kRows]) {
  Acc max2[Tile::kRows], sum[Tile::kRows];  // per row: running max (base 2) and this thread's part of the sum
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
    max2[i] = negative_infinity<Acc>();
    sum[i] = Acc(0);
  }
  for_each_tile<0>(geo, sides, geo.chunks() - 1, tile, smem, [&](int t, const In*, const void*) {
    Acc scale = scale2;  // what turns the tile's values into base-2 logits
    if (masked_tiles.masked(t) || !(scale2 > Acc(0))) {
      scale = to_masked_logits(tile, TileMask<Tile>(exclusions, t * Tile::kStreamed, static_cast<int>(p.cols)), scale2);
    }
#pragma unroll
    for (int i = 0; i < Tile::kRows; ++i) {
      const Acc next = max(max2[i], tile_row_max(tile, i) * scale);
      const Acc shift = next == negative_infinity<Acc>() ? Acc(0) : next;  // no negative seen yet
      Acc part = Acc(0);
#pragma unroll
      for (int j = 0; j < Tile::kCols; ++j) part += exp2_of(fma(tile.at(i, j), scale, -shift));
      sum[i] = fma(sum[i], exp2_of(max2[i] - shift), part);
      max2[i] = next;
    }
  });
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) lse[i] = lse_value(max2[i] * Acc(kLn2), row_sum<Tile>(sum[i]));
}

template <typename In>
__global__ void __launch_bounds__(kMaxThreads, 1)
    negative_lse_forward(Params<In, typename Config<In>::Acc> p, Geometry<typename Config<In>::ForwardTile, In> geo) {
  using Tile = typename Config<In>::ForwardTile;
  using Acc = typename Config<In>::Acc;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * Tile::kOwned;
  const Acc scale2 = Acc(kLog2e) / *p.tau;  // logit * log2(e) = score * scale2; also the fixed shift
  const RowExclusions<Tile> exclusions(p.excluded, row0, p.rows);
  const MaskedTiles<Tile> masked_tiles(exclusions, static_cast<int>(p.cols));
  Tile tile(smem + geo.owned_bytes() + geo.streamed_bytes());
  const Sides<In> sides{p.x, static_cast<int>(p.rows), static_cast<int>(row0), p.y, static_cast<int>(p.cols),
                        nullptr};

  Acc sum[Tile::kRows];  // per row: this thread's part of the sum of exp2(logit2 - scale2)
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) sum[i] = Acc(0);
  for_each_tile<0>(geo, sides, geo.chunks() - 1, tile, smem, [&](int t, const In*, const void*) {
    if (rare(masked_tiles.masked(t))) {  // the tile may hold an excluded or a missing column
      const TileMask<Tile> mask(exclusions, t * Tile::kStreamed, static_cast<int>(p.cols));
      add_terms(tile, scale2, scale2, sum, [&](int i, int j) { return mask.masked(i, j); });
    } else {
      add_terms(tile, scale2, scale2, sum, [](int, int) { return false; });
    }
  });

  Acc lse[Tile::kRows];
  bool exact = true;
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
    const Acc total = row_sum<Tile>(sum[i]);
    lse[i] = scale2 * Acc(kLn2) + log_of(total);
    exact &= row0 + Tile::row(i) >= p.rows || (total >= Acc(kLowestSum) && total <= Acc(kHighestSum));
  }
  if (rare(__syncthreads_or(!exact))) {  // a row of the CTA needs the running maximum
    online_lse(p, geo, sides, exclusions, masked_tiles, tile, smem, scale2, lse);
  }
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
    const int64_t row = row0 + Tile::row(i);
    if (threadIdx.x % Tile::kRowLanes == 0 && row < p.rows) {
      p.out[row] = lse[i];
    }
  }
}

// ---- backward ----

// The setup of the column pass: one record per anchor (one thread each); anchor r's
// column-view scale is its group's, max_abs_coef[r / group_rows].
template <typename Acc>
__global__ void negative_lse_column_params(const int32_t* excluded, const Acc* tau, const Acc* grad_lse,
                                           const Acc* lse, const Acc* max_abs_coef, int64_t group_rows,
                                           int64_t rows, ColumnParams<Acc>* out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) {
    return;
  }
  const Acc coef = grad_lse[r] * (Acc(1) / *tau);  // dL/dlse / tau
  ColumnParams<Acc> record;
  record.shift2 = weight_shift(lse[r]) * Acc(kLog2e);
  record.factor = column_view_factors(coef, column_view_scale(max_abs_coef[r / group_rows])).factor;
  record.excluded[0] = excluded[2 * r];
  record.excluded[1] = excluded[2 * r + 1];
  out[r] = record;
}

// Whether one of a streamed tile's anchors (their records) excludes one of the CTA's owned
// rows [owned0, owned0 + kOwned), for this lane's share of the anchors (a warp's lanes
// together read every record, a few each): combine with __any_sync.
template <typename Tile, typename Acc>
__device__ inline bool excludes_owned(const ColumnParams<Acc>* anchors, int64_t owned0) {
  const int first = static_cast<int>(owned0);
  bool hit = false;
  for (int k = threadIdx.x % 32; k < Tile::kStreamed; k += 32) {
    const int32_t* e = anchors[k].excluded;
    hit |= static_cast<unsigned>(e[0] - first) < static_cast<unsigned>(Tile::kOwned) ||
           static_cast<unsigned>(e[1] - first) < static_cast<unsigned>(Tile::kOwned);
  }
  return hit;
}

// Sets the tile's operands from its scores (lse_math.h: p * factor rounded to the input
// type), p = exp2(score * scale2 - shift2(i, j)), for every entry; masked entries are
// cleared afterwards.
template <typename Operand, typename Tile, typename Acc, typename Shift2, typename Factor>
__device__ inline void set_weights(Tile& tile, Acc scale2, const Shift2& shift2, const Factor& factor) {
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
#pragma unroll
    for (int j = 0; j < Tile::kCols; j += 2) {
      const Acc p0 = exp2_of(fma(tile.at(i, j), scale2, -shift2(i, j)));
      const Acc p1 = exp2_of(fma(tile.at(i, j + 1), scale2, -shift2(i, j + 1)));
      tile.template set_operands<Operand>(i, j, p0, factor(i, j), p1, factor(i, j + 1));
    }
  }
}

// Zeroes the operands of the entries masked(i, j) holds (the rare tiles with some).
template <typename Tile, typename Masked>
__device__ inline void clear_masked(Tile& tile, const Masked& masked) {
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
#pragma unroll
    for (int j = 0; j < Tile::kCols; ++j) {
      if (masked(i, j)) {
        tile.clear_operand(i, j);
      }
    }
  }
}

// Writes the product (a gradient, or P y) of the CTA's owned rows [owned0, owned0 + kOwned) (those
// below n_owned) for features [d0, d0 + kChunk) (those below dim) to out (rows of dim
// values), times after(i) for the thread's row i: each (row, feature) has exactly this one
// writer.
template <typename Tile, typename Acc, typename After>
__device__ inline void store_product(typename Tile::Product& product, const After& after, Acc* out, int64_t owned0,
                                     int64_t n_owned, int64_t dim, int64_t d0) {
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
    const int64_t row = owned0 + Tile::row(i);
    if (row >= n_owned) {
      continue;
    }
    Acc* out_row = out + row * dim + d0;
#pragma unroll
    for (int d = 0; d < Tile::Product::kFeatures; ++d) {
      const int feature = Tile::Product::feature(d);
      if (d0 + feature < dim) {
        out_row[feature] = after(i) * product.at(i, d);
      }
    }
  }
}

// The row pass (kColumns = false: owns anchors, streams candidates, out = dx = E y) and
// the column pass (owns candidates, streams anchors, out = dy = E^T x), for the candidates
// given as y (symmetric_grad.cuh's one pass takes y = None),
// for gradient features [d0, d0 + kChunk) with d0 = blockIdx.y * kChunk.
template <typename In, bool kColumns>
__device__ void backward_pass(const Params<In, typename Config<In>::Acc>& p,
                              const Geometry<typename Config<In>::Tile, In>& geo) {
  using Tile = typename Config<In>::Tile;
  using Acc = typename Config<In>::Acc;
  using Operand = typename Config<In>::Operand;
  constexpr int kChunk = Geometry<Tile, In>::kChunk;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t owned0 = static_cast<int64_t>(blockIdx.x) * Tile::kOwned;
  const int output_chunk = static_cast<int>(blockIdx.y);
  const int64_t d0 = static_cast<int64_t>(output_chunk) * kChunk;
  const Acc scale2 = Acc(kLog2e) / *p.tau;
  Tile tile(smem + geo.owned_bytes() + geo.streamed_bytes() + geo.all_params_bytes());
  typename Tile::Product product;
  product.zero();
  Acc after[Tile::kRows];  // the view's factor applied to each output row

  if constexpr (!kColumns) {
    const RowExclusions<Tile> exclusions(p.excluded, owned0, p.rows);
    const MaskedTiles<Tile> masked_tiles(exclusions, static_cast<int>(p.cols));
    Acc shift2[Tile::kRows], factor[Tile::kRows];
#pragma unroll
    for (int i = 0; i < Tile::kRows; ++i) {
      const int64_t row = owned0 + Tile::row(i);
      const bool inside = row < p.rows;
      const OperandFactors<Acc> f = row_view_factors(inside ? p.grad_lse[row] * (Acc(1) / *p.tau) : Acc(0));
      factor[i] = f.factor;
      after[i] = f.after;
      shift2[i] = inside ? weight_shift(p.lse[row]) * Acc(kLog2e) : static_cast<Acc>(INFINITY);
    }
    const Sides<In> sides{p.x, static_cast<int>(p.rows), static_cast<int>(owned0), p.y, static_cast<int>(p.cols),
                          nullptr};
    for_each_tile<0>(geo, sides, output_chunk, tile, smem, [&](int t, const In* rows, const void*) {
      set_weights<Operand>(
          tile, scale2, [&](int i, int) { return shift2[i]; }, [&](int i, int) { return factor[i]; });
      if (rare(masked_tiles.masked(t))) {  // a tile that may hold an excluded or a missing column
        const TileMask<Tile> mask(exclusions, t * Tile::kStreamed, static_cast<int>(p.cols));
        clear_masked(tile, [&](int i, int j) { return mask.masked(i, j); });
      }
      product.add(tile, rows, geo.stride());
    });
  } else {
    // The column view's `after` (lse_math.h): for fp16 each streamed tile's own scale, applied
    // to the tile's product as it is added; otherwise one scale for all, applied at the end.
    constexpr bool kTileScales = std::is_same_v<In, __half>;
    static_assert(!kTileScales || Tile::kStreamed == kColumnScaleRows, "a tile of anchors is a scale group");
    const Acc scale = kTileScales ? Acc(1) : column_view_scale(*p.max_abs_coef);
#pragma unroll
    for (int i = 0; i < Tile::kRows; ++i) after[i] = scale;
    const Sides<In> sides{p.y, static_cast<int>(p.cols), static_cast<int>(owned0), p.x, static_cast<int>(p.rows),
                          p.column_params};
    constexpr int kRecordBytes = sizeof(ColumnParams<Acc>);
    for_each_tile<kRecordBytes>(geo, sides, output_chunk, tile, smem, [&](int t, const In* rows, const void* records) {
      // (A group is one tile, or every anchor: tile t lies in one group.)
      const Acc tile_scale =
          kTileScales ? column_view_scale(p.max_abs_coef[int64_t{t} * Tile::kStreamed / p.group_rows]) : Acc(1);
      const ColumnParams<Acc>* anchors = static_cast<const ColumnParams<Acc>*>(records);
      set_weights<Operand>(
          tile, scale2, [&](int, int j) { return anchors[Tile::col(j)].shift2; },
          [&](int, int j) { return anchors[Tile::col(j)].factor; });
      // An anchor of the tile excludes a candidate of the CTA:
      if (rare(__any_sync(0xffffffffu, excludes_owned<Tile>(anchors, owned0)))) {
        clear_masked(tile, [&](int i, int j) {
          const int32_t* e = anchors[Tile::col(j)].excluded;
          return is_excluded(owned0 + Tile::row(i), e[0], e[1]);
        });
      }
      if constexpr (kTileScales) {
        product.add_scaled(tile, rows, geo.stride(), tile_scale);
      } else {
        product.add(tile, rows, geo.stride());
      }
    });
  }

  store_product<Tile>(product, [&](int i) { return after[i]; }, p.out, owned0, kColumns ? p.cols : p.rows, p.dim, d0);
}

template <typename In>
__global__ void __launch_bounds__(kMaxThreads, 1)
    negative_lse_rows_grad(Params<In, typename Config<In>::Acc> p, Geometry<typename Config<In>::Tile, In> geo) {
  backward_pass<In, false>(p, geo);
}

template <typename In>
__global__ void __launch_bounds__(kMaxThreads, 1)
    negative_lse_cols_grad(Params<In, typename Config<In>::Acc> p, Geometry<typename Config<In>::Tile, In> geo) {
  backward_pass<In, true>(p, geo);
}

}  // namespace
}  // namespace macl::cuda
