// The portable kernels compiled for AVX2 + FMA + F16C (Haswell and later, Zen 1-3): the same C++ as
// kernel_generic.cpp, auto-vectorized 8 floats wide. Only this translation unit gets the target flags,
// through the pragma below, so the rest of the extension stays at the baseline ISA. Nothing in here
// includes a torch header (see the ODR note in kernel.h).
#include <cstdlib>
#include <cstring>

#include "kernel.h"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace gptq_cpu {
namespace {
#include "kernel_portable.inc"
}  // namespace

namespace avx2 {
bool small_m(const GemmArgs& a, int64_t b0, int64_t b1) { return portable_small_m(a, b0, b1); }
bool dequant(const DequantArgs& a, int64_t b0, int64_t b1) { return portable_dequant(a, b0, b1); }
}  // namespace avx2
}  // namespace gptq_cpu

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace gptq_cpu {
bool avx2_compiled() { return true; }
}  // namespace gptq_cpu

#else  // not x86-64: stubs, the dispatcher never selects them

namespace gptq_cpu {
namespace avx2 {
bool small_m(const GemmArgs&, int64_t, int64_t) { return false; }
bool dequant(const DequantArgs&, int64_t, int64_t) { return false; }
}  // namespace avx2
bool avx2_compiled() { return false; }
}  // namespace gptq_cpu
#endif
