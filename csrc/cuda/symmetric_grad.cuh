// The backward of ntxent-like calls (the op got y = None: the anchors are their own
// candidates) in one pass over S: dx = (E + E^T) x, as the Triton backend's symmetric row
// pass (macl_kernels/backends/triton/backward.py).
//
// A CTA owns 64 anchors I and streams 64-anchor tiles J: the score tile S_IJ is computed
// once and each entry's operand holds both E[i, j] and E[j, i] (S is symmetric), so one
// product with the streamed rows gives dx_I = sum_J (E_IJ + E_JI^T) x_J, accumulated in
// registers and written once (deterministic, no atomics). With w = coef / scale (coef =
// dL/dlse / tau, scale = max |coef|, |w| <= 1) and lse2 = lse log2(e):
//   one exp   (the spread max lse2 - min lse2 over the finite rows is at most
//             kSymmetricMaxSpread): shift = min lse2, alpha = w 2^(shift - lse2), and
//             E[i, j] + E[j, i] = scale 2^(s scale2 - shift) (alpha[i] + alpha[j]);
//   two exps  (otherwise: alpha would leave fp32's normal range): scale (w[i] 2^(s scale2 -
//             lse2[i]) + w[j] 2^(s scale2 - lse2[j])).
// Both variants are launched (kOneExp); each reads the flag op_host.h computed on the device
// and the one that is not its case returns at once. The operands are rounded as
// lse_math.h's symmetric view says (per output row and streamed tile scales for fp16).
//
// An entry drops its row term where j is excluded for anchor i (the owned rows' exclusions,
// as the row pass) and its column term where i is excluded for anchor j (the streamed
// records' exclusions, as the column pass): the table need not be symmetric. Only the tiles
// with such an entry, or with columns past the last anchor, take the masked path.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../lse_math.h"
#include "kernels.cuh"

namespace macl::cuda {
namespace {

// Params::shared_shift: the three values op_host.h computes on the device for y = None.
constexpr int kShiftAt = 0;        // min lse2 over the rows with a finite lse (+inf if none)
constexpr int kOneExpAt = 1;       // 1 when the spread of lse2 allows one exp per score, else 0
constexpr int kWeightScaleAt = 2;  // column_view_scale(max |coef|): w = coef / it

// The setup of the symmetric pass (O(rows), one thread per anchor): each anchor's record,
// read by the CTAs that own it and streamed with its rows: shift2 = lse2 (+inf without
// negatives), factor = alpha (one exp) or w (two exps).
template <typename Acc>
__global__ void negative_lse_symmetric_params(const int32_t* excluded, const Acc* tau, const Acc* grad_lse,
                                              const Acc* lse, const Acc* shared_shift, int64_t rows,
                                              ColumnParams<Acc>* out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) {
    return;
  }
  const Acc w = grad_lse[r] * (Acc(1) / *tau) / shared_shift[kWeightScaleAt];
  const Acc lse2 = weight_shift(lse[r]) * Acc(kLog2e);
  const bool finite = lse2 < static_cast<Acc>(INFINITY);
  ColumnParams<Acc> record;
  record.shift2 = lse2;
  record.factor = shared_shift[kOneExpAt] == Acc(0) ? w
                  : finite                          ? w * exp2_of(shared_shift[kShiftAt] - lse2)
                                                    : Acc(0);
  record.excluded[0] = excluded[2 * r];
  record.excluded[1] = excluded[2 * r + 1];
  out[r] = record;
}

// Sets the tile's operands to value(i, j, score) for every entry (the value already in the
// operand's scale: weight_operand's factor is 1).
template <typename Operand, typename Tile, typename Value>
__device__ inline void set_values(Tile& tile, const Value& value) {
  using Acc = std::remove_reference_t<decltype(tile.at(0, 0))>;
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
#pragma unroll
    for (int j = 0; j < Tile::kCols; j += 2) {
      tile.template set_operands<Operand>(i, j, value(i, j, tile.at(i, j)), Acc(1), value(i, j + 1, tile.at(i, j + 1)),
                                          Acc(1));
    }
  }
}

