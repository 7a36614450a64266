// The CUDA kernels of csrc/cuda, run on the CPU: a test harness for machines without a GPU.
//
// The kernels' own source (kernels.cuh through launch_plan.cuh, and the ops' host side,
// op_host.h) is compiled here as host C++. Each CTA runs as blockDim cooperative fibers
// (ucontext) that switch only where CUDA threads may wait for each other: at
// __syncthreads() and at each warp-collective instruction. The instructions of ptx.cuh
// are implemented from the PTX ISA's definitions (ldmatrix and mma.m16n8k16 fragment
// layouts). To expose missing waits and barriers, cp.async copies land at the last moment
// the ISA allows (the issuing thread's cp.async.wait_group) unless asked to land at once,
// shared memory starts as NaN bytes, and every output starts as NaN; a CTA that writes shared
// memory past the bytes its launch asked for fails (reads past them cannot be told), and so
// does a warp whose lanes meet different warp instructions at once (a shuffle, vote, ldmatrix or
// mma in diverged code), which would otherwise exchange each other's unrelated operands.
#include <torch/extension.h>
#include <ucontext.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// ---- the CUDA dialect as host code ----
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define MACL_CUDA_HOST_EMULATION 1
using std::max;
using std::min;

namespace emu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarp = 32;

struct Barrier {
  int expected = 0, arrived = 0;
  unsigned generation = 0;
  int reduced = 0, result = 0;  // the OR of the arrivals' predicates (__syncthreads_or), then of the last round
};

struct Copy {
  void* dst;
  const void* src;
  uint32_t bytes;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 thread;
  bool done = false;
  std::vector<Copy> copies;  // cp.async copies not yet landed
};

// One CTA in flight.
struct Cta {
  dim3 block, dim;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  Barrier cta_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<std::vector<unsigned char>> slots;  // per warp: 32 lanes x kSlotBytes
  std::vector<std::vector<uint64_t>> sites;       // per warp: where each lane called its shuffle or vote
  std::string divergence;                          // the first shuffle or vote the lanes of a warp met apart
  const std::function<void()>* body = nullptr;
  bool immediate_copies = false;
  uint64_t progress = 0;  // arrivals and completions, to tell a deadlock
};

constexpr int kSlotBytes = 64;
Cta* cta = nullptr;

inline Fiber& fiber() { return cta->fibers[cta->current]; }
inline int lane() { return static_cast<int>(fiber().thread.x) % kWarp; }
inline int warp() { return static_cast<int>(fiber().thread.x) / kWarp; }

inline void yield() { swapcontext(&fiber().context, &cta->scheduler); }

// Waits for every thread of the barrier; returns the OR of their predicates. (A round's
// result stays in place until the next round completes, which needs this thread too.)
inline int arrive_and_wait(Barrier& b, int predicate = 0) {
  ++cta->progress;
  const unsigned generation = b.generation;
  b.reduced |= predicate != 0;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    b.result = b.reduced;
    b.reduced = 0;
    ++b.generation;
    return b.result;
  }
  while (b.generation == generation) {
    yield();
  }
  return b.result;
}

inline void warp_sync() { arrive_and_wait(cta->warp_barriers[warp()]); }

// warp_collective's sites of the ptx.cuh instructions (shuffles and votes use their source line).
constexpr uint64_t kLdmatrixSite = 1, kLdmatrixTransSite = 2, kMmaSite = 3;

// Lane l's exchange slot in the current warp, as a T.
template <typename T>
T& slot(int l) {
  static_assert(sizeof(T) <= kSlotBytes);
  return *reinterpret_cast<T*>(cta->slots[warp()].data() + l * kSlotBytes);
}

inline std::string site_name(uint64_t site) {
  static const char* const kNames[] = {"none", "ldmatrix", "ldmatrix.trans", "mma"};
  return site < 4 ? kNames[site] : "a shuffle or vote at line " + std::to_string(site >> 16);
}

