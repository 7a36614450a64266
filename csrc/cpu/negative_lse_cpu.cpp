// The CPU kernels of macl_kernels::negative_lse and its backward (backend "cpp").
//
// Anchors and candidates are cut into blocks; a tile of logits (one block of anchors x
// one block of candidates) comes from one gemm, then one vectorized pass masks, scales
// and folds it into the running log-sum-exps (forward) or turns it into gradient
// weights for two more gemms (backward). Only O(block^2) scratch per thread and O(M)
// state exist; the M x C matrix never does.
//
// Without candidates (y = None, the ntxent layout) S = X X^T is symmetric: each tile
// (I, J > I) is computed once and serves the rows of I and, transposed, the rows of J,
// which halves the gemms and exps of both passes. Tiles are visited in the rounds of
// schedule.h and every gemm is a sequential one (blas_threads.h), so the result does
// not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <thread>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../lse_math.h"
#include "blas_threads.h"
#include "schedule.h"
#include "tile_passes.h"

namespace macl::cpu {
namespace {

// Rows per block: a 256 x 256 float tile (256 KiB) stays in L2 next to its operands,
// and the gemms are large enough to run near the BLAS peak.
constexpr int64_t kBlock = 256;

int64_t blocks_of(int64_t n) {
  return (n + kBlock - 1) / kBlock;
}

template <typename T>
struct Problem {
  at::Tensor x;  // M x D anchors in the accumulation type, contiguous
  at::Tensor y;  // C x D candidates; the same tensor as x when symmetric
  const int32_t* excluded;  // M x 2
  bool symmetric;
  T inv_tau;
  Rounding rounding;  // of the backward's weights: those of fp16/bf16 inputs, as on the GPU

  int64_t rows() const { return x.size(0); }
  int64_t cols() const { return y.size(0); }
  at::Tensor anchors(int64_t block) const { return x.narrow(0, block * kBlock, block_size(block, rows())); }
  at::Tensor candidates(int64_t block) const { return y.narrow(0, block * kBlock, block_size(block, cols())); }
  static int64_t block_size(int64_t block, int64_t n) { return std::min(kBlock, n - block * kBlock); }
};

// An entry of a tile that is not a negative for its row, its column, or both, with
// the logit it had before a pass overwrote it.
template <typename T>
struct MaskedEntry {
  int64_t row, col;
  T logit;
};

// One thread's scratch: a tile buffer, its masked entries, and a second tile buffer for
// the rounded backward, where a tile's row and column views round differently.
template <typename T>
class TileWorker {
 public:
  explicit TileWorker(const Problem<T>& p) : p_(p), buffer_(at::empty({kBlock * kBlock}, p.x.options())) {}

  // A second rows x cols tile, allocated on first use.
  at::Tensor second_tile(int64_t rows, int64_t cols) {
    if (!second_.defined()) {
      second_ = at::empty({kBlock * kBlock}, p_.x.options());
    }
    return second_.narrow(0, 0, rows * cols).view({rows, cols});
  }

  // Logits of row block I against column block J, row-major (rows x cols).
  at::Tensor logits(int64_t I, int64_t J) {
    const at::Tensor a = p_.anchors(I);
    const at::Tensor b = p_.candidates(J);
    at::Tensor tile = buffer_.narrow(0, 0, a.size(0) * b.size(0)).view({a.size(0), b.size(0)});
    at::addmm_out(tile, tile, a, b.t(), /*beta=*/0, /*alpha=*/p_.inv_tau);
    r0_ = I * kBlock;
    c0_ = J * kBlock;
    return tile;
  }

  // Entries (i, j) of the current tile whose column is excluded for their row.
  const std::vector<MaskedEntry<T>>& row_masked(const at::Tensor& tile) {
    row_masked_.clear();
    const int64_t nr = tile.size(0), nc = tile.size(1);
    const T* t = tile.const_data_ptr<T>();
    for (int64_t i = 0; i < nr; ++i) {
      for (int64_t k = 0; k < 2; ++k) {
        const int64_t j = p_.excluded[(r0_ + i) * 2 + k] - c0_;
        if (j >= 0 && j < nc) {
          row_masked_.push_back({i, j, t[i * nc + j]});
        }
      }
    }
    return row_masked_;
  }

