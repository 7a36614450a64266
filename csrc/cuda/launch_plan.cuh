// Which kernels of kernels.cuh run, with which grids and shared memory, for a forward or a
// backward: the same plan whatever runs it. A Runner provides
//   int max_shared() const                       bytes of shared memory a CTA may have
//   cudaError_t launch(kernel, dim3 grid, int threads, size_t shared_bytes, args...)
// (negative_lse_kernels.cu's CudaRunner on a GPU).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "forward_product.cuh"
#include "kernels.cuh"
#include "launch.h"
#include "symmetric_grad.cuh"

namespace macl::cuda {
namespace {

static_assert(Config<__half>::Tile::kThreads <= kMaxThreads && Config<float>::Tile::kThreads <= kMaxThreads &&
              Config<double>::Tile::kThreads <= kMaxThreads && Config<__half>::ForwardTile::kThreads <= kMaxThreads);
// Rows of padded operands start on 16-byte boundaries (cp.async copies 16 bytes).
static_assert(Config<__half>::Tile::kStep * sizeof(__half) % 16 == 0 && Config<float>::Tile::kStep * 4 % 16 == 0 &&
              Config<double>::Tile::kStep * 8 % 16 == 0);

template <typename In>
using GeometryOf = Geometry<typename Config<In>::Tile, In>;  // the gradient passes'
template <typename In>
using ForwardGeometryOf = Geometry<typename Config<In>::ForwardTile, In>;

// The resident layout when it fits the device's shared memory, else the chunked one.
template <typename In, typename Geo = GeometryOf<In>>
Geo choose_geometry(int64_t ld, int params_bytes, int max_shared) {
  Geo geo{static_cast<int>(ld), true, params_bytes};
  if (!Geo::can_be_resident(geo.ld) || geo.shared_bytes() > static_cast<size_t>(max_shared)) {
    geo.resident = false;
  }
  return geo;
}

inline unsigned int blocks(int64_t n, int block) {
  return static_cast<unsigned int>((n + block - 1) / block);
}

template <typename In>
Params<In, typename Config<In>::Acc> make_params(const LseArgs& a) {
  using Acc = typename Config<In>::Acc;
  Params<In, Acc> p{};
  p.x = static_cast<const In*>(a.x);
  p.y = static_cast<const In*>(a.y);
  p.excluded = a.excluded;
  p.tau = static_cast<const Acc*>(a.tau);
  p.rows = a.rows;
  p.cols = a.cols;
  p.dim = a.dim;
  p.ld = a.ld;
  return p;
}

template <typename In, typename Runner>
cudaError_t run_forward(Runner& runner, const LseArgs& args, void* lse) {
  using Tile = typename Config<In>::ForwardTile;
  auto p = make_params<In>(args);
  p.out = static_cast<typename Config<In>::Acc*>(lse);
  const auto geo = choose_geometry<In, ForwardGeometryOf<In>>(args.ld, 0, runner.max_shared());
  return runner.launch(negative_lse_forward<In>, dim3(blocks(p.rows, Tile::kOwned)), Tile::kThreads,
                       geo.shared_bytes(), p, geo);
}

// lse and P y (rows x dim): the row pass's tiles and grid (grid.y: product chunks).
template <typename In, typename Runner>
cudaError_t run_forward_product(Runner& runner, const LseArgs& args, void* lse, void* product) {
  using Tile = typename Config<In>::Tile;
  using Acc = typename Config<In>::Acc;
  auto p = make_params<In>(args);
  p.out = static_cast<Acc*>(product);
  const GeometryOf<In> geo = choose_geometry<In>(args.ld, 0, runner.max_shared());
  return runner.launch(negative_lse_forward_product<In>,
                       dim3(blocks(p.rows, Tile::kOwned), static_cast<unsigned int>(geo.output_chunks())),
                       Tile::kThreads, geo.shared_bytes(), p, geo, static_cast<Acc*>(lse));
}

// y = None (dy is dx): symmetric_grad.cuh's one pass, after its setup; both formulas are
// launched, the one that is not the case returns at once.
template <typename In, typename Runner>
cudaError_t run_symmetric_backward(Runner& runner, Params<In, typename Config<In>::Acc> p, const BackwardArgs& b) {
  using Tile = typename Config<In>::Tile;
  using Acc = typename Config<In>::Acc;
  auto* records = static_cast<ColumnParams<Acc>*>(b.workspace);
  p.shared_shift = static_cast<const Acc*>(b.shared_shift);
  cudaError_t status = runner.launch(negative_lse_symmetric_params<Acc>, dim3(blocks(p.rows, 256)), 256, 0,
                                     p.excluded, p.tau, p.grad_lse, p.lse, p.shared_shift, p.rows, records);
  p.column_params = records;
  const auto geo = choose_geometry<In>(p.ld, sizeof(ColumnParams<Acc>), runner.max_shared());
  const dim3 grid(blocks(p.rows, Tile::kOwned), static_cast<unsigned int>(geo.output_chunks()));
  if (status == cudaSuccess) {
    status = runner.launch(negative_lse_symmetric_grad<In, true>, grid, Tile::kThreads, geo.shared_bytes(), p, geo);
  }
  if (status == cudaSuccess) {
    status = runner.launch(negative_lse_symmetric_grad<In, false>, grid, Tile::kThreads, geo.shared_bytes(), p, geo);
  }
  return status;
}

template <typename In, typename Runner>
cudaError_t run_backward(Runner& runner, const LseArgs& args, const BackwardArgs& b, void* dx, void* dy) {
  using Tile = typename Config<In>::Tile;
  using Acc = typename Config<In>::Acc;
  auto p = make_params<In>(args);
  p.grad_lse = static_cast<const Acc*>(b.grad_lse);
  p.lse = static_cast<const Acc*>(b.lse);
  p.max_abs_coef = static_cast<const Acc*>(b.max_abs_coef);
  p.out = static_cast<Acc*>(dx);
  if (dx != nullptr && dy == dx) {  // (both null: nothing asked)
    return run_symmetric_backward<In>(runner, p, b);
  }
  GeometryOf<In> geo = choose_geometry<In>(args.ld, 0, runner.max_shared());
  const unsigned int chunks = static_cast<unsigned int>(geo.output_chunks());
  cudaError_t status = cudaSuccess;
  if (dx != nullptr) {  // (null: dx comes from the forward's P y)
    status = runner.launch(negative_lse_rows_grad<In>, dim3(blocks(p.rows, Tile::kOwned), chunks), Tile::kThreads,
                           geo.shared_bytes(), p, geo);
  }
  if (status != cudaSuccess || dy == nullptr || p.cols == 0) {
    return status;
  }
  auto* records = static_cast<ColumnParams<Acc>*>(b.workspace);
  p.group_rows = column_scale_rows(std::is_same_v<In, __half>, p.rows);  // (as op_host.h's groups)
  status = runner.launch(negative_lse_column_params<Acc>, dim3(blocks(p.rows, 256)), 256, 0, p.excluded, p.tau,
                         p.grad_lse, p.lse, p.max_abs_coef, p.group_rows, p.rows, records);
  if (status != cudaSuccess) {
    return status;
  }
  p.column_params = records;
  p.out = static_cast<Acc*>(dy);
  geo = choose_geometry<In>(args.ld, sizeof(ColumnParams<Acc>), runner.max_shared());
  return runner.launch(negative_lse_cols_grad<In>, dim3(blocks(p.cols, Tile::kOwned), chunks), Tile::kThreads,
                       geo.shared_bytes(), p, geo);
}

// launch.h's padded_features and backward_workspace_bytes.
inline int64_t padded_features_of(InputType type, int64_t dim) {
  auto round_up = [dim](int64_t step) { return (dim + step - 1) / step * step; };
  switch (type) {
    case InputType::kFloat16:
    case InputType::kBFloat16:
      return round_up(Config<__half>::Tile::kStep);
    case InputType::kFloat32:
      return round_up(Config<float>::Tile::kStep);
    case InputType::kFloat64:
      return round_up(Config<double>::Tile::kStep);
  }
  return dim;
}

inline size_t backward_workspace_bytes_of(InputType type, int64_t rows) {
  const size_t record = type == InputType::kFloat64 ? sizeof(ColumnParams<double>) : sizeof(ColumnParams<float>);
  return static_cast<size_t>(rows) * record;
}

template <typename Runner>
cudaError_t run_forward(Runner& runner, InputType type, const LseArgs& args, void* lse) {
  switch (type) {
    case InputType::kFloat32:
      return run_forward<float>(runner, args, lse);
    case InputType::kFloat64:
      return run_forward<double>(runner, args, lse);
    case InputType::kFloat16:
      return run_forward<__half>(runner, args, lse);
    case InputType::kBFloat16:
      return run_forward<__nv_bfloat16>(runner, args, lse);
  }
  return cudaErrorInvalidValue;
}

template <typename Runner>
cudaError_t run_forward_product(Runner& runner, InputType type, const LseArgs& args, void* lse, void* product) {
  switch (type) {
    case InputType::kFloat32:
      return run_forward_product<float>(runner, args, lse, product);
    case InputType::kFloat64:
      return run_forward_product<double>(runner, args, lse, product);
    case InputType::kFloat16:
      return run_forward_product<__half>(runner, args, lse, product);
    case InputType::kBFloat16:
      return run_forward_product<__nv_bfloat16>(runner, args, lse, product);
  }
  return cudaErrorInvalidValue;
}

template <typename Runner>
cudaError_t run_backward(Runner& runner, InputType type, const LseArgs& args, const BackwardArgs& b, void* dx,
                         void* dy) {
  switch (type) {
    case InputType::kFloat32:
      return run_backward<float>(runner, args, b, dx, dy);
    case InputType::kFloat64:
      return run_backward<double>(runner, args, b, dx, dy);
    case InputType::kFloat16:
      return run_backward<__half>(runner, args, b, dx, dy);
    case InputType::kBFloat16:
      return run_backward<__nv_bfloat16>(runner, args, b, dx, dy);
  }
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace macl::cuda