// Stops the calling thread for good (it is never scheduled again); run_cta then reports.
[[noreturn]] inline void stop_thread() {
  fiber().done = true;
  ++cta->progress;
  swapcontext(&fiber().context, &cta->scheduler);
  std::abort();  // (never resumed)
}

// Every lane deposits `mine`; fn(all slots) runs in each lane between two warp barriers.
// `site` says which instruction (for a shuffle or vote, its source line and column): every
// lane of the warp must be at the same one. Lanes that meet it from diverged code (some at
// another collective, or at none) are a bug of the kernel: the lanes stop and run_cta throws.
template <typename T, typename Fn>
auto warp_collective(const T& mine, const Fn& fn, uint64_t site) {
  slot<T>(lane()) = mine;
  cta->sites[warp()][lane()] = site;
  warp_sync();
  const int lanes = cta->warp_barriers[warp()].expected;
  for (int l = 0; l < lanes; ++l) {
    if (cta->sites[warp()][l] != site) {
      if (cta->divergence.empty()) {
        cta->divergence = "the lanes of warp " + std::to_string(warp()) +
                          " met different warp instructions at once (diverged code): " + site_name(site) + " and " +
                          site_name(cta->sites[warp()][l]);
      }
      stop_thread();
    }
  }
  auto result = fn();
  warp_sync();
  return result;
}

inline void land_copies(Fiber& f) {
  for (const Copy& c : f.copies) {
    if (c.bytes == 16) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
  }
  f.copies.clear();
}

void fiber_main() {
  (*cta->body)();
  land_copies(fiber());
  fiber().done = true;
  ++cta->progress;
}

// Runs body on every thread of one CTA; throws on a deadlock (threads that wait for
// ones that will never arrive: a barrier or warp instruction not reached by all).
inline void run_cta(const std::function<void()>& body, dim3 block, dim3 dim, bool immediate_copies) {
  const int threads = static_cast<int>(dim.x);
  Cta c;
  c.block = block;
  c.dim = dim;
  c.body = &body;
  c.immediate_copies = immediate_copies;
  c.cta_barrier.expected = threads;
  const int warps = (threads + kWarp - 1) / kWarp;
  c.warp_barriers.resize(warps);
  for (int w = 0; w < warps; ++w) {
    c.warp_barriers[w].expected = std::min(kWarp, threads - w * kWarp);
  }
  c.slots.assign(warps, std::vector<unsigned char>(kWarp * kSlotBytes));
  c.sites.assign(warps, std::vector<uint64_t>(kWarp, 0));
  c.fibers.resize(threads);
  cta = &c;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = c.fibers[t];
    f.thread = dim3(t, 0, 0);
    f.stack.reset(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &c.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  // Odd CTAs run their threads in reverse order, so that a read that lacks its barrier
  // sees stale data whichever thread writes first.
  const bool reverse = (block.x + block.y) % 2 == 1;
  for (;;) {
    bool all_done = true;
    const uint64_t before = c.progress;
    for (int k = 0; k < threads; ++k) {
      const int t = reverse ? threads - 1 - k : k;
      if (!c.fibers[t].done) {
        c.current = t;
        swapcontext(&c.scheduler, &c.fibers[t].context);
        all_done = all_done && c.fibers[t].done;
      }
    }
    if (all_done) {
      break;
    }
    if (c.progress == before) {
      cta = nullptr;
      throw std::runtime_error("emulated CTA deadlocked: a barrier or warp instruction not reached by every thread" +
                               (c.divergence.empty() ? std::string() : "; " + c.divergence));
    }
  }
  cta = nullptr;
  if (!c.divergence.empty()) {
    throw std::runtime_error("emulated CTA: " + c.divergence);
  }
}

}  // namespace emu

// The CUDA builtins the kernels use.
#define threadIdx (::emu::fiber().thread)
#define blockIdx (::emu::cta->block)
#define blockDim (::emu::cta->dim)

