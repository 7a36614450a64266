// The vectorized tile passes declared in tile_passes.h. setup.py compiles this file
// once per instruction set with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 and the matching
// -m flags, like ATen's native/cpu kernels; at::vec picks its implementation from that.
#include "tile_passes.h"

#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../lse_math.h"

#ifndef CPU_CAPABILITY
#error "compile tile_passes.cpp with -DCPU_CAPABILITY=DEFAULT, AVX2 or AVX512 (see setup.py)"
#endif

namespace macl::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Loads count (< size) lanes, filling the rest with fill.
template <typename T>
Vectorized<T> load_partial(const T* p, int64_t count, T fill) {
  return Vectorized<T>::set(Vectorized<T>(fill), Vectorized<T>::loadu(p, count), count);
}

template <typename T>
T horizontal_max(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  return *std::max_element(lanes, lanes + Vectorized<T>::size());
}

template <typename T>
T horizontal_sum(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T total = 0;
  for (int64_t k = 0; k < Vectorized<T>::size(); ++k) {
    total += lanes[k];
  }
  return total;
}

template <typename T>
void fold_rows(const T* tile, int64_t rows, int64_t cols, int64_t ld, T* row_max, T* row_sum) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T ninf = negative_infinity<T>();
  const int64_t body = cols - cols % W;
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = tile + i * ld;
    Vec vmax(ninf);
    for (int64_t j = 0; j < body; j += W) {
      vmax = at::vec::maximum(vmax, Vec::loadu(row + j));
    }
    if (body < cols) {
      vmax = at::vec::maximum(vmax, load_partial(row + body, cols - body, ninf));
    }
    const T tile_max = horizontal_max(vmax);
    if (tile_max == ninf) {
      continue;  // every column of this row is masked
    }
    const Vec shift(tile_max);
    Vec vsum(T(0));
    for (int64_t j = 0; j < body; j += W) {
      vsum += (Vec::loadu(row + j) - shift).exp();
    }
    if (body < cols) {
      vsum += (load_partial(row + body, cols - body, ninf) - shift).exp();
    }
    lse_merge(row_max[i], row_sum[i], tile_max, horizontal_sum(vsum));
  }
}

template <typename T>
void fold_columns(const T* tile, int64_t rows, int64_t cols, int64_t ld, T* col_max, T* col_sum) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T ninf = negative_infinity<T>();
  const Vec vninf(ninf);
  const Vec zero(T(0));
  alignas(64) T lane_max[W];
  alignas(64) T lane_sum[W];
  for (int64_t j = 0; j < cols; j += W) {
    const int64_t width = std::min<int64_t>(W, cols - j);
    auto load = [&](int64_t i) {
      return width == W ? Vec::loadu(tile + i * ld + j) : load_partial(tile + i * ld + j, width, ninf);
    };
    Vec vmax = vninf;
    for (int64_t i = 0; i < rows; ++i) {
      vmax = at::vec::maximum(vmax, load(i));
    }
    // A fully masked column keeps max -inf; shift it by 0 so that exp(-inf - 0) = 0, not NaN.
    const Vec shift = Vec::blendv(vmax, zero, vmax == vninf);
    Vec vsum = zero;
    for (int64_t i = 0; i < rows; ++i) {
      vsum += (load(i) - shift).exp();
    }
    vmax.store(lane_max);
    vsum.store(lane_sum);
    for (int64_t k = 0; k < width; ++k) {
      lse_merge(col_max[j + k], col_sum[j + k], lane_max[k], lane_sum[k]);
    }
  }
}

// v rounded to the operand type of `R` and back (lse_math.h's weight_operand, vectorized:
// at::vec's conversions round to nearest even, as c10::Half / c10::BFloat16 do).
template <Rounding R, typename T>
Vectorized<T> round_operand(const Vectorized<T>& v) {
  if constexpr (R == Rounding::kNone) {
    return v;
  } else {
    static_assert(std::is_same_v<T, float>, "only float32 accumulators hold fp16/bf16 operands");
    if constexpr (R == Rounding::kHalf) {
      return std::get<0>(at::vec::convert_half_float(at::vec::convert_float_half(v, v)));
    } else {
      return std::get<0>(at::vec::convert_bfloat16_float(at::vec::convert_float_bfloat16(v, v)));
    }
  }
}

// The weights of logits t of one anchor (scalars broadcast) or of one anchor per lane.
template <Rounding R, typename T>
Vectorized<T> view_weights(const Vectorized<T>& t, const Vectorized<T>& shift, const Vectorized<T>& factor,
                           const Vectorized<T>& after) {
  return after * round_operand<R>(factor * (t - shift).exp());
}

template <Rounding R, typename T>
void weights_of(const T* tile, T* out, int64_t rows, int64_t cols, int64_t ld, WeightView<T> view) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  for (int64_t i = 0; i < rows; ++i) {
    const Vec shift(view.shift[i]), factor(view.factor[i]), after(view.after[i]);
    for (int64_t j = 0; j < cols; j += W) {
      const int64_t width = std::min<int64_t>(W, cols - j);
      view_weights<R>(Vec::loadu(tile + i * ld + j, width), shift, factor, after).store(out + i * ld + j, width);
    }
  }
}

