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

// The condition of a rare path (a masked tile, the last partial tile, the chunked
// layout, the forward's repair). A build with -DMACL_CUDA_COMMON_PATH_ONLY, for counting
// the instructions of the common path (tools/cuda_inner_loops.py), still computes the
// condition and branches on it, but to a trap instead of the rare path; the extension's
// build never defines it. (A condition nothing consumes would be deleted by ptxas, and
// the count would miss what the common path pays to test it.)
#if defined(MACL_CUDA_COMMON_PATH_ONLY)
__device__ inline bool rare(bool condition) {
  if (condition) {
    __trap();
  }
  return false;
}
#else
__device__ inline bool rare(bool condition) { return condition; }
#endif

template <typename Tile, typename In>
struct Geometry {
  static constexpr int kPad = 16 / sizeof(In);   // elements of padding per shared row
  static constexpr int kChunk = Tile::kOutput;   // features per chunked step = gradient features per CTA
  int ld;                 // features per row (padded, a multiple of Tile::kStep and of 16 bytes)
  bool resident;
  int params_bytes;       // per streamed row, per stage (column and symmetric passes: ColumnParams), else 0

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
    return owned_bytes() + streamed_bytes() + all_params_bytes() + Tile::kScratchBytes + Tile::kSlackBytes;
  }
  // The resident layout needs one thread per 16-byte piece of a row, at most.
  __host__ static bool can_be_resident(int ld) { return ld * static_cast<int>(sizeof(In)) / 16 <= Tile::kThreads; }
};

// Copies rows of a row-major array of `ld`-element rows to shared memory rows of `stride`
// elements: features [f0, f0 + width) of each, zeros past the array's last row or last
// feature. Each row is copied by kThreads / kCount threads (kCount rows at once), lane h of
// a row taking its 16-byte pieces h, h + lanes, ...: a thread's copies are one row's
// pieces at fixed steps, so that the unrolled loop addresses them by constant offsets
// from one pointer (one instruction per copy), and the lanes of a row read its bytes
// contiguously.
template <typename In, int kThreads>
class RowLoader {
 public:
  static constexpr int kPiece = 16 / sizeof(In);  // elements per copy
  static constexpr int kUnroll = 4;                // copies per iteration of the copy loop

  __device__ RowLoader(int width, int64_t ld, int stride)
      : ld_(ld), pieces_(width / kPiece), stride_bytes_(static_cast<uint32_t>(stride * sizeof(In))) {}

  // Rows [row0, row0 + kCount) of `src` (n > row0 rows), features from f0, to the shared
  // rows starting at address dst.
  template <int kCount>
  __device__ void load(uint32_t dst, const In* src, int n, int row0, int f0) const {
    static_assert(kThreads % kCount == 0, "whole rows per thread group");
    constexpr int kLanes = kThreads / kCount;
    const int row = static_cast<int>(threadIdx.x) / kLanes, lane = static_cast<int>(threadIdx.x) % kLanes;
    const bool exists = row0 + row < n;  // rows past the array's end are zero-filled (from row 0: a valid address)
    const In* from = src + (exists ? static_cast<int64_t>(row0 + row) * ld_ : 0) + f0 + lane * kPiece;
    uint32_t to = dst + row * stride_bytes_ + lane * 16;
    const uint32_t bytes = exists ? 16 : 0;
    // Pieces that hold features; in the chunked layout the last chunk may end before the width.
    const int real = min(pieces_, static_cast<int>((ld_ - f0) / kPiece));
    int k = lane;
#pragma unroll 1
    for (; k + (kUnroll - 1) * kLanes < real; k += kUnroll * kLanes) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) ptx::cp_async_16(to + u * kLanes * 16, from + u * kLanes * kPiece, bytes);
      from += kUnroll * kLanes * kPiece;
      to += kUnroll * kLanes * 16;
    }
    // The rest: when a thread's copies are not a multiple of kUnroll (fp16/bf16 rows of a D that
    // is not a multiple of 64, float32 and float64 of 32), and pieces past the last feature.
    for (; rare(k < real); k += kLanes, from += kLanes * kPiece, to += kLanes * 16) {
      ptx::cp_async_16(to, from, bytes);
    }
    for (; rare(k < pieces_); k += kLanes, to += kLanes * 16) {
      ptx::cp_async_16(to, src, 0);
    }
  }

 private:
  int64_t ld_;
  int pieces_;
  uint32_t stride_bytes_;
};

// Copies the kCount records of kBytes (a multiple of 16) each that start at record row0 of
// an array of n > row0 records, zeros past its end, to shared memory at dst: one 16-byte
// piece per thread and round (for every tile of kernels.cuh, a single round).
template <int kCount, int kBytes, int kThreads>
__device__ inline void load_records(uint32_t dst, const void* src, int n, int row0) {
  constexpr int kPieces = kCount * kBytes / 16;
  const int valid = min(n - row0, kCount) * (kBytes / 16);
  const char* from = static_cast<const char*>(src) + static_cast<int64_t>(row0) * kBytes;
#pragma unroll
  for (int round = 0; round < (kPieces + kThreads - 1) / kThreads; ++round) {
    const int k = static_cast<int>(threadIdx.x) + round * kThreads;
    if (kPieces % kThreads == 0 || k < kPieces) {
      ptx::cp_async_16(dst + 16 * k, k < valid ? from + 16 * k : from, k < valid ? 16 : 0);
    }
  }
}

