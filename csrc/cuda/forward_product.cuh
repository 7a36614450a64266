// The forward that also keeps P y (device code; launched by launch_plan.cuh's
// run_forward_product): for the layouts with candidates, the backward's dx = E y is then
// (h / tau) P y, with P[r, c] = exp(s[r, c] / tau - lse[r]) on the negatives, and needs no
// pass over S (fused attention's forward with V = y; the Triton forward's WITH_PRODUCT).
//
// A CTA owns Tile::kOwned anchors and streams the candidates (for_each_tile, as the row
// pass does, with the gradient passes' tile and grid: grid.y = chunks of kChunk product
// features, each CTA computing the whole lse of its rows and the product for its chunk).
// Per row, FlashAttention-2's online softmax in base 2: a running max m (of the logits
// times log2(e)) and sum; a tile's terms p = exp2(score * scale2 - m) <= 1 (the row's
// largest is 1, so fp16 operands neither overflow nor lose the row's leading terms to
// underflow, whatever tau) are added to the sum in the accumulation type, rounded to the
// input type as the product's operands (weight_operand with factor 1) and multiplied
// with the streamed rows (Tile::Product::add). When a tile raises a row's max, that row's
// sum and product are first rescaled by exp2(m_old - m_new); the rows whose max stays
// (most rows of most tiles, once the first few tiles have set the maxima) skip it. At the end
// P y = product / sum and lse = m ln 2 + log(sum); a row without negatives keeps m = -inf
// and sum = 0: lse = -inf and a zero product, never NaN.
#pragma once

#include <cstdint>

#include "kernels.cuh"

namespace macl::cuda {
namespace {

// Row i's sum and product times exp2(max2 - next): the row's max rises from max2 to next
// (from -inf, a row that had no term yet: by 0).
template <typename Tile, typename Acc>
__device__ inline void rescale_row(int i, Acc max2, Acc next, Acc& sum, typename Tile::Product& product) {
  const Acc factor = exp2_of(max2 - next);
  sum *= factor;
#pragma unroll
  for (int d = 0; d < Tile::Product::kFeatures; ++d) product.at(i, d) *= factor;
}

template <typename In>
__global__ void __launch_bounds__(kMaxThreads, 1)
    negative_lse_forward_product(Params<In, typename Config<In>::Acc> p, Geometry<typename Config<In>::Tile, In> geo,
                                 typename Config<In>::Acc* lse) {
  using Tile = typename Config<In>::Tile;
  using Acc = typename Config<In>::Acc;
  using Operand = typename Config<In>::Operand;
  constexpr int kChunk = Geometry<Tile, In>::kChunk;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * Tile::kOwned;
  const int output_chunk = static_cast<int>(blockIdx.y);
  const int64_t d0 = static_cast<int64_t>(output_chunk) * kChunk;
  const Acc scale2 = Acc(kLog2e) / *p.tau;  // logit * log2(e) = score * scale2
  const RowExclusions<Tile> exclusions(p.excluded, row0, p.rows);
  const MaskedTiles<Tile> masked_tiles(exclusions, static_cast<int>(p.cols));
  Tile tile(smem + geo.owned_bytes() + geo.streamed_bytes());
  const Sides<In> sides{p.x, static_cast<int>(p.rows), static_cast<int>(row0), p.y, static_cast<int>(p.cols),
                        nullptr};
  typename Tile::Product product;
  product.zero();
  Acc max2[Tile::kRows], sum[Tile::kRows];  // per row: running max (base 2) and this thread's part of the sum
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
    max2[i] = negative_infinity<Acc>();
    sum[i] = Acc(0);
  }

  for_each_tile<0>(geo, sides, output_chunk, tile, smem, [&](int t, const In* rows, const void*) {
    Acc scale = scale2;  // what turns the tile's values into base-2 logits
    if (rare(masked_tiles.masked(t) || !(scale2 > Acc(0)))) {  // masked entries, or a tau < 0
      scale = to_masked_logits(tile, TileMask<Tile>(exclusions, t * Tile::kStreamed, static_cast<int>(p.cols)), scale2);
    }
#pragma unroll
    for (int i = 0; i < Tile::kRows; ++i) {
      const Acc next = max(max2[i], tile_row_max(tile, i) * scale);
      // A rising max: on a thread's first tiles, then ever more rarely (for scores in random
      // order, a row's k-th tile raises it with probability 1 / k). rare(): the instruction
      // count of tools/cuda_inner_loops.py is that of a tile that raises no row's max.
      if (rare(next > max2[i])) {
        rescale_row<Tile>(i, max2[i], next, sum[i], product);
        max2[i] = next;
      }
    }
#pragma unroll
    for (int i = 0; i < Tile::kRows; ++i) {
      const Acc shift = max2[i] == negative_infinity<Acc>() ? Acc(0) : max2[i];  // no negative seen yet
#pragma unroll
      for (int j = 0; j < Tile::kCols; j += 2) {
        const Acc p0 = exp2_of(fma(tile.at(i, j), scale, -shift));
        const Acc p1 = exp2_of(fma(tile.at(i, j + 1), scale, -shift));
        sum[i] += p0 + p1;
        tile.template set_operands<Operand>(i, j, p0, Acc(1), p1, Acc(1));
      }
    }
    product.add(tile, rows, geo.stride());
  });

  // P y = product / sum (store_product: one writer per (row, feature)); lse has the CTAs of chunk 0.
  Acc inverse[Tile::kRows];
#pragma unroll
  for (int i = 0; i < Tile::kRows; ++i) {
    const int64_t row = row0 + Tile::row(i);
    const Acc total = row_sum<Tile>(sum[i]);
    inverse[i] = total > Acc(0) ? Acc(1) / total : Acc(0);  // no negatives: a zero product
    if (output_chunk == 0 && threadIdx.x % Tile::kRowLanes == 0 && row < p.rows) {
      lse[row] = lse_value(max2[i] * Acc(kLn2), total);
    }
  }
  store_product<Tile>(product, [&](int i) { return inverse[i]; }, p.out, row0, p.rows, p.dim, d0);
}

}  // namespace
}  // namespace macl::cuda
