// How a CTA walks the streamed side: shared-memory layout, cp.async loads and the
// double-buffered main loop every kernel of negative_lse_kernels.cu shares.
//
// A CTA owns Tile::kOwned rows (anchors, or candidates in the column pass) and streams
// the other side's rows Tile::kStreamed at a time. Rows are copied 16 bytes per cp.async
// into shared memory rows padded by 16 bytes (ldmatrix and 16-byte reads are then free of
// bank conflicts). Two layouts, chosen on the host by what fits the device:
//  - resident: the owned rows stay in shared memory with all their features for the
//    whole kernel; each step streams one tile's full rows;
//  - chunked (wide embeddings): a step streams kChunk features of one tile together with
//    the same features of the owned rows; a tile takes ceil(ld / kChunk) steps.
// Steps are double-buffered: while a step computes from one stage, the next step's
// copies land in the other, with one __syncthreads() per step.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ptx.cuh"

namespace macl::cuda {

template <typename Tile, typename In>
struct Geometry {
  static constexpr int kPad = 16 / sizeof(In);   // elements of padding per shared row
  static constexpr int kChunk = Tile::kOutput;   // features per chunked step = gradient features per CTA
  int ld;                 // features per row (padded, a multiple of Tile::kStep and of 16 bytes)
  bool resident;
  int params_bytes;       // per streamed row, per stage (column pass: ColumnParams), else 0

  __host__ __device__ int stage_features() const { return resident ? ld : kChunk; }
  __host__ __device__ int stride() const { return stage_features() + kPad; }
  __host__ __device__ int chunks() const { return resident ? 1 : (ld + kChunk - 1) / kChunk; }
  // Gradient features are written in chunks of kChunk, one chunk per CTA (grid.y).
  __host__ __device__ int output_chunks() const { return (ld + kChunk - 1) / kChunk; }
  __host__ __device__ size_t owned_bytes() const {
    return static_cast<size_t>(resident ? 1 : 2) * Tile::kOwned * stride() * sizeof(In);
  }
  __host__ __device__ size_t streamed_bytes() const {
    return static_cast<size_t>(2) * Tile::kStreamed * stride() * sizeof(In);
  }
  __host__ __device__ size_t all_params_bytes() const {
    return static_cast<size_t>(2) * Tile::kStreamed * params_bytes;
  }
  __host__ __device__ size_t shared_bytes() const {
    return owned_bytes() + streamed_bytes() + all_params_bytes() + Tile::kScratchBytes;
  }
  // The resident layout needs one thread per 16-byte piece of a row, at most.
  __host__ static bool can_be_resident(int ld) { return ld * static_cast<int>(sizeof(In)) / 16 <= Tile::kThreads; }
};

// Copies `count` rows of a row-major array of `ld`-element rows to shared memory rows of
// `stride` elements: features [f0, f0 + width) of each, zeros past the array's last row
// or last feature. Each thread copies one 16-byte piece of a row and moves down the rows;
// the width and the strides are fixed per loader, so a copy costs a few instructions.
template <typename In>
class RowLoader {
 public:
  static constexpr int kPiece = 16 / sizeof(In);  // elements per copy

  __device__ RowLoader(int width, int threads, int64_t ld, int stride) : ld_(ld), stride_(stride) {
    const int pieces = width / kPiece;
    piece_ = threadIdx.x % pieces;
    first_row_ = threadIdx.x / pieces;
    row_step_ = threads / pieces;
    if (threadIdx.x >= row_step_ * pieces) {
      first_row_ = 1 << 30;  // an idle thread: no row
    }
  }

  // Rows [row0, row0 + count) of `src` (n rows), features from f0, into dst.
  __device__ void load(In* dst, const In* src, int64_t n, int64_t row0, int count, int64_t f0) const {
    const int64_t feature = f0 + piece_ * kPiece;
    // Rows that exist and whose piece holds features: copied; the rest: zero-filled.
    const int64_t rows_left = feature < ld_ ? n - row0 : 0;
    const int valid = static_cast<int>(rows_left < count ? (rows_left > 0 ? rows_left : 0) : count);
    const In* from = src + (row0 + first_row_) * ld_ + feature;
    In* to = dst + first_row_ * stride_ + piece_ * kPiece;
    const int64_t from_step = row_step_ * ld_;
    const int to_step = row_step_ * stride_;
    int r = first_row_;
    for (; r < valid; r += row_step_, from += from_step, to += to_step) {
      ptx::cp_async_16(to, from, 16);
    }
    for (; r < count; r += row_step_, to += to_step) {
      ptx::cp_async_16(to, src, 0);
    }
  }

