// One BLAS code path for every gemm of the CPU kernel, whatever the number of threads.
//
// The kernel's gemms run one per worker thread (negative_lse_cpu.cpp's run_tasks), so
// they should be sequential gemms. MKL, PyTorch's BLAS on x86, does not see it that way:
// with 1 thread at::parallel_for calls the task outside any OpenMP region and MKL plans
// for 1 thread; with t > 1 threads it calls it inside a region, where MKL still plans its
// blocking for the global thread count t and then runs that plan on a team of one
// (nested parallelism is off). The summation orders differ, so the results would differ
// in their last bits between thread counts (measured: 1, 2 and 3 threads on AVX-512).
//
// ScopedSequentialBlas sets MKL's thread-local thread count to 1 for its lifetime and
// restores the previous thread-local setting afterwards: every gemm is then MKL's
// sequential one, the same code path for any thread count, and the user's global MKL
// settings (mkl_set_num_threads, MKL_CBWR) are untouched. Without MKL (other BLAS,
// other CPUs) it does nothing: MKL's C entry point is found at load time as a weak symbol
// in libtorch_cpu, which exports it when torch is built with MKL. (mkl_service.h maps
// mkl_set_num_threads_local to MKL_Set_Num_Threads_Local; the exported lower-case name is
// the Fortran interface, which takes a pointer.)
#pragma once

extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace macl::cpu {

class ScopedSequentialBlas {
 public:
  ScopedSequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) {
      previous_ = MKL_Set_Num_Threads_Local(1);  // returns the previous local setting (0: none)
    }
  }
  ~ScopedSequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) {
      MKL_Set_Num_Threads_Local(previous_);
    }
  }
  ScopedSequentialBlas(const ScopedSequentialBlas&) = delete;
  ScopedSequentialBlas& operator=(const ScopedSequentialBlas&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace macl::cpu