template <typename In, bool kOneExp>
__device__ void symmetric_pass(const Params<In, typename Config<In>::Acc>& p,
                               const Geometry<typename Config<In>::Tile, In>& geo) {
  using Tile = typename Config<In>::Tile;
  using Acc = typename Config<In>::Acc;
  using Operand = typename Config<In>::Operand;
  using Record = ColumnParams<Acc>;
  // fp16: each (output row, streamed tile) has its own scale (lse_math.h's symmetric view).
  constexpr bool kTileScales = std::is_same_v<In, __half>;
  static_assert(!kTileScales || Tile::kStreamed == kColumnScaleRows, "a streamed tile is a scale group");
  constexpr int kChunk = Geometry<Tile, In>::kChunk;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t owned0 = static_cast<int64_t>(blockIdx.x) * Tile::kOwned;
  const int output_chunk = static_cast<int>(blockIdx.y);
  const int64_t d0 = static_cast<int64_t>(output_chunk) * kChunk;
  const int rows = static_cast<int>(p.rows);
  const Acc scale2 = Acc(kLog2e) / *p.tau;
  const Acc shift = p.shared_shift[kShiftAt], weight_scale = p.shared_shift[kWeightScaleAt];
  Tile tile(smem + geo.owned_bytes() + geo.streamed_bytes() + geo.all_params_bytes());
  typename Tile::Product product;
  product.zero();

  const RowExclusions<Tile> exclusions(p.excluded, owned0, p.rows);
  const MaskedTiles<Tile> masked_tiles(exclusions, rows);
  // The owned rows' own terms: factor (alpha or w) and lse2 from their records; for fp16
  // |coef| and weight_scale / |coef| (+inf for 0).
  Acc own[Tile::kRows], own_shift2[Tile::kRows], own_abs_coef[Tile::kRows], own_inverse[Tile::kRows];
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
    const int64_t row = owned0 + Tile::row(i);
    const bool inside = row < p.rows;
    own[i] = inside ? p.column_params[row].factor : Acc(0);
    own_shift2[i] = inside ? p.column_params[row].shift2 : static_cast<Acc>(INFINITY);
    const Acc coef = inside ? p.grad_lse[row] * (Acc(1) / *p.tau) : Acc(0);
    own_abs_coef[i] = coef < Acc(0) ? -coef : coef;
    own_inverse[i] = weight_scale / own_abs_coef[i];
  }
  const Sides<In> sides{p.x, rows, static_cast<int>(owned0), p.x, rows, p.column_params};
  auto on_tile = [&](int t, const In* streamed, const void* records) {
    const Record* anchors = static_cast<const Record*>(records);
    // Per output row: the factor that puts its operands in their scale (fp16: weight_scale /
    // its tile scale; else 1) and its own term times it.
    // (weight_scale / row_scale as the smaller of the row's and the tile's inverses: the same
    // correctly rounded quotient, one division per tile.)
    Acc factor[Tile::kRows], row_scale[Tile::kRows], own_factor[Tile::kRows];
    const Acc tile_max = kTileScales ? p.max_abs_coef[t] : Acc(0);
    const Acc tile_inverse = kTileScales ? weight_scale / tile_max : Acc(0);
#pragma unroll
    for (int i = 0; i < Tile::kRows; ++i) {
      if constexpr (kTileScales) {
        row_scale[i] = symmetric_row_scale(own_abs_coef[i], tile_max);
        const Acc inverse = min(own_inverse[i], tile_inverse);
        factor[i] = inverse < static_cast<Acc>(INFINITY) ? inverse : weight_scale;  // both 0: the scale is 1
      } else {
        row_scale[i] = factor[i] = Acc(1);
      }
      own_factor[i] = own[i] * factor[i];
    }
    // Entry (i, j)'s operand, its row term dropped where row_masked, its column term where
    // col_masked; both masked: 0 whatever the exps (they may overflow there).
    auto value = [&](int i, int j, Acc score, bool row_masked, bool col_masked) {
      const Record& anchor = anchors[Tile::col(j)];
      Acc both;
      if constexpr (kOneExp) {
        const Acc p2 = exp2_of(fma(score, scale2, -shift));
        const Acc row_term = row_masked ? Acc(0) : own_factor[i];
        const Acc col_term = col_masked ? Acc(0) : anchor.factor;
        both = p2 * (kTileScales ? fma(col_term, factor[i], row_term) : row_term + col_term);
      } else {
        const Acc row_term = row_masked ? Acc(0) : own[i] * exp2_of(fma(score, scale2, -own_shift2[i]));
        const Acc col_term = col_masked ? Acc(0) : anchor.factor * exp2_of(fma(score, scale2, -anchor.shift2));
        both = (row_term + col_term) * factor[i];
      }
      return row_masked && col_masked ? Acc(0) : both;
    };
    const bool hit = __any_sync(0xffffffffu, excludes_owned<Tile>(anchors, owned0));
    if (rare(hit || masked_tiles.masked(t))) {  // an excluded pair either way, or columns past the end
      const TileMask<Tile> mask(exclusions, t * Tile::kStreamed, rows);
      set_values<Operand>(tile, [&](int i, int j, Acc score) {
        const int32_t* e = anchors[Tile::col(j)].excluded;
        const bool col_masked = Tile::col(j) >= mask.valid || is_excluded(owned0 + Tile::row(i), e[0], e[1]);
        return value(i, j, score, mask.masked(i, j), col_masked);
      });
    } else {
      set_values<Operand>(tile, [&](int i, int j, Acc score) { return value(i, j, score, false, false); });
    }
    if constexpr (kTileScales) {
      product.add_scaled(tile, streamed, geo.stride(), row_scale);
    } else {
      product.add(tile, streamed, geo.stride());
    }
  };
  for_each_tile<sizeof(Record)>(geo, sides, output_chunk, tile, smem, on_tile);

  const Acc after = kTileScales ? Acc(1) : weight_scale;  // (fp16: each tile's scale applied as it was added)
  store_product<Tile>(product, [&](int) { return after; }, p.out, owned0, p.rows, p.dim, d0);
}

template <typename In, bool kOneExp>
__global__ void __launch_bounds__(kMaxThreads, 1)
    negative_lse_symmetric_grad(Params<In, typename Config<In>::Acc> p, Geometry<typename Config<In>::Tile, In> geo) {
  if ((p.shared_shift[kOneExpAt] != 0) != kOneExp) {
    return;  // the other variant's launch writes dx
  }
  symmetric_pass<In, kOneExp>(p, geo);
}

}  // namespace
}  // namespace macl::cuda
