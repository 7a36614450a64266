// Picks the tile passes compiled for the best instruction set this CPU has.
#include <ATen/Version.h>

#include <string>

#include "tile_passes.h"

namespace macl::cpu {

template <typename T>
static TilePasses<T> best_tile_passes() {
  // ATen's answer, which honours ATEN_CPU_CAPABILITY (e.g. =default) like ATen's own kernels.
  const std::string capability = at::get_cpu_capability();
#if defined(MACL_CPU_AVX512)
  if (capability == "AVX512") {
    return AVX512::tile_passes<T>();
  }
#endif
#if defined(MACL_CPU_AVX2)
  if (capability == "AVX2" || capability == "AVX512") {
    return AVX2::tile_passes<T>();
  }
#endif
  return DEFAULT::tile_passes<T>();
}

template <typename T>
const TilePasses<T>& tile_passes() {
  static const TilePasses<T> passes = best_tile_passes<T>();
  return passes;
}

template const TilePasses<float>& tile_passes<float>();
template const TilePasses<double>& tile_passes<double>();

}  // namespace macl::cpu