inline void __syncthreads() { emu::arrive_and_wait(emu::cta->cta_barrier); }

inline int __syncthreads_or(int predicate) { return emu::arrive_and_wait(emu::cta->cta_barrier, predicate); }

// The source line of a shuffle or vote, for warp_collective's check that a warp's lanes meet it together.
inline uint64_t site_of(const std::source_location& at) { return (uint64_t{at.line()} << 16) | at.column(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask, std::source_location at = std::source_location::current()) {
  return emu::warp_collective(value, [&] { return emu::slot<T>(emu::lane() ^ mask); }, site_of(at));
}

inline int __any_sync(unsigned, int predicate, std::source_location at = std::source_location::current()) {
  return emu::warp_collective(
      predicate,
      [&] {
        int any = 0;
        for (int l = 0; l < emu::kWarp; ++l) any |= emu::slot<int>(l) != 0;
        return any;
      },
      site_of(at));
}

// The kernels' dynamic shared memory, for the one CTA in flight.
namespace macl::cuda {
namespace {
constexpr size_t kSharedBytes = 256 * 1024;
alignas(16) unsigned char smem[kSharedBytes];
}  // namespace
}  // namespace macl::cuda

// ptx.cuh's instructions, from the PTX ISA; shared-memory addresses are offsets into smem.
namespace macl::cuda::ptx {

inline uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(pointer) - smem);
}

inline const unsigned char* shared_pointer(uint32_t address) { return smem + address; }

inline void cp_async_16(uint32_t dst, const void* src, uint32_t src_bytes) {
  emu::Fiber& f = emu::fiber();
  f.copies.push_back({smem + dst, src, src_bytes});
  if (emu::cta->immediate_copies) {
    emu::land_copies(f);
  }
}

inline void cp_async_commit() {}

inline void cp_async_wait_all() { emu::land_copies(emu::fiber()); }

inline uint32_t load_pair(const unsigned char* first, const unsigned char* second) {
  uint16_t lo, hi;
  std::memcpy(&lo, first, 2);
  std::memcpy(&hi, second, 2);
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Matrix i's row r starts at the address lane 8 i + r gave; lane l receives row l / 4,
// columns 2 (l % 4) and + 1 (transposed: column l / 4, rows 2 (l % 4) and + 1).
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t row_address) {
  const unsigned char* mine = shared_pointer(row_address);
  const int l = emu::lane();
  const auto fragment = emu::warp_collective(mine, [&] {
    std::array<uint32_t, 4> out;
    for (int i = 0; i < 4; ++i) {
      const unsigned char* row = emu::slot<const unsigned char*>(8 * i + l / 4);
      out[i] = load_pair(row + 2 * (2 * (l % 4)), row + 2 * (2 * (l % 4) + 1));
    }
    return out;
  }, emu::kLdmatrixSite);
  for (int i = 0; i < 4; ++i) r[i] = fragment[i];
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t row_address) {
  const unsigned char* mine = shared_pointer(row_address);
  const int l = emu::lane();
  const auto fragment = emu::warp_collective(mine, [&] {
    std::array<uint32_t, 4> out;
    for (int i = 0; i < 4; ++i) {
      const unsigned char* row0 = emu::slot<const unsigned char*>(8 * i + 2 * (l % 4));
      const unsigned char* row1 = emu::slot<const unsigned char*>(8 * i + 2 * (l % 4) + 1);
      out[i] = load_pair(row0 + 2 * (l / 4), row1 + 2 * (l / 4));
    }
    return out;
  }, emu::kLdmatrixTransSite);
  for (int i = 0; i < 4; ++i) r[i] = fragment[i];
}

template <typename In>
float element(uint32_t pair, int high) {
  const uint16_t bits = static_cast<uint16_t>(high ? pair >> 16 : pair & 0xffffu);
  In value;
  std::memcpy(&value, &bits, 2);
  if constexpr (std::is_same_v<In, __half>) {
    return __half2float(value);
  } else {
    return __bfloat162float(value);
  }
}

