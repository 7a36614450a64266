// Fixed orders of tile visits that make the CPU kernel deterministic without atomics
// or per-thread copies of the outputs.
//
// A round is a set of tiles (I, J) in which no row block and no column block appears
// twice, so the tiles of one round run in parallel while each output block has a
// single writer; rounds run one after the other. Every block therefore receives its
// contributions in the same order whatever the number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace macl::cpu {

using Tile = std::pair<int64_t, int64_t>;  // (row block, column block)
using Rounds = std::vector<std::vector<Tile>>;

// The tiles (I, J), J >= I, of a symmetric problem over `blocks` blocks: first every
// diagonal tile, then a round-robin tournament (the circle method): in each round every
// block meets one other block, and every pair meets exactly once.
inline Rounds symmetric_rounds(int64_t blocks) {
  Rounds rounds(1);
  for (int64_t b = 0; b < blocks; ++b) {
    rounds[0].emplace_back(b, b);
  }
  const int64_t teams = blocks + blocks % 2;  // an odd count gets a resting slot
  for (int64_t r = 0; r + 1 < teams; ++r) {
    std::vector<Tile> round;
    auto meet = [&](int64_t a, int64_t b) {
      if (a < blocks && b < blocks) {
        round.emplace_back(std::min(a, b), std::max(a, b));
      }
    };
    meet(r, teams - 1);
    for (int64_t k = 1; k < teams / 2; ++k) {
      meet((r + k) % (teams - 1), (r - k + teams - 1) % (teams - 1));
    }
    if (!round.empty()) {
      rounds.push_back(std::move(round));
    }
  }
  return rounds;
}

// Every tile of a row_blocks x col_blocks grid, as diagonals of a cyclic shift: round
// r pairs each block of the shorter side with a distinct block of the longer side.
inline Rounds bipartite_rounds(int64_t row_blocks, int64_t col_blocks) {
  Rounds rounds;
  const bool rows_shorter = row_blocks <= col_blocks;
  const int64_t shorter = rows_shorter ? row_blocks : col_blocks;
  const int64_t longer = rows_shorter ? col_blocks : row_blocks;
  for (int64_t r = 0; r < longer; ++r) {
    std::vector<Tile> round;
    for (int64_t s = 0; s < shorter; ++s) {
      const int64_t l = (s + r) % longer;
      round.emplace_back(rows_shorter ? Tile{s, l} : Tile{l, s});
    }
    rounds.push_back(std::move(round));
  }
  return rounds;
}

}  // namespace macl::cpu
