// AVX-512 kernels of the dense BF16 / FP16-weight GEMV / small-M GEMM (dense_bf16.h). Only this unit is
// compiled for AVX-512 (with BF16 enabled for the dot path; the avx512 tier calls only dense_f32, which
// uses no BF16 instruction). No torch header (ODR note in kernel.h).
//
// WHY IT IS SHAPED THIS WAY
// * M = 1 is a pure stream: each weight is read once and used once, so the kernel only has to keep
//   enough loads in flight. A tile is NR = 4 consecutive rows (4 sequential streams, 16 KiB at K = 2048),
//   with the next tile software-prefetched one line per row per 64 bytes consumed (one tile ahead,
//   GPTQ_ASCEND_DENSE_PREFETCH=0 turns it off for A/Bs).
// * M > 1: row tiles of MR <= 4 activation rows (NR x MR = 16 accumulators + 4 weight registers); the
//   first row tile streams the weight tile from DRAM, the others re-read it from L1/L2, so every weight
//   byte still comes from memory once.
// * bf16 -> fp32 is a 16-bit left shift of the zero-extended bits (exact); the fp32 path then does one
//   FMA per 16 weights per row. With AVX512-BF16 and bf16 activations, vdpbf16ps does 32 products per
//   instruction straight from the bits (exact products, fp32 sums; subnormal inputs read as zero).
//   FP16 weights (the 16-bit copy of an FP16 checkpoint's float32-widened head) are widened by
//   vcvtph2ps (F16C, exact) instead of the shift and always take the fp32 FMA path.
// * The K tail is done with masked loads (zeros beyond K on both operands), so no element past a row
//   end is ever read into a sum and no row needs padding.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the deliberately undefined pass-through operands inside its own AVX-512 intrinsics
// (reported late, at the header's location, so the pragma has to precede the include).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <cstdlib>
#include <cstring>

#include "dense_bf16.h"

#define GPTQ_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"
#define GPTQ_ISA_PORTABLE  // store_out (scalar, one rounding)
#include "isa_begin.inc"
#if GPTQ_ISA_X86_64

namespace gptq_cpu {
namespace {
#include "driver.inc"  // for_row_tiles, with_mr

using dense::DenseArgs;

constexpr int kNR = 4;  // weight rows per tile
constexpr int kMR = 4;  // activation rows per row tile

template <bool F16>
ALWAYS_INLINE __m512 w16x16_to_ps(__m256i b) {
  if constexpr (F16) return _mm512_cvtph_ps(b);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

ALWAYS_INLINE float hsum(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <int NR, int MR>
ALWAYS_INLINE void store_tile(const DenseArgs& a, int64_t n, int64_t m0, __m512 (&acc)[NR][MR]) {
  for (int r = 0; r < NR; ++r) {
    const float b = a.bias ? a.bias[n + r] : 0.f;
    for (int m = 0; m < MR; ++m) store_out(a.out, a.out_type, (m0 + m) * a.ldo + n + r, hsum(acc[r][m]) + b);
  }
}

template <bool F16, int NR, int MR>
__attribute__((noinline)) void tile_f32(const DenseArgs& a, int64_t n, int64_t m0, bool pf) {
  const int64_t K = a.K, ldw = a.ldw, ldx = a.ldx;
  const uint16_t* w = a.w + n * ldw;
  const uint16_t* wn = w + NR * ldw;  // the next tile: prefetched while this one streams
  const float* x = a.xf + m0 * ldx;
  __m512 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (pf)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(wn + r * ldw + k), _MM_HINT_T0);
    for (int h = 0; h < 32; h += 16) {
      __m512 wv[NR];
      for (int r = 0; r < NR; ++r)
        wv[r] = w16x16_to_ps<F16>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + k + h)));
      for (int m = 0; m < MR; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * ldx + k + h);
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    }
  }
  for (; k < K; k += 16) {
    const int64_t rem = K - k;
    const __mmask16 mk = rem >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << rem) - 1);
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = w16x16_to_ps<F16>(_mm256_maskz_loadu_epi16(mk, w + r * ldw + k));
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  store_tile<NR, MR>(a, n, m0, acc);
}

template <int NR, int MR>
__attribute__((noinline)) void tile_dot(const DenseArgs& a, int64_t n, int64_t m0, bool pf) {
  const int64_t K = a.K, ldw = a.ldw, ldx = a.ldx;
  const uint16_t* w = a.w + n * ldw;
  const uint16_t* wn = w + NR * ldw;
  const uint16_t* x = a.xb + m0 * ldx;
  __m512 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (pf)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(wn + r * ldw + k), _MM_HINT_T0);
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(w + r * ldw + k);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], xv);
    }
  }
  if (k < K) {
    const __mmask32 mk = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_epi16(mk, w + r * ldw + k);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mk, x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], xv);
    }
  }
  store_tile<NR, MR>(a, n, m0, acc);
}

// Which tile: vdpbf16ps, or the fp32 FMA tile on bf16 / fp16 weights.
enum class Kind { Dot, Bf16, F16 };

// The two ladders (tile height NR for the N tail, MR for the row tile) in one place.
template <Kind Kd, int NR, int MR>
ALWAYS_INLINE void run_tile(const DenseArgs& a, int64_t n, int64_t m0, bool pf) {
  if constexpr (Kd == Kind::Dot) tile_dot<NR, MR>(a, n, m0, pf);
  else tile_f32<Kd == Kind::F16, NR, MR>(a, n, m0, pf);
}

template <Kind Kd, int NR>
ALWAYS_INLINE void run_rows(const DenseArgs& a, int64_t n) {
  // The shared row-tile split and tile-height ladder (driver.inc): near-equal tiles, M = 5 -> 3 + 2.
  for_row_tiles<kMR>(a.M, [&](int64_t t, int64_t m0, int mr) {
    const bool pf = a.prefetch && t == 0;
    with_mr<kMR>(mr, [&]<int MR>() { run_tile<Kd, NR, MR>(a, n, m0, pf); });
  });
}

template <Kind Kd>
void run(const DenseArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kNR <= n1; n += kNR) run_rows<Kd, kNR>(a, n);
  switch (n1 - n) {
    case 1: run_rows<Kd, 1>(a, n); break;
    case 2: run_rows<Kd, 2>(a, n); break;
    case 3: run_rows<Kd, 3>(a, n); break;
    default: break;
  }
}

}  // namespace

namespace dense::avx512 {
bool dense_f32(const DenseArgs& a, int64_t n0, int64_t n1) {
  if (a.w_f16) run<Kind::F16>(a, n0, n1);
  else run<Kind::Bf16>(a, n0, n1);
  return true;
}
bool dense_bf16dot(const DenseArgs& a, int64_t n0, int64_t n1) {
  run<Kind::Dot>(a, n0, n1);
  return true;
}
}  // namespace dense::avx512
}  // namespace gptq_cpu

#else  // not x86-64: stubs, the dispatcher never selects them
namespace gptq_cpu::dense::avx512 {
bool dense_f32(const DenseArgs&, int64_t, int64_t) { return false; }
bool dense_bf16dot(const DenseArgs&, int64_t, int64_t) { return false; }
}  // namespace gptq_cpu::dense::avx512
#endif
#include "isa_end.inc"
