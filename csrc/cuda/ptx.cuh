// The few PTX instructions the kernels use directly (sm_80 and later): asynchronous
// 16-byte copies into shared memory, ldmatrix, the m16n8k16 tensor-core product, and
// the hardware exp2. Each wrapper is one instruction; the PTX ISA names them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(MACL_CUDA_HOST_EMULATION)
// The tests' CPU emulation of these kernels (python_tests/backends/cuda_emulation)
// defines each instruction below from the PTX ISA instead.
#else
namespace macl::cuda::ptx {

__device__ inline uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Copies 16 bytes from global memory to shared memory (address dst, in bytes) without
// passing through registers; the bytes past src_bytes (0 or 16) are zero-filled, so
// src_bytes = 0 writes 16 zero bytes (src must still be a valid address). L2 only (.cg):
// the tiles are read once per CTA from shared memory.
__device__ inline void cp_async_16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ inline void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits for every copy this thread issued (a __syncthreads() then publishes them).
__device__ inline void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Four 8x8 matrices of 16-bit values: lane l gives the shared-memory address (bytes) of
// row l % 8 of matrix l / 8; register i receives matrix i, row lane / 4, columns
// 2 (lane % 4) and + 1.
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_address));
}

// The same, each matrix transposed: register i receives column lane / 4, rows 2 (lane % 4)
// and + 1 of matrix i.
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_address));
}

// c += a b for a 16x16 A (row-major fragment, 4 registers of 2 values), a 16x8 B
// (column-major fragment, 2 registers) and a 16x8 fp32 C, with fp16 or bf16 inputs.
template <typename In>
__device__ inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<In, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<In, __nv_bfloat16>, "mma_m16n8k16 takes fp16 or bf16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// c = a b (no accumulator input: the hardware's zero register).
template <typename In>
__device__ inline void mma_m16n8k16_first(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const float zero = 0.0f;
  if constexpr (std::is_same_v<In, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};\n"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(zero));
  } else {
    static_assert(std::is_same_v<In, __nv_bfloat16>, "mma_m16n8k16_first takes fp16 or bf16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %10, %10, %10};\n"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(zero));
  }
}

// 2^x by the special-function unit (MUFU.EX2, ~2 ulp); results below 2^-126 flush to 0,
// and 2^-inf = 0.
__device__ inline float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace macl::cuda::ptx
#endif  // MACL_CUDA_HOST_EMULATION