struct MmaOperands {
  uint32_t a[4], b[2];
  float c[4];
};

// D = A B + C, m16n8k16: lane l (g = l / 4, t = l % 4) holds A(g, 2t..2t+1) in a0,
// A(g + 8, ...) in a1, A(g, 2t + 8..) in a2, A(g + 8, 2t + 8..) in a3; B(2t..2t+1, g) in
// b0, B(2t + 8.., g) in b1; C(g, 2t), C(g, 2t + 1), C(g + 8, 2t), C(g + 8, 2t + 1) in c0..c3.
template <typename In>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaOperands mine;
  std::copy(a, a + 4, mine.a);
  mine.b[0] = b0;
  mine.b[1] = b1;
  std::copy(c, c + 4, mine.c);
  const int l = emu::lane();
  const auto d = emu::warp_collective(mine, [&] {
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < emu::kWarp; ++lane) {
      const MmaOperands& o = emu::slot<MmaOperands>(lane);
      const int g = lane / 4, t = lane % 4;
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = element<In>(o.a[0], h);
        A[g + 8][2 * t + h] = element<In>(o.a[1], h);
        A[g][2 * t + 8 + h] = element<In>(o.a[2], h);
        A[g + 8][2 * t + 8 + h] = element<In>(o.a[3], h);
        B[2 * t + h][g] = element<In>(o.b[0], h);
        B[2 * t + 8 + h][g] = element<In>(o.b[1], h);
        C[g][2 * t + h] = o.c[h];
        C[g + 8][2 * t + h] = o.c[2 + h];
      }
    }
    const int g = l / 4, t = l % 4;
    auto entry = [&](int m, int n) {
      double sum = C[m][n];
      for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[m][k]) * B[k][n];
      return static_cast<float>(sum);
    };
    return std::array<float, 4>{entry(g, 2 * t), entry(g, 2 * t + 1), entry(g + 8, 2 * t), entry(g + 8, 2 * t + 1)};
  }, emu::kMmaSite);
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}

template <typename In>
void mma_m16n8k16_first(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  mma_m16n8k16<In>(zero, a, b0, b1);
  std::copy(zero, zero + 4, c);
}

inline float exp2_approx(float x) { return std::exp2(x); }

}  // namespace macl::cuda::ptx

#include "cuda/launch_plan.cuh"
#include "cuda/op_host.h"

namespace macl::cuda {

// launch.h's host helpers, as negative_lse_kernels.cu defines them.
int64_t padded_features(InputType type, int64_t dim) { return padded_features_of(type, dim); }
size_t backward_workspace_bytes(InputType type, int64_t rows) { return backward_workspace_bytes_of(type, rows); }

namespace {

// launch_plan.cuh's Runner: every CTA of a grid, one after the other.
struct EmulatedRunner {
  int shared_limit;
  bool immediate_copies;

  // (At most the emulator's own buffer: a GPU has less, 227 KiB on sm_90.)
  int max_shared() const { return std::min(shared_limit, static_cast<int>(kSharedBytes)); }