  // Symmetric tiles: entries (i, j) whose row is excluded for their column, column j
  // seen as an anchor.
  const std::vector<MaskedEntry<T>>& column_masked(const at::Tensor& tile) {
    column_masked_.clear();
    const int64_t nr = tile.size(0), nc = tile.size(1);
    const T* t = tile.const_data_ptr<T>();
    for (int64_t j = 0; j < nc; ++j) {
      for (int64_t k = 0; k < 2; ++k) {
        const int64_t i = p_.excluded[(c0_ + j) * 2 + k] - r0_;
        if (i >= 0 && i < nr) {
          column_masked_.push_back({i, j, t[i * nc + j]});
        }
      }
    }
    return column_masked_;
  }

  static void set(const at::Tensor& tile, const std::vector<MaskedEntry<T>>& entries, bool restore) {
    T* t = tile.data_ptr<T>();
    for (const auto& e : entries) {
      t[e.row * tile.size(1) + e.col] = restore ? e.logit : negative_infinity<T>();
    }
  }

  int64_t row0() const { return r0_; }
  int64_t col0() const { return c0_; }

 private:
  const Problem<T>& p_;
  at::Tensor buffer_, second_;
  std::vector<MaskedEntry<T>> row_masked_, column_masked_;
  int64_t r0_ = 0, c0_ = 0;
};

// Runs task(worker, k) for every k in [0, round_starts.back()) on all threads. Tasks
// [round_starts[r], round_starts[r + 1]) form round r: they run in parallel, and each
// starts only once every task of the earlier rounds is done. Threads take tasks in
// order from a shared counter and, at a round's edge, wait by yielding rather than at
// a barrier, so a thread that the OS parks (a busy, shared machine) holds up only the
// tasks that really depend on it. Results never depend on which thread ran a task.
template <typename T, typename Task>
void run_tasks(const Problem<T>& p, const std::vector<int64_t>& round_starts, const Task& task) {
  const int64_t total = round_starts.back();
  std::vector<int64_t> round_start_of(total);
  for (size_t r = 0; r + 1 < round_starts.size(); ++r) {
    std::fill(round_start_of.begin() + round_starts[r], round_start_of.begin() + round_starts[r + 1],
              round_starts[r]);
  }
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};  // tasks finished; all from earlier rounds until a round's start is reached
  std::atomic<bool> failed{false};
  const at::ThreadLocalState caller_state;  // OpenMP workers start without the dispatcher state of the op
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const ScopedSequentialBlas sequential_blas;  // the same gemm code path for any thread count
    TileWorker<T> worker(p);
    for (int64_t k = next.fetch_add(1); k < total; k = next.fetch_add(1)) {
      while (done.load(std::memory_order_acquire) < round_start_of[k]) {
        if (failed.load()) {
          return;
        }
        std::this_thread::yield();
      }
      try {
        task(worker, k);
      } catch (...) {
        failed.store(true);
        throw;
      }
      done.fetch_add(1, std::memory_order_release);
    }
    // Leave together: OpenMP's closing barrier spins, which a busy machine punishes.
    while (done.load(std::memory_order_acquire) < total && !failed.load()) {
      std::this_thread::yield();
    }
  });
}

// Runs fn(worker, I, J) on every tile of every round, the tiles of a round in parallel.
template <typename T, typename Fn>
void run_rounds(const Problem<T>& p, const Rounds& rounds, const Fn& fn) {
  std::vector<Tile> tiles;
  std::vector<int64_t> round_starts{0};
  for (const auto& round : rounds) {
    tiles.insert(tiles.end(), round.begin(), round.end());
    round_starts.push_back(static_cast<int64_t>(tiles.size()));
  }
  run_tasks(p, round_starts, [&](TileWorker<T>& w, int64_t k) { fn(w, tiles[k].first, tiles[k].second); });
}

