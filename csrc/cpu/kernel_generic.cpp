// The portable kernels at the compiler's baseline ISA: what runs when the CPU has neither AVX2 nor
// AVX-512 (or on a non-x86 host), and a reference the tests run against the vector kernels.
#include <cstdlib>
#include <cstring>

#include "kernel.h"

namespace gptq_cpu {
namespace {
#include "kernel_portable.inc"
}  // namespace

namespace generic {
bool fused_gemm(const GemmArgs& a, int64_t b0, int64_t b1) { return portable_fused_gemm(a, b0, b1); }
bool dequant(const DequantArgs& a, int64_t b0, int64_t b1) { return portable_dequant(a, b0, b1); }
}  // namespace generic
}  // namespace gptq_cpu