  template <typename... Params, typename... Args>
  cudaError_t launch(void (*kernel)(Params...), dim3 grid, int threads, size_t shared_bytes, Args... args) const {
    if (grid.x == 0 || grid.y == 0) {
      return cudaSuccess;
    }
    if (shared_bytes > static_cast<size_t>(shared_limit) || shared_bytes > kSharedBytes) {
      return cudaErrorInvalidValue;
    }
    const std::function<void()> body = [&] { kernel(args...); };
    for (unsigned int y = 0; y < grid.y; ++y) {
      for (unsigned int x = 0; x < grid.x; ++x) {
        std::memset(smem, 0xff, kSharedBytes);  // NaN in every float type
        emu::run_cta(body, dim3(x, y, 1), dim3(threads, 1, 1), immediate_copies);
        // Nothing may be written past the bytes the launch asked for (geo.shared_bytes()).
        const auto written =
            std::find_if(smem + shared_bytes, smem + kSharedBytes, [](unsigned char b) { return b != 0xff; });
        if (written != smem + kSharedBytes) {
          throw std::runtime_error("emulated CTA wrote shared memory at byte " + std::to_string(written - smem) +
                                   ", past the " + std::to_string(shared_bytes) + " bytes of its launch");
        }
      }
    }
    return cudaSuccess;
  }
};

void check(cudaError_t status) { TORCH_CHECK(status == cudaSuccess, "emulated launch failed: ", int(status)); }

at::Tensor negative_lse(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& excluded,
                        const at::Tensor& tau, int64_t shared_limit, bool immediate_copies) {
  EmulatedRunner runner{static_cast<int>(shared_limit), immediate_copies};
  return negative_lse_with(Inputs(x, y, excluded, tau, &padded_features),
                           [&](InputType type, const LseArgs& args, void* lse) {
                             check(run_forward(runner, type, args, lse));
                           });
}

std::tuple<at::Tensor, at::Tensor> negative_lse_product(const at::Tensor& x, const at::Tensor& y,
                                                        const at::Tensor& excluded, const at::Tensor& tau,
                                                        int64_t shared_limit, bool immediate_copies) {
  EmulatedRunner runner{static_cast<int>(shared_limit), immediate_copies};
  return negative_lse_product_with(
      Inputs(x, y, excluded, tau, &padded_features),
      [&](InputType type, const LseArgs& args, void* lse, void* product) {
        check(run_forward_product(runner, type, args, lse, product));
      },
      [](at::IntArrayRef sizes, const at::TensorOptions& options) {
        return at::full(sizes, std::nan(""), options);  // every element must be written
      });
}

std::tuple<at::Tensor, at::Tensor> negative_lse_backward(const at::Tensor& grad_lse, const at::Tensor& x,
                                                         const std::optional<at::Tensor>& y,
                                                         const at::Tensor& excluded, const at::Tensor& tau,
                                                         const at::Tensor& lse, bool need_dy, bool need_dx,
                                                         int64_t shared_limit, bool immediate_copies) {
  EmulatedRunner runner{static_cast<int>(shared_limit), immediate_copies};
  check_backward_args(grad_lse, x, lse);
  check_need_dx(y.has_value(), need_dx);
  return negative_lse_backward_with(
      Inputs(x, y, excluded, tau, &padded_features), grad_lse, lse, y.has_value(), need_dy, need_dx,
      x.scalar_type(),
      [&](InputType type, const LseArgs& args, const BackwardArgs& b, void* dx, void* dy) {
        check(run_backward(runner, type, args, b, dx, dy));
      },
      [](at::IntArrayRef sizes, const at::TensorOptions& options) {
        return at::full(sizes, std::nan(""), options);  // every element must be written
      });
}

// The layout the kernels take for a dtype, a dim and a shared-memory limit.
bool resident_layout(at::ScalarType dtype, int64_t dim, int64_t shared_limit) {
  const InputType type = input_type(dtype);
  const int64_t ld = padded_features_of(type, dim);
  switch (type) {
    case InputType::kFloat16:
    case InputType::kBFloat16:
      return choose_geometry<__half>(ld, 0, static_cast<int>(shared_limit)).resident;
    case InputType::kFloat32:
      return choose_geometry<float>(ld, 0, static_cast<int>(shared_limit)).resident;
    case InputType::kFloat64:
      return choose_geometry<double>(ld, 0, static_cast<int>(shared_limit)).resident;
  }
  return false;
}

}  // namespace
}  // namespace macl::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("negative_lse", &macl::cuda::negative_lse);
  m.def("negative_lse_product", &macl::cuda::negative_lse_product);
  m.def("negative_lse_backward", &macl::cuda::negative_lse_backward);
  m.def("resident_layout", &macl::cuda::resident_layout);
}
