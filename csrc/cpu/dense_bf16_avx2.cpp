// AVX2 + FMA kernel of the dense BF16 / FP16-weight GEMV / small-M GEMM (dense_bf16.h): the path for
// CPUs where vLLM's oneDNN matmul primitive cannot be created and vLLM falls back to torch's linear (no
// native BF16 dot product there), and for float32 lm_heads whose values are FP16 numbers (an FP16
// checkpoint widened by vLLM: our GEMV reads a 16-bit copy, half the bytes). Only this unit gets the
// AVX2 target flags. No torch header.
//
// Within 16 ymm registers: NR = 3 weight rows per tile, row tiles of MR <= 4 activation rows (12
// accumulators + 2 decoded weight registers; x is an FMA memory operand from L1), so M <= 4 decodes every
// weight once. bf16 -> fp32 without a shuffle: a 32-byte load holds 8 (even, odd) pairs, `<< 16` and
// `& 0xffff0000` give the even and odd weights exactly, and the host stores x even/odd-split per 16
// elements to match (DenseArgs::xf, see dense_bf16.h). Then one FMA per 8 weights per activation row.
// vpmovzxwd + shift (one shuffle per 8 weights, port 5 on Intel) measured slower at M = 4 and 8
// (docs/notes/issue-11-lm-head.md). The next tile is software-prefetched one line per row per 64 bytes
// consumed. The K tail (K % 16, natural order in x) is a scalar loop, summed after the vector lanes.
// FP16 weights: two 16-byte loads + vcvtph2ps (F16C, exact) per 16 weights, x in natural order; the
// rest of the tile is the same code. That is one more uop per 8 weights than the bf16 shift, which the
// M = 1 stream hides (the GEMV is at the memory floor either way; docs/notes/issue-11-lm-head.md).
#include <cstdlib>
#include <cstring>

#include "dense_bf16.h"

#define GPTQ_ISA_TARGET "avx2,fma,f16c"
#define GPTQ_ISA_PORTABLE  // store_out, bf16_to_float, half_to_float
#include "isa_begin.inc"
#if GPTQ_ISA_X86_64

namespace gptq_cpu {
namespace {
#include "driver.inc"  // for_row_tiles, with_mr

using dense::DenseArgs;

constexpr int kNR = 3;
constexpr int kMR = 4;

ALWAYS_INLINE float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// One 32-byte load = 16 bf16 weights; lane j holds w[2j] (low half) and w[2j+1] (high half), so a shift
// left by 16 gives the even weights and a mask the odd ones, exactly, in fp32: 2 ALU ops per 16 weights,
// no shuffle. x was stored even/odd-split per 16-chunk by the host (kDenseSplit16) to match.
template <bool F16, int NR, int MR>
__attribute__((noinline)) void tile(const DenseArgs& a, int64_t n, int64_t m0, bool pf) {
  const int64_t K = a.K, ldw = a.ldw, ldx = a.ldx;
  const int64_t K16 = K & ~int64_t{15};
  const uint16_t* w = a.w + n * ldw;
  const uint16_t* wn = w + NR * ldw;
  const float* x = a.xf + m0 * ldx;
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    if (pf && (k & 31) == 0)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(wn + r * ldw + k), _MM_HINT_T0);
    for (int r = 0; r < NR; ++r) {
      __m256 we, wo;  // bf16: the even / odd weights (x split to match); fp16: weights k..k+7 / k+8..k+15
      if constexpr (F16) {
        we = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ldw + k)));
        wo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ldw + k + 8)));
      } else {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + k));
        we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
      }
      for (int m = 0; m < MR; ++m) {
        acc[r][m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x + m * ldx + k), acc[r][m]);
        acc[r][m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + m * ldx + k + 8), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    const float b = a.bias ? a.bias[n + r] : 0.f;
    for (int m = 0; m < MR; ++m) {
      float s = hsum(acc[r][m]);
      for (int64_t kk = K16; kk < K; ++kk)
        s += (F16 ? half_to_float(w[r * ldw + kk]) : bf16_to_float(w[r * ldw + kk])) * x[m * ldx + kk];
      store_out(a.out, a.out_type, (m0 + m) * a.ldo + n + r, s + b);
    }
  }
}

template <bool F16, int NR>
ALWAYS_INLINE void run_rows(const DenseArgs& a, int64_t n) {
  // The shared row-tile split and tile-height ladder (driver.inc): near-equal tiles, M = 5 -> 3 + 2.
  for_row_tiles<kMR>(a.M, [&](int64_t t, int64_t m0, int mr) {
    const bool pf = a.prefetch && t == 0;
    with_mr<kMR>(mr, [&]<int MR>() { tile<F16, NR, MR>(a, n, m0, pf); });
  });
}

template <bool F16>
void run(const DenseArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kNR <= n1; n += kNR) run_rows<F16, kNR>(a, n);
  switch (n1 - n) {
    case 1: run_rows<F16, 1>(a, n); break;
    case 2: run_rows<F16, 2>(a, n); break;
    default: break;
  }
}

}  // namespace

namespace dense::avx2 {
bool dense_f32(const DenseArgs& a, int64_t n0, int64_t n1) {
  if (a.w_f16) run<true>(a, n0, n1);
  else run<false>(a, n0, n1);
  return true;
}
}  // namespace dense::avx2
}  // namespace gptq_cpu

#else  // not x86-64: stubs, the dispatcher never selects them
namespace gptq_cpu::dense::avx2 {
bool dense_f32(const DenseArgs&, int64_t, int64_t) { return false; }
}  // namespace gptq_cpu::dense::avx2
#endif
#include "isa_end.inc"