// Runs fn(worker, I, J) for every column block J in order, row blocks I in parallel:
// for outputs owned by rows only.
template <typename T, typename Fn>
void run_row_blocks(const Problem<T>& p, const Fn& fn) {
  run_tasks(p, {0, blocks_of(p.rows())}, [&](TileWorker<T>& w, int64_t I) {
    for (int64_t J = 0; J < blocks_of(p.cols()); ++J) {
      fn(w, I, J);
    }
  });
}

template <typename T>
at::Tensor forward(const Problem<T>& p) {
  const TilePasses<T>& passes = tile_passes<T>();
  std::vector<T> max(p.rows(), negative_infinity<T>());
  std::vector<T> sum(p.rows(), T(0));

  auto fold_rows = [&](TileWorker<T>& w, const at::Tensor& tile) {
    passes.fold_rows(tile.const_data_ptr<T>(), tile.size(0), tile.size(1), tile.size(1), &max[w.row0()],
                     &sum[w.row0()]);
  };
  auto rows_only = [&](TileWorker<T>& w, int64_t I, int64_t J) {
    at::Tensor tile = w.logits(I, J);
    TileWorker<T>::set(tile, w.row_masked(tile), /*restore=*/false);
    fold_rows(w, tile);
  };
  if (!p.symmetric) {
    run_row_blocks(p, rows_only);
  } else {
    run_rounds(p, symmetric_rounds(blocks_of(p.rows())), [&](TileWorker<T>& w, int64_t I, int64_t J) {
      if (I == J) {
        rows_only(w, I, J);
        return;
      }
      at::Tensor tile = w.logits(I, J);
      const auto& row_masked = w.row_masked(tile);
      TileWorker<T>::set(tile, row_masked, /*restore=*/false);
      fold_rows(w, tile);
      TileWorker<T>::set(tile, row_masked, /*restore=*/true);
      TileWorker<T>::set(tile, w.column_masked(tile), /*restore=*/false);
      passes.fold_columns(tile.const_data_ptr<T>(), tile.size(0), tile.size(1), tile.size(1), &max[w.col0()],
                          &sum[w.col0()]);
    });
  }

  at::Tensor lse = at::empty({p.rows()}, p.x.options());
  T* out = lse.data_ptr<T>();
  for (int64_t r = 0; r < p.rows(); ++r) {
    out[r] = lse_value(max[r], sum[r]);
  }
  return lse;
}

// The forward with P y (candidates given): per block of anchors, the column blocks in order,
// each tile's logits turned into the online softmax's terms (rounded to the input type as
// the GPU's product operands) and multiplied with the candidates into the block's running
// product, which a rising max rescales. One more gemm per tile than the forward; the
// backward then skips dx's (with dy, the same gemm count in all).
template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_product(const Problem<T>& p) {
  const TilePasses<T>& passes = tile_passes<T>();
  std::vector<T> max(p.rows(), negative_infinity<T>());
  std::vector<T> sum(p.rows(), T(0));
  at::Tensor product = at::zeros_like(p.x);
  run_row_blocks(p, [&](TileWorker<T>& w, int64_t I, int64_t J) {
    at::Tensor tile = w.logits(I, J);
    TileWorker<T>::set(tile, w.row_masked(tile), /*restore=*/false);
    at::Tensor rows = product.narrow(0, w.row0(), tile.size(0));
    passes.product_weights(tile.data_ptr<T>(), tile.size(0), tile.size(1), tile.size(1), &max[w.row0()],
                           &sum[w.row0()], rows.data_ptr<T>(), rows.stride(0), rows.size(1), p.rounding);
    rows.addmm_(tile, p.candidates(J));
  });
  at::Tensor lse = at::empty({p.rows()}, p.x.options());
  T* out = lse.data_ptr<T>();
  T* rows = product.data_ptr<T>();
  for (int64_t r = 0; r < p.rows(); ++r) {
    out[r] = lse_value(max[r], sum[r]);
    const T inverse = sum[r] > T(0) ? T(1) / sum[r] : T(0);  // no negatives: a zero row
    for (int64_t d = 0; d < product.size(1); ++d) {
      rows[r * product.size(1) + d] *= inverse;
    }
  }
  return {lse, product};
}

