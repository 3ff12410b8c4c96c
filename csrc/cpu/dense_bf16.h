// gptq-ascend dense GEMV / small-M GEMM on BF16 or FP16 weights (the dense lm_head: GPTQ checkpoints leave
// it unquantized, and for Qwen3-1.7B its 151936 x 2048 16-bit matrix is ~a third of the bytes a decoded
// token reads). Interface between the torch glue (dense_bf16.cpp, baseline ISA) and the per-ISA kernels
// (dense_bf16_avx512.cpp, dense_bf16_avx2.cpp); like kernel.h it includes no torch header (ODR note there).
//
//   y[m, n] = bias[n] + sum_k x[m, k] * W[n, k]   W: BF16 or FP16 bits, row-major [N][ldw] (vLLM's weight
//                                                 as is, or the 16-bit copy of a float32 one: lm_head.py)
//
// The arithmetic is a correct dense GEMM's: each 16-bit weight becomes fp32 exactly (a shift for bf16,
// F16C's vcvtph2ps for fp16: no rounding, subnormals included), bf16 x bf16 products are exact in fp32,
// every other product is rounded once inside its FMA, the sums are fp32, the output is rounded once
// (bf16 round-to-nearest-even / fp16 / fp32). Only the summation order differs from another GEMM's. The AVX512-BF16 path (vdpbf16ps, bf16 activations only)
// treats bf16 subnormal inputs as zero, as oneDNN's BF16 kernels on the same instruction do.
//
// Why row-major and no repack: the weight is vLLM's (a tied lm_head shares it with the embedding
// lookup), so a second, repacked copy would cost another 0.62 GB. Each output n is a dot product over a
// contiguous row; a tile of NR consecutive rows is one contiguous run of NR * K * 2 bytes that the kernel
// streams as NR sequential streams once, and for M > MR re-reads from L1/L2 per row tile of x.
#pragma once

#include <cstdint>

#include "kernel.h"

namespace gptq_cpu::dense {

struct DenseArgs {
  int64_t M = 0, N = 0, K = 0;
  const uint16_t* w = nullptr;  // [N][ldw] bf16 bits, or fp16 bits when w_f16
  int64_t ldw = 0;
  bool w_f16 = false;
  // [M][ldx] fp32 (the FMA paths: bf16/fp16 activations widened exactly). For the AVX2 kernel on bf16
  // weights each whole 16-element chunk is stored even/odd-split (x[k], x[k+2], .., x[k+14], x[k+1], ..,
  // x[k+15]: see split16_x); the last K % 16 elements stay in order. FP16 weights take x in order.
  const float* xf = nullptr;
  const uint16_t* xb = nullptr;  // [M][ldx] bf16 bits (the AVX512-BF16 dot path)
  int64_t ldx = 0;
  const float* bias = nullptr;   // [N] fp32 or null
  void* out = nullptr;           // [M][ldo] of out_type
  int64_t ldo = 0;
  OutType out_type = OutType::F32;
  bool prefetch = true;          // software-prefetch the next row tile (GPTQ_ASCEND_DENSE_PREFETCH=0: off)
};

// Rows [n0, n1) of y for all M activation rows. Each returns false when its ISA is not compiled in.
namespace avx512 {
bool dense_f32(const DenseArgs& a, int64_t n0, int64_t n1);    // AVX-512 F/BW: bf16 shift / fp16 vcvtph2ps + FMA
bool dense_bf16dot(const DenseArgs& a, int64_t n0, int64_t n1);  // AVX512-BF16 vdpbf16ps, reads xb (bf16 w only)
}  // namespace avx512
namespace avx2 {
bool dense_f32(const DenseArgs& a, int64_t n0, int64_t n1);  // AVX2 + FMA (+ F16C for fp16 weights)
}  // namespace avx2

}  // namespace gptq_cpu::dense
