// The vectorized tile passes declared in tile_passes.h. setup.py compiles this file
// once per instruction set with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 and the matching
// -m flags, like ATen's native/cpu kernels; at::vec picks its implementation from that.
#include "tile_passes.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>

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

template <typename T>
void row_weights(T* tile, int64_t rows, int64_t cols, int64_t ld, const T* row_shift, const T* row_coef) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  for (int64_t i = 0; i < rows; ++i) {
    T* row = tile + i * ld;
    const Vec shift(row_shift[i]);
    const Vec coef(row_coef[i]);
    for (int64_t j = 0; j < cols; j += W) {
      const int64_t width = std::min<int64_t>(W, cols - j);
      const Vec weight = coef * (Vec::loadu(row + j, width) - shift).exp();
      weight.store(row + j, width);
    }
  }
}

template <typename T>
void pair_weights(T* tile, int64_t rows, int64_t cols, int64_t ld, const T* row_shift, const T* row_coef,
                  const T* col_shift, const T* col_coef) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  for (int64_t i = 0; i < rows; ++i) {
    T* row = tile + i * ld;
    const Vec shift(row_shift[i]);
    const Vec coef(row_coef[i]);
    for (int64_t j = 0; j < cols; j += W) {
      const int64_t width = std::min<int64_t>(W, cols - j);
      const Vec logit = Vec::loadu(row + j, width);
      const Vec as_row = coef * (logit - shift).exp();
      const Vec as_col = Vec::loadu(col_coef + j, width) * (logit - Vec::loadu(col_shift + j, width)).exp();
      (as_row + as_col).store(row + j, width);
    }
  }
}

}  // namespace

template <typename T>
TilePasses<T> tile_passes() {
  return TilePasses<T>{&fold_rows<T>, &fold_columns<T>, &row_weights<T>, &pair_weights<T>};
}

template TilePasses<float> tile_passes<float>();
template TilePasses<double> tile_passes<double>();

}  // namespace CPU_CAPABILITY
}  // namespace macl::cpu