// The weight of one logit for anchor a of a view, 0 where a's exclusions mask column
// `other` (the scalar twin of the vectorized passes, for masked entries).
template <typename T>
T view_weight(const Problem<T>& p, const WeightView<T>& view, int64_t a, int64_t other, T logit) {
  if (is_excluded(other, p.excluded[2 * a], p.excluded[2 * a + 1])) {
    return T(0);
  }
  const T probability = exp_of(logit - view.shift[a]);
  T operand;
  switch (p.rounding) {
    case Rounding::kHalf:
      operand = static_cast<float>(weight_operand<c10::Half>(probability, view.factor[a]));
      break;
    case Rounding::kBFloat16:
      operand = static_cast<float>(weight_operand<c10::BFloat16>(probability, view.factor[a]));
      break;
    default:
      operand = weight_operand<T>(probability, view.factor[a]);
  }
  return view.after[a] * operand;
}

// The two views of the weights E[r, c] = coef[r] * exp(logit - lse[r]) of lse_math.h: the
// row view serves the products into an anchor's own gradient row (dx += E y), the column
// view those that sum over anchors (dy += E^T x). Without rounding both give E.
template <typename T>
struct Views {
  std::vector<T> shift, row_factor, row_after, column_factor, column_after;

  Views(const Problem<T>& p, const at::Tensor& grad_lse, const at::Tensor& lse)
      : shift(p.rows()), row_factor(p.rows()), row_after(p.rows()), column_factor(p.rows()), column_after(p.rows()) {
    const T* g = grad_lse.const_data_ptr<T>();
    const T* l = lse.const_data_ptr<T>();
    std::vector<T> coef(p.rows());
    for (int64_t r = 0; r < p.rows(); ++r) {
      shift[r] = weight_shift(l[r]);
      coef[r] = g[r] * p.inv_tau;  // dL/dlse / tau (MATH.md section 4)
      const OperandFactors<T> as_row = row_view_factors(coef[r]);
      row_factor[r] = as_row.factor;
      row_after[r] = as_row.after;
    }
    // The column view's scale per group of anchors, as the CUDA column pass has it.
    const int64_t group = column_scale_rows(p.rounding == Rounding::kHalf, p.rows());
    for (int64_t first = 0; first < p.rows(); first += group) {
      const int64_t last = std::min(first + group, p.rows());
      T max_abs_coef = 0;
      for (int64_t r = first; r < last; ++r) {
        max_abs_coef = std::max(max_abs_coef, std::abs(coef[r]));
      }
      const T scale = column_view_scale(max_abs_coef);
      for (int64_t r = first; r < last; ++r) {
        const OperandFactors<T> as_column = column_view_factors(coef[r], scale);
        column_factor[r] = as_column.factor;
        column_after[r] = as_column.after;
      }
    }
  }