 private:
  int64_t ld_;
  int stride_;
  int piece_, first_row_, row_step_;
};

// Copies `count` records of kBytes (a multiple of 16) each, from record row0 of an array
// of n records, zeros past its end.
template <int kBytes>
__device__ inline void load_records(void* dst, const void* src, int64_t n, int64_t row0, int count, int threads) {
  constexpr int kPieces = kBytes / 16;
  for (int k = threadIdx.x; k < count * kPieces; k += threads) {
    const int64_t row = row0 + k / kPieces;
    const bool inside = row < n;
    const char* from = static_cast<const char*>(src) + (inside ? row * kBytes + (k % kPieces) * 16 : 0);
    ptx::cp_async_16(static_cast<char*>(dst) + k * 16, from, inside ? 16 : 0);
  }
}

// The two sides of a kernel: owned rows [owned0, owned0 + kOwned) of `owned` (n_owned
// rows), streamed tiles of `streamed` (n_streamed rows), both padded operands with row
// length ld; and per-streamed-row records (params, geo.params_bytes each), or null.
template <typename In>
struct Sides {
  const In* owned;
  int64_t n_owned, owned0;
  const In* streamed;
  int64_t n_streamed;
  const void* params;
};

// Computes the scores of the owned rows against every streamed tile, in order, into
// `tile`, and calls on_tile(t, rows, records) once tile t's scores are complete: `rows`
// points at that tile's streamed rows in shared memory, at feature `output_chunk` *
// kChunk (their leading dimension is geo.stride()), `records` at its streamed rows'
// records (kRecordBytes each; geo.params_bytes must equal it). The features of
// output_chunk are the last ones summed, so in the chunked layout they are still in
// shared memory for the gradient product.
template <int kRecordBytes, typename Tile, typename In, typename OnTile>
__device__ void for_each_tile(const Geometry<Tile, In>& geo, const Sides<In>& sides, int output_chunk, Tile& tile,
                              unsigned char* smem, OnTile&& on_tile) {
  constexpr int kOwned = Tile::kOwned, kStreamed = Tile::kStreamed, kChunk = Geometry<Tile, In>::kChunk;
  In* owned_area = reinterpret_cast<In*>(smem);
  In* streamed_area = reinterpret_cast<In*>(smem + geo.owned_bytes());
  unsigned char* params_area = smem + geo.owned_bytes() + geo.streamed_bytes();
  const int stride = geo.stride(), chunks = geo.chunks();
  const int first_chunk = output_chunk + 1 < chunks ? output_chunk + 1 : 0;
  const int tiles = static_cast<int>((sides.n_streamed + kStreamed - 1) / kStreamed);
  const RowLoader<In> loader(geo.stage_features(), Tile::kThreads, geo.ld, stride);

  // Step (t, q): the q-th chunk of features of streamed tile t, into `stage`.
  auto chunk_at = [&](int q) { return first_chunk + q < chunks ? first_chunk + q : first_chunk + q - chunks; };
  auto issue = [&](int t, int q, int stage) {
    const int64_t f0 = geo.resident ? 0 : static_cast<int64_t>(chunk_at(q)) * kChunk;
    loader.load(streamed_area + stage * kStreamed * stride, sides.streamed, sides.n_streamed,
                static_cast<int64_t>(t) * kStreamed, kStreamed, f0);
    if (!geo.resident) {
      loader.load(owned_area + stage * kOwned * stride, sides.owned, sides.n_owned, sides.owned0, kOwned, f0);
    }
    if constexpr (kRecordBytes > 0) {
      if (q == 0) {
        load_records<kRecordBytes>(params_area + (t & 1) * kStreamed * kRecordBytes, sides.params, sides.n_streamed,
                                   static_cast<int64_t>(t) * kStreamed, kStreamed, Tile::kThreads);
      }
    }
  };

  if (geo.resident) {
    loader.load(owned_area, sides.owned, sides.n_owned, sides.owned0, kOwned, 0);
  }
  if (tiles > 0) {
    issue(0, 0, 0);
  }
  ptx::cp_async_commit();
  int stage = 0;
  for (int t = 0; t < tiles; ++t) {
    for (int q = 0; q < chunks; ++q, stage ^= 1) {
      ptx::cp_async_wait_all();
      __syncthreads();  // this step's rows are in; every thread is done with the other stage
      if (q + 1 < chunks) {
        issue(t, q + 1, stage ^ 1);
      } else if (t + 1 < tiles) {
        issue(t + 1, 0, stage ^ 1);
      }
      ptx::cp_async_commit();
      const int f0 = geo.resident ? 0 : chunk_at(q) * kChunk;
      const int features = min(geo.stage_features(), geo.ld - f0);
      const In* owned_rows = geo.resident ? owned_area : owned_area + stage * kOwned * stride;
      const In* streamed_rows = streamed_area + stage * kStreamed * stride;
      if (q == 0) {
        tile.zero();
      }
      tile.add_scores(owned_rows, stride, streamed_rows, stride, features);
      if (q + 1 == chunks) {
        on_tile(t, streamed_rows + (geo.resident ? output_chunk * kChunk : 0),
                params_area + (t & 1) * kStreamed * kRecordBytes);
      }
    }
  }
  ptx::cp_async_wait_all();  // (nothing is in flight here, but leave none behind)
}

}  // namespace macl::cuda
