// AVX2 + FMA kernel of the dense BF16-weight GEMV / small-M GEMM (dense_bf16.h): the path for CPUs
// where vLLM's oneDNN matmul primitive cannot be created and vLLM falls back to torch's BF16 linear
// (no native BF16 dot product there). Only this unit gets the AVX2 target flags. No torch header.
//
// Same shape as the AVX-512 kernel (dense_bf16_avx512.cpp) within 16 ymm registers: NR = 4 weight rows
// per tile, row tiles of MR <= 2 activation rows (8 accumulators + 4 weight registers + 1 activation).
// bf16 -> fp32 is vpmovzxwd + a 16-bit shift (exact), then one FMA per 8 weights per activation row.
// The next tile is software-prefetched one line per row per 64 bytes consumed. The K tail (K % 8) is a
// scalar loop, summed after the vector lanes.
#include <cstdlib>
#include <cstring>

#include "dense_bf16.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

namespace gptq_cpu {
namespace {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "kernel_portable.inc"  // store_out, bf16_to_float (private copies for this ISA)
#pragma GCC diagnostic pop

using dense::DenseArgs;

constexpr int kNR = 4;
constexpr int kMR = 2;

ALWAYS_INLINE __m256 bf16x8_to_ps(const uint16_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

ALWAYS_INLINE float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <int NR, int MR>
__attribute__((noinline)) void tile(const DenseArgs& a, int64_t n, int64_t m0, bool pf) {
  const int64_t K = a.K, ldw = a.ldw, ldx = a.ldx;
  const uint16_t* w = a.w + n * ldw;
  const uint16_t* wn = w + NR * ldw;
  const float* x = a.xf + m0 * ldx;
  __m256 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (pf)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(wn + r * ldw + k), _MM_HINT_T0);
    for (int h = 0; h < 32; h += 8) {
      __m256 wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = bf16x8_to_ps(w + r * ldw + k + h);
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * ldx + k + h);
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    }
  }
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = bf16x8_to_ps(w + r * ldw + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    const float b = a.bias ? a.bias[n + r] : 0.f;
    for (int m = 0; m < MR; ++m) {
      float s = hsum(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += bf16_to_float(w[r * ldw + kk]) * x[m * ldx + kk];
      store_out(a.out, a.out_type, (m0 + m) * a.ldo + n + r, s + b);
    }
  }
}

template <int NR>
ALWAYS_INLINE void run_rows(const DenseArgs& a, int64_t n) {
  const int64_t tiles = (a.M + kMR - 1) / kMR;
  int64_t m0 = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t mr = (a.M - m0) / (tiles - t);
    const bool pf = a.prefetch && t == 0;
    if (mr == 1) tile<NR, 1>(a, n, m0, pf);
    else tile<NR, 2>(a, n, m0, pf);
    m0 += mr;
  }
}

}  // namespace

namespace dense::avx2 {
bool dense_f32(const DenseArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kNR <= n1; n += kNR) run_rows<kNR>(a, n);
  switch (n1 - n) {
    case 1: run_rows<1>(a, n); break;
    case 2: run_rows<2>(a, n); break;
    case 3: run_rows<3>(a, n); break;
    default: break;
  }
  return true;
}
}  // namespace dense::avx2
}  // namespace gptq_cpu

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#else  // not x86-64
namespace gptq_cpu::dense::avx2 {
bool dense_f32(const DenseArgs&, int64_t, int64_t) { return false; }
}  // namespace gptq_cpu::dense::avx2
#endif