  WeightView<T> row() const { return {shift.data(), row_factor.data(), row_after.data()}; }
  WeightView<T> column() const { return {shift.data(), column_factor.data(), column_after.data()}; }
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward(const Problem<T>& p, const at::Tensor& grad_lse, const at::Tensor& lse,
                                            bool need_dy, bool need_dx) {
  const TilePasses<T>& passes = tile_passes<T>();
  const Views<T> views(p, grad_lse, lse);
  const WeightView<T> row_view = views.row();
  // Unrounded, the views agree and one tile of weights serves both kinds of product.
  const bool rounded = p.rounding != Rounding::kNone;
  const WeightView<T> column_view = rounded ? views.column() : row_view;
  at::Tensor dx = need_dx ? at::zeros_like(p.x) : at::Tensor();  // (need_dx is true without y)
  at::Tensor dy = (need_dy && !p.symmetric) ? at::zeros_like(p.y) : at::Tensor();

  // The weights of a tile of masked logits (rows I, columns J) for the anchors of I, in `out`.
  auto weights = [&](TileWorker<T>& w, const at::Tensor& logits, const at::Tensor& out, const WeightView<T>& view) {
    passes.weights(logits.const_data_ptr<T>(), out.data_ptr<T>(), logits.size(0), logits.size(1), logits.size(1),
                   view.at(w.row0()), p.rounding);
    return out;
  };
  // Masked logits of tile (I, J) and their weights in the row view (first) and column view
  // (second: the same tensor when unrounded; undefined when `need_column` is false).
  auto tile_weights = [&](TileWorker<T>& w, int64_t I, int64_t J, bool need_column) {
    at::Tensor logits = w.logits(I, J);
    TileWorker<T>::set(logits, w.row_masked(logits), /*restore=*/false);
    if (!rounded) {
      weights(w, logits, logits, row_view);
      return std::make_pair(logits, logits);
    }
    at::Tensor as_rows = weights(w, logits, w.second_tile(logits.size(0), logits.size(1)), row_view);
    at::Tensor as_columns = need_column ? weights(w, logits, logits, column_view) : at::Tensor();
    return std::make_pair(as_rows, as_columns);
  };
  auto dx_of = [&](int64_t I) { return dx.narrow(0, I * kBlock, Problem<T>::block_size(I, p.rows())); };

  if (!p.symmetric) {
    auto tile_grads = [&](TileWorker<T>& w, int64_t I, int64_t J) {
      if (!dx.defined()) {  // dy alone: the column view's weights
        at::Tensor logits = w.logits(I, J);
        TileWorker<T>::set(logits, w.row_masked(logits), /*restore=*/false);
        weights(w, logits, logits, column_view);
        dy.narrow(0, J * kBlock, Problem<T>::block_size(J, p.cols())).addmm_(logits.t(), p.anchors(I));
        return;
      }
      const auto [as_rows, as_columns] = tile_weights(w, I, J, dy.defined());
      dx_of(I).addmm_(as_rows, p.candidates(J));
      if (dy.defined()) {
        dy.narrow(0, J * kBlock, Problem<T>::block_size(J, p.cols())).addmm_(as_columns.t(), p.anchors(I));
      }
    };
    if (dy.defined()) {
      run_rounds(p, bipartite_rounds(blocks_of(p.rows()), blocks_of(p.cols())), tile_grads);
    } else if (dx.defined()) {
      run_row_blocks(p, tile_grads);
    }
    return {dx, dy};
  }
  // dX = (E + E^T) X. A tile (I, J > I) of logits serves four products: dX_I += F X_J with
  // F = E_IJ (row view, anchors I) + E_JI^T (column view, anchors J), and dX_J += G^T X_I
  // with G = E_IJ (column view) + E_JI^T (row view); unrounded, F = G.
  run_rounds(p, symmetric_rounds(blocks_of(p.rows())), [&](TileWorker<T>& w, int64_t I, int64_t J) {
    if (I == J) {
      const auto [as_rows, as_columns] = tile_weights(w, I, I, /*need_column=*/true);
      const at::Tensor xi = p.anchors(I);
      dx_of(I).addmm_(as_rows, xi).addmm_(as_columns.t(), xi);
      return;
    }
    at::Tensor tile = w.logits(I, J);
    const auto& row_masked = w.row_masked(tile);
    const auto& column_masked = w.column_masked(tile);
    const int64_t r0 = w.row0(), c0 = w.col0(), nr = tile.size(0), nc = tile.size(1);
    at::Tensor f = rounded ? w.second_tile(nr, nc) : tile;
    at::Tensor g = tile;
    // Masked entries: each view's weight from the saved logit, 0 where that view masks it.
    auto repair = [&](const at::Tensor& out, const WeightView<T>& rows_view, const WeightView<T>& cols_view) {
      T* o = out.data_ptr<T>();
      for (const auto* entries : {&row_masked, &column_masked}) {
        for (const MaskedEntry<T>& e : *entries) {
          const int64_t r = r0 + e.row, c = c0 + e.col;
          o[e.row * nc + e.col] = view_weight(p, rows_view, r, c, e.logit) + view_weight(p, cols_view, c, r, e.logit);
        }
      }
    };
    const T* t = tile.const_data_ptr<T>();
    passes.pair_weights(t, f.data_ptr<T>(), nr, nc, nc, row_view.at(r0), column_view.at(c0), p.rounding);
    repair(f, row_view, column_view);
    if (rounded) {  // g last: it overwrites the logits
      passes.pair_weights(t, g.data_ptr<T>(), nr, nc, nc, column_view.at(r0), row_view.at(c0), p.rounding);
      repair(g, column_view, row_view);
    }
    dx_of(I).addmm_(f, p.anchors(J));
    dx_of(J).addmm_(g.t(), p.anchors(I));
  });
  return {dx, dy};
}

template <typename T>
Problem<T> make_problem(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& excluded,
                        const at::Tensor& tau) {
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  Problem<T> p;
  // Detached: the gemms on these are part of the op, never recorded by autograd.
  p.x = x.detach().to(acc).contiguous();
  p.symmetric = !y.has_value();
  p.y = p.symmetric ? p.x : y->detach().to(acc).contiguous();
  p.excluded = excluded.const_data_ptr<int32_t>();
  p.inv_tau = T(1) / tau.to(acc).item<T>();
  p.rounding = x.scalar_type() == at::kHalf       ? Rounding::kHalf
               : x.scalar_type() == at::kBFloat16 ? Rounding::kBFloat16
                                                  : Rounding::kNone;
  return p;
}

at::Tensor negative_lse_cpu(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& excluded,
                            const at::Tensor& tau) {
  check_negative_lse_args(x, y, excluded, tau);
  const at::Tensor excluded_c = excluded.contiguous();
  if (x.scalar_type() == at::kDouble) {
    return forward(make_problem<double>(x, y, excluded_c, tau));
  }
  return forward(make_problem<float>(x, y, excluded_c, tau));
}

std::tuple<at::Tensor, at::Tensor> negative_lse_product_cpu(const at::Tensor& x, const at::Tensor& y,
                                                            const at::Tensor& excluded, const at::Tensor& tau) {
  check_negative_lse_args(x, y, excluded, tau);
  const at::Tensor excluded_c = excluded.contiguous();
  if (x.scalar_type() == at::kDouble) {
    return forward_product(make_problem<double>(x, y, excluded_c, tau));
  }
  return forward_product(make_problem<float>(x, y, excluded_c, tau));
}

std::tuple<at::Tensor, at::Tensor> negative_lse_backward_cpu(const at::Tensor& grad_lse, const at::Tensor& x,
                                                             const std::optional<at::Tensor>& y,
                                                             const at::Tensor& excluded, const at::Tensor& tau,
                                                             const at::Tensor& lse, bool need_dy, bool need_dx) {
  check_negative_lse_args(x, y, excluded, tau);
  check_backward_args(grad_lse, x, lse);
  check_need_dx(y.has_value(), need_dx);
  const at::Tensor excluded_c = excluded.contiguous();
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  const at::Tensor g = grad_lse.to(acc).contiguous();
  const at::Tensor l = lse.to(acc).contiguous();
  auto [dx, dy] = acc == at::kDouble
                      ? backward(make_problem<double>(x, y, excluded_c, tau), g, l, need_dy, need_dx)
                      : backward(make_problem<float>(x, y, excluded_c, tau), g, l, need_dy, need_dx);
  dx = dx.defined() ? dx.to(x.scalar_type()) : at::empty({0}, x.options());
  dy = dy.defined() ? dy.to(y->scalar_type()) : at::empty({0}, x.options());
  return {dx, dy};
}

}  // namespace
}  // namespace macl::cpu

TORCH_LIBRARY_IMPL(macl_kernels, CPU, m) {
  m.impl("negative_lse", &macl::cpu::negative_lse_cpu);
  m.impl("negative_lse_product", &macl::cpu::negative_lse_product_cpu);
  m.impl("negative_lse_backward", &macl::cpu::negative_lse_backward_cpu);
}