template <Rounding R, typename T>
void pair_weights_of(const T* tile, T* out, int64_t rows, int64_t cols, int64_t ld, WeightView<T> rv,
                     WeightView<T> cv) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  for (int64_t i = 0; i < rows; ++i) {
    const Vec shift(rv.shift[i]), factor(rv.factor[i]), after(rv.after[i]);
    for (int64_t j = 0; j < cols; j += W) {
      const int64_t width = std::min<int64_t>(W, cols - j);
      const Vec t = Vec::loadu(tile + i * ld + j, width);
      const Vec as_row = view_weights<R>(t, shift, factor, after);
      const Vec as_col = view_weights<R>(t, Vec::loadu(cv.shift + j, width), Vec::loadu(cv.factor + j, width),
                                         Vec::loadu(cv.after + j, width));
      (as_row + as_col).store(out + i * ld + j, width);
    }
  }
}

template <Rounding R, typename T>
void product_weights_of(T* tile, int64_t rows, int64_t cols, int64_t ld, T* row_max, T* row_sum, T* product,
                        int64_t product_ld, int64_t features) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T ninf = negative_infinity<T>();
  // Lanes past the last column load as -inf: no say in the max, a term of 0.
  auto load = [&](const T* p, int64_t width) { return width == W ? Vec::loadu(p) : load_partial(p, width, ninf); };
  for (int64_t i = 0; i < rows; ++i) {
    T* row = tile + i * ld;
    Vec vmax(ninf);
    for (int64_t j = 0; j < cols; j += W) {
      vmax = at::vec::maximum(vmax, load(row + j, std::min<int64_t>(W, cols - j)));
    }
    const T next = std::max(row_max[i], horizontal_max(vmax));
    if (next > row_max[i]) {  // the row's sum and product rescaled to the new max (from -inf: by 0)
      const T factor = exp_of(row_max[i] - next);
      row_sum[i] *= factor;
      T* out = product + i * product_ld;
      for (int64_t d = 0; d < features; ++d) {
        out[d] *= factor;
      }
      row_max[i] = next;
    }
    const Vec shift(next == ninf ? T(0) : next);  // no negative yet: every term is exp(-inf) = 0
    Vec vsum(T(0));
    for (int64_t j = 0; j < cols; j += W) {
      const int64_t width = std::min<int64_t>(W, cols - j);
      const Vec term = (load(row + j, width) - shift).exp();
      vsum += term;
      round_operand<R>(term).store(row + j, width);
    }
    row_sum[i] += horizontal_sum(vsum);
  }
}

// Runs fn.template operator()<R>() for the rounding of the call (float tiles only round).
template <typename T, typename Fn>
void with_rounding(Rounding rounding, const Fn& fn) {
  if constexpr (std::is_same_v<T, float>) {
    switch (rounding) {
      case Rounding::kHalf:
        return fn(std::integral_constant<Rounding, Rounding::kHalf>{});
      case Rounding::kBFloat16:
        return fn(std::integral_constant<Rounding, Rounding::kBFloat16>{});
      case Rounding::kNone:
        break;
    }
  }
  TORCH_CHECK(rounding == Rounding::kNone, "macl_kernels: fp16/bf16 rounding needs float32 tiles");
  fn(std::integral_constant<Rounding, Rounding::kNone>{});
}

template <typename T>
void weights(const T* tile, T* out, int64_t rows, int64_t cols, int64_t ld, WeightView<T> view, Rounding rounding) {
  with_rounding<T>(rounding, [&](auto r) { weights_of<decltype(r)::value>(tile, out, rows, cols, ld, view); });
}

template <typename T>
void product_weights(T* tile, int64_t rows, int64_t cols, int64_t ld, T* row_max, T* row_sum, T* product,
                     int64_t product_ld, int64_t features, Rounding rounding) {
  with_rounding<T>(rounding, [&](auto r) {
    product_weights_of<decltype(r)::value>(tile, rows, cols, ld, row_max, row_sum, product, product_ld, features);
  });
}

template <typename T>
void pair_weights(const T* tile, T* out, int64_t rows, int64_t cols, int64_t ld, WeightView<T> rows_view,
                  WeightView<T> cols_view, Rounding rounding) {
  with_rounding<T>(rounding, [&](auto r) {
    pair_weights_of<decltype(r)::value>(tile, out, rows, cols, ld, rows_view, cols_view);
  });
}

}  // namespace

template <typename T>
TilePasses<T> tile_passes() {
  return TilePasses<T>{&fold_rows<T>, &fold_columns<T>, &product_weights<T>, &weights<T>, &pair_weights<T>};
}

template TilePasses<float> tile_passes<float>();
template TilePasses<double> tile_passes<double>();

}  // namespace CPU_CAPABILITY
}  // namespace macl::cpu