// The two sides of a kernel: owned rows [owned0, owned0 + kOwned) of `owned` (n_owned
// rows), streamed tiles of `streamed` (n_streamed rows), both padded operands with row
// length ld; and per-streamed-row records (params, geo.params_bytes each), or null.
// Row counts are below 2^31 (op_host.h checks).
template <typename In>
struct Sides {
  const In* owned;
  int n_owned, owned0;
  const In* streamed;
  int n_streamed;
  const void* params;
};

// The loop of for_each_tile for one layout (kResident: one step per tile).
template <bool kResident, int kRecordBytes, typename Tile, typename In, typename OnTile>
__device__ void stream_tiles(const Geometry<Tile, In>& geo, const Sides<In>& sides, int output_chunk, Tile& tile,
                             unsigned char* smem, OnTile& on_tile) {
  constexpr int kOwned = Tile::kOwned, kStreamed = Tile::kStreamed, kChunk = Geometry<Tile, In>::kChunk;
  const int stride = geo.stride(), chunks = kResident ? 1 : geo.chunks();
  // Shared memory: the owned rows (one stage when resident), two stages of streamed rows
  // and two of records, as pointers and as shared addresses for the copies.
  const In* owned_rows = reinterpret_cast<const In*>(smem);
  const In* streamed_rows = reinterpret_cast<const In*>(smem + geo.owned_bytes());
  const unsigned char* records = smem + geo.owned_bytes() + geo.streamed_bytes();
  const uint32_t owned_area = ptx::shared_address(smem);
  const uint32_t streamed_area = owned_area + static_cast<uint32_t>(geo.owned_bytes());
  const uint32_t records_area = streamed_area + static_cast<uint32_t>(geo.streamed_bytes());
  const int owned_stage = kOwned * stride, streamed_stage = kStreamed * stride;  // elements
  const int first_chunk = output_chunk + 1 < chunks ? output_chunk + 1 : 0;
  const int tiles = (sides.n_streamed + kStreamed - 1) / kStreamed;
  const RowLoader<In, Tile::kThreads> loader(geo.stage_features(), geo.ld, stride);

  // Step (t, q): the q-th chunk of features of streamed tile t, into `stage`.
  auto chunk_at = [&](int q) { return first_chunk + q < chunks ? first_chunk + q : first_chunk + q - chunks; };
  auto issue = [&](int t, int q, int stage) {
    const int f0 = kResident ? 0 : chunk_at(q) * kChunk;
    loader.template load<kStreamed>(streamed_area + stage * streamed_stage * sizeof(In), sides.streamed,
                                    sides.n_streamed, t * kStreamed, f0);
    if constexpr (!kResident) {
      loader.template load<kOwned>(owned_area + stage * owned_stage * sizeof(In), sides.owned, sides.n_owned,
                                   sides.owned0, f0);
    }
    if constexpr (kRecordBytes > 0) {
      if (q == 0) {
        load_records<kStreamed, kRecordBytes, Tile::kThreads>(records_area + (t & 1) * kStreamed * kRecordBytes,
                                                              sides.params, sides.n_streamed, t * kStreamed);
      }
    }
  };

  if constexpr (kResident) {
    loader.template load<kOwned>(owned_area, sides.owned, sides.n_owned, sides.owned0, 0);
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
      const bool last_chunk = q + 1 == chunks;
      if (!last_chunk || t + 1 < tiles) {
        issue(last_chunk ? t + 1 : t, last_chunk ? 0 : q + 1, stage ^ 1);
      }
      ptx::cp_async_commit();
      const int f0 = kResident ? 0 : chunk_at(q) * kChunk;
      const In* streamed = streamed_rows + stage * streamed_stage;
      tile.add_scores(kResident ? owned_rows : owned_rows + stage * owned_stage, stride, streamed, stride,
                      min(geo.stage_features(), geo.ld - f0), /*accumulate=*/q > 0);
      if (last_chunk) {
        on_tile(t, streamed + (kResident ? output_chunk * kChunk : 0), records + (t & 1) * kStreamed * kRecordBytes);
      }
    }
  }
  ptx::cp_async_wait_all();  // (nothing is in flight here, but leave none behind)
}

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
  if (!rare(!geo.resident)) {
    stream_tiles<true, kRecordBytes>(geo, sides, output_chunk, tile, smem, on_tile);
  } else {
    stream_tiles<false, kRecordBytes>(geo, sides, output_chunk, tile, smem, on_tile);
  }
}

}  // namespace macl::cuda
