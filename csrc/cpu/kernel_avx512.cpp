// AVX-512 kernels for the layout of kernel.h (read its header comment first).
//
// Only this translation unit is compiled for AVX-512 (F/BW/VL/DQ/BF16), via the pragma below; ops.cpp
// picks it at run time with __builtin_cpu_supports, so the extension still loads and runs on CPUs
// without it. No torch header and no std:: function template is used in here (ODR note in kernel.h).
//
// WHY IT IS SHAPED THIS WAY (numbers from the 2-core AMD EPYC Zen 4 this was tuned on)
// * M = 1 is a stream: every code byte is read once. The decode is not free, though: with the codes in
//   cache one core decodes and multiplies int8 at ~22-24 GB/s (5 conversion uops per 32 weights), so
//   two cores only just outrun DRAM; the direct kernels prefetch well ahead, and from DRAM M = 1 runs at
//   1.04-1.4x the floor depending on the host's bandwidth (docs/cpu-kernel.md).
// * Small M > 1 reuses each decoded weight vector for MR activation rows held in registers. The cost is
//   then the multiply-adds: fp32 FMA does 16 MACs/instruction, vdpbf16ps 32. So bf16 activations use
//   vdpbf16ps on (k, k+1) pairs, which needs the weights as exact BF16 pairs: 8-bit codes go through
//   cvtdq2ps + cvtne2ps2bf16 (exact: an integer < 256 has 8 significant bits), nibbles through the
//   0x43-byte trick (BF16 0x43cc == 128 + c). fp32/fp16 activations keep fp32 FMAs (converting them to
//   BF16 would lose precision the caller asked for).
// * Loop order per N-block: for each group, the group's codes (<= 8 KiB for g = 128) are decoded once
//   per MR-row tile while they sit in L1; group sums are folded into a per-block [M][64] fp32 total
//   with the scale and zero point; the epilogue adds bias and rounds once to the output dtype.
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "kernel.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// kernel_avx512_vbmi.cpp compiles this file a second time with GPTQ_CPU_VBMI defined: AVX512-VBMI
// added to the target, everything in namespace avx512_vbmi, and only the direct int8 x BF16 kernel
// exported, whose decode then uses byte tables (see I8Bf16). A separate unit because the flag must not
// reach code that runs on AVX-512 CPUs without VBMI (Skylake-SP, Cascade Lake, Cooper Lake).
#if defined(GPTQ_CPU_VBMI)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx512vbmi,avx2,fma,f16c"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx512vbmi,avx2,fma,f16c")
#endif
#else
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma,f16c"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma,f16c")
#endif
#endif
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the deliberately undefined pass-through operand inside its own AVX-512 intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// AVX512-BF16 and -VNNI are enabled for the whole unit (GCC refuses to inline a BF16-target
// micro-kernel into a driver without it), but their instructions come only from explicit intrinsics
// (vdpbf16ps / vcvtne2ps2bf16 in the BF16 kernels and dequant_t_bf16, vpdpbusd in the W8A8 kernel):
// no __bf16 arithmetic and no integer dot-product loops the compiler could lower to them on its own.
// ops.cpp calls those only when the CPU reports avx512bf16 / avx512vnni; an AVX-512 CPU without them
// runs the fp32 kernels.
#define ALWAYS_INLINE inline __attribute__((always_inline))

namespace gptq_cpu {
namespace {

constexpr int kV = kBlockN / 16;  // zmm vectors per block row

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ------------------------------------------------------------------------------------------------
// Per-group scale and (zero + code bias) for 64 columns.
// ------------------------------------------------------------------------------------------------
template <class A>
ALWAYS_INLINE void load_group_terms(const A& a, int64_t b, int64_t g, float cb, __m512* s, __m512* zc) {
  const int64_t off = (b * a.G + g) * kBlockN;
  if (a.scales_f16) {
    const uint16_t* p = static_cast<const uint16_t*>(a.scales) + off;
    for (int v = 0; v < kV; ++v) s[v] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * v)));
  } else {
    const float* p = static_cast<const float*>(a.scales) + off;
    for (int v = 0; v < kV; ++v) s[v] = _mm512_loadu_ps(p + 16 * v);
  }
  if (a.zeros) {
    const uint8_t* p = a.zeros + off;
    const __m512 vcb = _mm512_set1_ps(cb);
    for (int v = 0; v < kV; ++v)
      zc[v] = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v)))), vcb);
  } else {
    for (int v = 0; v < kV; ++v) zc[v] = _mm512_set1_ps(a.sym_zero + cb);
  }
}

// 16 codes (bytes) -> 16 floats.
ALWAYS_INLINE __m512 u8x16_to_ps(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// One 64-byte nibble k-pair row -> 4 vectors; lane c of P[v] is column 16v + c, as the dword
// (bf16(128 + code(k)) | bf16(128 + code(k+1)) << 16). See kernel.h for the byte order that makes
// this land in natural column order.
// With kMagic = 0 the dwords are instead the plain integers code(k) | code(k+1) << 16.
template <int kMagic = 0x43>
ALWAYS_INLINE void unpack_nibbles(const uint8_t* c, __m512i* P) {
  const __m512i v = _mm512_loadu_si512(c);
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512i lo = _mm512_and_si512(v, m0f);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
  const __m512i u0 = _mm512_unpacklo_epi8(lo, hi);
  const __m512i u1 = _mm512_unpackhi_epi8(lo, hi);
  const __m512i mg = _mm512_set1_epi8(kMagic);
  P[0] = _mm512_unpacklo_epi8(u0, mg);
  P[1] = _mm512_unpackhi_epi8(u0, mg);
  P[2] = _mm512_unpacklo_epi8(u1, mg);
  P[3] = _mm512_unpackhi_epi8(u1, mg);
}

// The direct (M < kTiledMinM) kernels stream each code once, with enough conversion work per byte that
// the hardware prefetcher alone leaves some DRAM latency exposed. Requesting the codes 4 KiB ahead,
// measured as an interleaved A/B with every call on a different weight copy (640 MiB in rotation, 2
// threads, Qwen3-1.7B layers): int8 M=1 -2..-5% time, M=4 -6..-9%; int4 M=1 -1..-6%, M=4 -10..-14%.
// 1, 2 and 4 KiB ahead are within noise of each other.
constexpr int64_t kStreamAhead = 4096;

template <int kPairBytes>
ALWAYS_INLINE void prefetch_ahead(const uint8_t* c) {
  for (int l = 0; l < kPairBytes / 64; ++l)
    _mm_prefetch(reinterpret_cast<const char*>(c + kStreamAhead + 64 * l), _MM_HINT_T0);
}

inline float load_f32(const float* p) { return *p; }
inline uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline double load_f64(const void* p) {
  double v;
  std::memcpy(&v, p, 8);
  return v;
}

// ------------------------------------------------------------------------------------------------
// Micro-kernels: MR activation rows x 64 columns over one group's k-pairs [0, npairs). Each writes
// res[r][v] = sum_k x[r, k] * (code[k, 16v + lane] + cb) in natural column order.
// x points at row 0, column k0 of the group; rows are ldx apart.
// ------------------------------------------------------------------------------------------------

// 8-bit codes, fp32 activations. A 16-byte load is 8 columns x (k, k+1); the (x[k], x[k+1]) pair is
// broadcast as one 64-bit value, so each accumulator lane pair (2i, 2i+1) holds column i's even- and
// odd-k partial sums, added together once at the end of the group.
struct I8F32 {
  static constexpr int kMaxMR = 3;  // 8 accumulators per row
  static constexpr float kCodeBias = 0.f;
  static constexpr bool kBf16 = false;
  static constexpr int kPairBytes = 2 * kBlockN;
  template <int MR>
  static ALWAYS_INLINE void run(const uint8_t* cp, int64_t npairs, const float* x, int64_t ldx, __m512 (*res)[kV]) {
    __m512 acc[MR][2 * kV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 2 * kV; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < npairs; ++p) {
      const uint8_t* c = cp + p * kPairBytes;
      prefetch_ahead<kPairBytes>(c);
      __m512 xp[MR];
      for (int r = 0; r < MR; ++r) xp[r] = _mm512_castpd_ps(_mm512_set1_pd(load_f64(x + r * ldx + 2 * p)));
      for (int v = 0; v < 2 * kV; ++v) {
        const __m512 w = u8x16_to_ps(c + 16 * v);
        for (int r = 0; r < MR; ++r) acc[r][v] = _mm512_fmadd_ps(w, xp[r], acc[r][v]);
      }
    }
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kV; ++v)
        res[r][v] = _mm512_add_ps(_mm512_permutex2var_ps(acc[r][2 * v], even, acc[r][2 * v + 1]),
                                  _mm512_permutex2var_ps(acc[r][2 * v], odd, acc[r][2 * v + 1]));
  }
};

#if defined(GPTQ_CPU_VBMI)
// 8-bit code -> BF16 bits by byte tables. An integer q < 256 is exact in BF16, but its exponent depends
// on q, so the conversion otherwise goes through fp32 (zero-extend, cvtdq2ps, cvtne2ps2bf16: 5 ops
// per 32 weights, the M = 1 kernel's cost in cache). For q >= 128 the BF16 bits are 0x4300 + (q - 128):
// high byte 0x43, low byte q + 0x80 (mod 256). For q < 128 both bytes come from 128-entry tables, which
// vpermi2b indexes with the low 7 bits of q directly. vpermt2b then interleaves (low, high) bytes into
// words in code order: 7 ops per 64 weights. One core in cache: M = 1 22-23% faster, M = 2 12%, M = 3-4
// about even; slower in the tiled M >= 5 kernel (the tables cost registers its 24 accumulators need).
struct alignas(64) VbmiTables {
  uint8_t hi[128], lo[128];  // BF16 bits of q = 0..127: high and low byte
  uint8_t ilv[2][64];        // vpermt2b indices: word j of output h = (lo[32h + j], hi[32h + j])
};

constexpr uint16_t bf16_bits_of_small_int(int q) {  // exact for 0 <= q < 256 (8 significant bits)
  if (q == 0) return 0;
  int e = 0;
  while ((q >> (e + 1)) != 0) ++e;
  return static_cast<uint16_t>(((127 + e) << 7) | ((q << (7 - e)) & 0x7f));
}

constexpr VbmiTables make_vbmi_tables() {
  VbmiTables t{};
  for (int q = 0; q < 128; ++q) {
    t.hi[q] = static_cast<uint8_t>(bf16_bits_of_small_int(q) >> 8);
    t.lo[q] = static_cast<uint8_t>(bf16_bits_of_small_int(q) & 0xff);
  }
  for (int h = 0; h < 2; ++h)
    for (int b = 0; b < 64; ++b) t.ilv[h][b] = static_cast<uint8_t>((32 * h + b / 2) | (b % 2 ? 64 : 0));
  return t;
}
static_assert(bf16_bits_of_small_int(1) == 0x3f80 && bf16_bits_of_small_int(127) == 0x42fe &&
              bf16_bits_of_small_int(128) == 0x4300 && bf16_bits_of_small_int(255) == 0x437f);
constexpr VbmiTables kVbmi = make_vbmi_tables();

// 64 codes -> two vectors of 32 BF16 words, word j of out[h] = BF16(c[32h + j]).
ALWAYS_INLINE void decode64_vbmi(const uint8_t* c, __m512i* out) {
  const __m512i q = _mm512_loadu_si512(c);
  const __mmask64 top = _mm512_movepi8_mask(q);
  __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(kVbmi.hi), q, _mm512_load_si512(kVbmi.hi + 64));
  __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(kVbmi.lo), q, _mm512_load_si512(kVbmi.lo + 64));
  hi = _mm512_mask_mov_epi8(hi, top, _mm512_set1_epi8(0x43));
  lo = _mm512_mask_add_epi8(lo, top, q, _mm512_set1_epi8(static_cast<char>(0x80)));
  out[0] = _mm512_permutex2var_epi8(lo, _mm512_load_si512(kVbmi.ilv[0]), hi);
  out[1] = _mm512_permutex2var_epi8(lo, _mm512_load_si512(kVbmi.ilv[1]), hi);
}
#endif

// 8-bit codes, bf16 activations: two 16-byte loads -> 2 x 16 floats -> one vector of 16 BF16 pairs
// (cvtne2ps2bf16 puts its second operand in the low half), then one vdpbf16ps per row. With VBMI, the
// byte-table decode above gives the same words from one 64-byte load.
struct I8Bf16 {
  static constexpr int kMaxMR = 6;
  static constexpr float kCodeBias = 0.f;
  static constexpr bool kBf16 = true;
  static constexpr int kPairBytes = 2 * kBlockN;
  template <int MR>
  static ALWAYS_INLINE void run(const uint8_t* cp, int64_t npairs, const uint16_t* x, int64_t ldx,
                                            __m512 (*res)[kV]) {
    __m512 acc[MR][kV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kV; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < npairs; ++p) {
      const uint8_t* c = cp + p * kPairBytes;
      prefetch_ahead<kPairBytes>(c);
      __m512bh xp[MR];
      for (int r = 0; r < MR; ++r) xp[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_u32(x + r * ldx + 2 * p)));
#if defined(GPTQ_CPU_VBMI)
      for (int h = 0; h < kV / 2; ++h) {
        __m512i w[2];
        decode64_vbmi(c + 64 * h, w);
        for (int u = 0; u < 2; ++u)
          for (int r = 0; r < MR; ++r) acc[r][2 * h + u] = _mm512_dpbf16_ps(acc[r][2 * h + u], (__m512bh)w[u], xp[r]);
      }
#else
      for (int v = 0; v < kV; ++v) {
        const __m512bh w = _mm512_cvtne2ps_pbh(u8x16_to_ps(c + 32 * v + 16), u8x16_to_ps(c + 32 * v));
        for (int r = 0; r < MR; ++r) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], w, xp[r]);
      }
#endif
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kV; ++v) res[r][v] = acc[r][v];
  }
};

// Nibble codes, fp32 activations. The same unpack with 0 instead of 0x43 gives exact integer pairs,
// converted with cvtdq2ps. (The +128 BF16 form would save the two conversions, but its cancellation
// costs fp32 results ~5 bits -- relative error up to 4e-5 for 2-bit codes -- which is invisible in
// BF16 but not acceptable for fp32 activations.)
struct I4F32 {
  static constexpr int kMaxMR = 5;
  static constexpr float kCodeBias = 0.f;
  static constexpr bool kBf16 = false;
  static constexpr int kPairBytes = kBlockN;
  template <int MR>
  static ALWAYS_INLINE void run(const uint8_t* cp, int64_t npairs, const float* x, int64_t ldx, __m512 (*res)[kV]) {
    __m512 acc[MR][kV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kV; ++v) acc[r][v] = _mm512_setzero_ps();
    const __m512i lo_mask = _mm512_set1_epi32(0xffff);
    for (int64_t p = 0; p < npairs; ++p) {
      prefetch_ahead<kPairBytes>(cp + p * kPairBytes);
      __m512i P[kV];
      unpack_nibbles<0>(cp + p * kPairBytes, P);
      for (int v = 0; v < kV; ++v) {
        const __m512 e = _mm512_cvtepi32_ps(_mm512_and_si512(P[v], lo_mask));
        const __m512 o = _mm512_cvtepi32_ps(_mm512_srli_epi32(P[v], 16));
        for (int r = 0; r < MR; ++r) {
          acc[r][v] = _mm512_fmadd_ps(e, _mm512_set1_ps(load_f32(x + r * ldx + 2 * p)), acc[r][v]);
          acc[r][v] = _mm512_fmadd_ps(o, _mm512_set1_ps(load_f32(x + r * ldx + 2 * p + 1)), acc[r][v]);
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kV; ++v) res[r][v] = acc[r][v];
  }
};

// Nibble codes, bf16 activations: the unpacked dwords ARE the BF16 pairs; one vdpbf16ps per row.
struct I4Bf16 {
  static constexpr int kMaxMR = 6;
  static constexpr float kCodeBias = 128.f;
  static constexpr bool kBf16 = true;
  static constexpr int kPairBytes = kBlockN;
  template <int MR>
  static ALWAYS_INLINE void run(const uint8_t* cp, int64_t npairs, const uint16_t* x, int64_t ldx,
                                            __m512 (*res)[kV]) {
    __m512 acc[MR][kV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kV; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < npairs; ++p) {
      prefetch_ahead<kPairBytes>(cp + p * kPairBytes);
      __m512i P[kV];
      unpack_nibbles(cp + p * kPairBytes, P);
      __m512bh xp[MR];
      for (int r = 0; r < MR; ++r) xp[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_u32(x + r * ldx + 2 * p)));
      for (int v = 0; v < kV; ++v)
        for (int r = 0; r < MR; ++r) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)P[v], xp[r]);
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kV; ++v) res[r][v] = acc[r][v];
  }
};

// ------------------------------------------------------------------------------------------------
// Output: fp32 -> out dtype, round to nearest even, only the columns < N.
// ------------------------------------------------------------------------------------------------
ALWAYS_INLINE __m256i ps_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i rb = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                      _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, rb), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

ALWAYS_INLINE void store_out(void* out, OutType t, int64_t idx, __m512 v, __mmask16 mask) {
  if (mask == static_cast<__mmask16>(0xffff)) {  // plain stores: masked ones are slow on Zen 4
    switch (t) {
      case OutType::F32: _mm512_storeu_ps(static_cast<float*>(out) + idx, v); return;
      case OutType::BF16:
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + idx), ps_to_bf16(v));
        return;
      case OutType::F16:
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + idx),
                            _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        return;
    }
  }
  switch (t) {
    case OutType::F32:
      _mm512_mask_storeu_ps(static_cast<float*>(out) + idx, mask, v);
      break;
    case OutType::BF16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + idx, mask, ps_to_bf16(v));
      break;
    case OutType::F16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + idx, mask,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
  }
}

ALWAYS_INLINE __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

// Epilogue of one block: + bias, round once to the output dtype, columns < N only.
ALWAYS_INLINE void store_block(const GemmArgs& a, int64_t b, const float* total) {
  const int64_t n0 = b * kBlockN;
  for (int64_t m = 0; m < a.M; ++m) {
    for (int v = 0; v < kV; ++v) {
      const int64_t n = n0 + 16 * v;
      if (n >= a.N) break;
      const __mmask16 mask = tail_mask(a.N - n);
      __m512 y = _mm512_loadu_ps(total + m * kBlockN + 16 * v);
      if (a.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, a.bias + n));
      store_out(a.out, a.out_type, m * a.ldo + n, y, mask);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// BF16 activations, M >= ~5: decode once, multiply many times.
//
// With the direct kernels above a tile of MR <= 6 rows re-decodes the group's codes for every tile:
// at M = 16 that is 3 decodes per weight and the conversions, not the dot products, take half the
// issue slots. Here each chunk of <= kChunk k-pairs of the group is decoded ONCE into an L1-resident
// scratch of BF16 pairs (kChunk * 256 B = 16 KiB), then register tiles of up to 16 rows x 16 columns
// stream it: per 16 dot products one 64-byte load from L1 and 16 broadcast loads of x pairs, no
// conversion. One decode per weight whatever M is.
// ------------------------------------------------------------------------------------------------
constexpr int64_t kChunk = 64;  // k-pairs per decoded chunk

struct DecI8 {
  static constexpr float kCodeBias = 0.f;
  static constexpr int kPairBytes = 2 * kBlockN;
  static ALWAYS_INLINE void decode(const uint8_t* c, __m512i* P) {
    for (int v = 0; v < kV; ++v)
      P[v] = (__m512i)_mm512_cvtne2ps_pbh(u8x16_to_ps(c + 32 * v + 16), u8x16_to_ps(c + 32 * v));
  }
};

struct DecI4 {
  static constexpr float kCodeBias = 128.f;
  static constexpr int kPairBytes = kBlockN;
  static ALWAYS_INLINE void decode(const uint8_t* c, __m512i* P) { unpack_nibbles(c, P); }
};

// acc += w . broadcast(*x) with the broadcast folded into the instruction ({1to16} memory operand),
// which GCC does not do for the intrinsic (it emits a vpbroadcastd per row).
ALWAYS_INLINE void dpbusd_bcast(__m512& acc, __m512i w, const int32_t* x) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
}

// acc[r][v] = sum_p w[p][v] . x[r][p] for MR rows and all 4 column vectors over `np` k-pairs, then
// total[r][v] += s[v] * acc[r][v]. A 2-D register tile (6 x 4 = 24 accumulators): per k-pair 4 weight
// vectors and MR broadcasts feed 4*MR dot products. x is pair-major (xp[p * ldp + r]): one base
// pointer and constant offsets, no per-row address registers.
//
// The first row tile of a chunk (D = the decoder) decodes each k-pair from `codes` itself and leaves it
// in the L1 scratch `w` for the tiles after it (D = void), which only load it. Decoding inside the
// first tile lets the conversions overlap its dot products; as a phase of its own before the tiles it
// cost ~17% of the time at M = 16 (the conversions and the dot products use different ports). The
// first tile also prefetches the NEXT chunk's codes, `pf_lines` cache lines per k-pair (decoding and
// multiplying without it left memory idle: ~45% of the first version's time was stalls), into L2
// (prefetcht1), not L1: the first tile issues a whole chunk of prefetches (8 KiB for int8) in about a
// third of the chunk's time, more misses than L1 keeps in flight, and with T0 they backed up into its
// loads. T1 vs T0, 2 threads, weights from DRAM: int8 M=8 -8..-17%, M=16 -4..-11% time. Two or four
// chunks ahead: no better (-5..+7%). The direct kernels (M <= 4) and the fp32 tiles showed no
// difference either way (+-4%) and keep T0.
// With `zc` set, the tile also subtracts (z + cb) * X[r, g] (xs[r * G] = X[r, g]) before scaling: the
// group's zero-point term, applied in one chunk of the group only, costs MR * 4 fnmadds here instead of
// a load-fnmadd-store pass over the block's totals per group.
template <int MR, class D>
ALWAYS_INLINE void dot_tile(__m512i* w, const uint8_t* codes, bool keep, int64_t np, const uint32_t* xp,
                            int64_t ldp, float* total, const __m512* s, const __m512* zc, const float* xs,
                            int64_t G, const char* pf, int pf_lines) {
  __m512 acc[MR][kV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < np; ++p) {
    if (pf) {
      for (int l = 0; l < pf_lines; ++l) _mm_prefetch(pf + (p * pf_lines + l) * 64, _MM_HINT_T1);
    }
    __m512i wv[kV];
    if constexpr (std::is_void_v<D>) {
      for (int v = 0; v < kV; ++v) wv[v] = _mm512_load_si512(w + p * kV + v);
    } else {
      D::decode(codes + p * D::kPairBytes, wv);
      if (keep) {
        for (int v = 0; v < kV; ++v) _mm512_store_si512(w + p * kV + v, wv[v]);
      }
    }
    const uint32_t* xr = xp + p * ldp;
    for (int r = 0; r < MR; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xr[r]));
      for (int v = 0; v < kV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)wv[v], xb);
    }
  }
  if (zc) {
    for (int r = 0; r < MR; ++r) {
      const __m512 xr = _mm512_set1_ps(xs[r * G]);
      for (int v = 0; v < kV; ++v) acc[r][v] = _mm512_fnmadd_ps(zc[v], xr, acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kV; ++v) {
      float* t = total + r * kBlockN + 16 * v;
      _mm512_storeu_ps(t, _mm512_fmadd_ps(s[v], acc[r][v], _mm512_loadu_ps(t)));
    }
}

template <class D>
ALWAYS_INLINE void dot_tile_mr(int64_t mr, __m512i* w, const uint8_t* codes, bool keep, int64_t np,
                               const uint32_t* xp, int64_t ldp, float* total, const __m512* s, const __m512* zc,
                               const float* xs, int64_t G, const char* pf, int pf_lines) {
  switch (mr) {
    case 6: dot_tile<6, D>(w, codes, keep, np, xp, ldp, total, s, zc, xs, G, pf, pf_lines); break;
    case 5: dot_tile<5, D>(w, codes, keep, np, xp, ldp, total, s, zc, xs, G, pf, pf_lines); break;
    case 4: dot_tile<4, D>(w, codes, keep, np, xp, ldp, total, s, zc, xs, G, pf, pf_lines); break;
    case 3: dot_tile<3, D>(w, codes, keep, np, xp, ldp, total, s, zc, xs, G, pf, pf_lines); break;
    case 2: dot_tile<2, D>(w, codes, keep, np, xp, ldp, total, s, zc, xs, G, pf, pf_lines); break;
    default: dot_tile<1, D>(w, codes, keep, np, xp, ldp, total, s, zc, xs, G, pf, pf_lines); break;
  }
}

// Row tiles as even as possible with at most 6 rows: M = 16 runs 6 + 5 + 5. The first decodes.
template <class D>
ALWAYS_INLINE void dot_rows(__m512i* w, const uint8_t* codes, int64_t np, const uint32_t* xp, int64_t ldp,
                            int64_t M, float* total, const __m512* s, const __m512* zc, const float* xs, int64_t G,
                            const char* pf, int pf_lines) {
  constexpr int64_t kMaxMR = 6;
  const int64_t ntiles = (M + kMaxMR - 1) / kMaxMR;
  const int64_t base = M / ntiles, extra = M % ntiles;
  int64_t m0 = 0;
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t mr = base + (t < extra ? 1 : 0);
    if (t == 0) dot_tile_mr<D>(mr, w, codes, ntiles > 1, np, xp, ldp, total, s, zc, xs, G, pf, pf_lines);
    else dot_tile_mr<void>(mr, w, nullptr, false, np, xp + m0, ldp, total + m0 * kBlockN, s, zc, xs + m0 * G, G,
                           nullptr, 0);
    m0 += mr;
  }
}

template <class A>
ALWAYS_INLINE __m512 load_scale_vec(const A& a, int64_t b, int64_t g, int v) {
  const int64_t off = (b * a.G + g) * kBlockN + 16 * v;
  if (a.scales_f16)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(a.scales) + off)));
  return _mm512_loadu_ps(static_cast<const float*>(a.scales) + off);
}

template <class A>
ALWAYS_INLINE __m512 load_zc_vec(const A& a, int64_t b, int64_t g, int v, float cb) {
  if (!a.zeros) return _mm512_set1_ps(a.sym_zero + cb);
  const uint8_t* p = a.zeros + (b * a.G + g) * kBlockN + 16 * v;
  return _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))),
                       _mm512_set1_ps(cb));
}

template <class D>
void small_m_bf16_tiled(const GemmArgs& a, int64_t b0, int64_t b1, float* total, __m512i* scratch) {
  const int64_t M = a.M, Kp = a.Kp, G = a.G;
  for (int64_t b = b0; b < b1; ++b) {
    std::memset(total, 0, static_cast<size_t>(M * kBlockN) * sizeof(float));
    const uint8_t* cb = a.codes + b * (Kp / 2) * D::kPairBytes;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = a.group_ptr[g], k1 = a.group_ptr[g + 1];
      if (k1 <= k0) continue;
      // total += s * (sum x (q + cb) - (z + cb) sum x), chunk by chunk; the zero-point term goes with the
      // group's first chunk.
      __m512 s[kV], zc[kV];
      for (int v = 0; v < kV; ++v) {
        s[v] = load_scale_vec(a, b, g, v);
        zc[v] = load_zc_vec(a, b, g, v, D::kCodeBias);
      }
      for (int64_t c0 = k0; c0 < k1; c0 += 2 * kChunk) {
        const int64_t np = min64(kChunk, (k1 - c0) / 2);
        const uint8_t* cc = cb + (c0 / 2) * D::kPairBytes;
        dot_rows<D>(scratch, cc, np, a.xp + (c0 / 2) * M, M, M, total, s, c0 == k0 ? zc : nullptr, a.xsum + g, G,
                    reinterpret_cast<const char*>(cc + np * D::kPairBytes), D::kPairBytes / 64);
      }
    }
    store_block(a, b, total);
  }
}

// ------------------------------------------------------------------------------------------------
// fp32 activations, M >= kTiledMinM: the same decode-once structure with fp32 weights. Per k-pair the
// scratch holds 8 vectors (rows k and k+1, 4 x 16 columns, exact integers q); tiles of <= 6 rows x 64
// columns do 2 * 4 * MR FMAs per k-pair from 8 L1 loads and 2 * MR broadcasts. x is k-major
// (xt[k * M + m]).
// ------------------------------------------------------------------------------------------------
constexpr int64_t kChunkF32 = 32;  // k-pairs per decoded chunk: 32 * 512 B = 16 KiB

struct DecF32I8 {
  static constexpr int kPairBytes = 2 * kBlockN;
  static ALWAYS_INLINE void decode(const uint8_t* c, __m512* w) {  // w[0..3]: row k, w[4..7]: row k+1
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int v = 0; v < kV; ++v) {
      const __m512 lo = u8x16_to_ps(c + 32 * v), hi = u8x16_to_ps(c + 32 * v + 16);
      w[v] = _mm512_permutex2var_ps(lo, even, hi);
      w[kV + v] = _mm512_permutex2var_ps(lo, odd, hi);
    }
  }
};

struct DecF32I4 {
  static constexpr int kPairBytes = kBlockN;
  static ALWAYS_INLINE void decode(const uint8_t* c, __m512* w) {
    __m512i P[kV];
    unpack_nibbles<0>(c, P);
    const __m512i lo16 = _mm512_set1_epi32(0xffff);
    for (int v = 0; v < kV; ++v) {
      w[v] = _mm512_cvtepi32_ps(_mm512_and_si512(P[v], lo16));
      w[kV + v] = _mm512_cvtepi32_ps(_mm512_srli_epi32(P[v], 16));
    }
  }
};

template <int MR>
ALWAYS_INLINE void fma_tile(const __m512* w, int64_t np, const float* xt, int64_t ldt, float* total, const __m512* s,
                            const char* pf, int pf_lines) {
  __m512 acc[MR][kV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < np; ++p) {
    if (pf) {
      for (int l = 0; l < pf_lines; ++l) _mm_prefetch(pf + (p * pf_lines + l) * 64, _MM_HINT_T0);
    }
    const __m512* wp = w + p * 2 * kV;
    const float* x0 = xt + (2 * p) * ldt;
    const float* x1 = x0 + ldt;
    for (int h = 0; h < 2; ++h) {  // row k, then row k+1
      const float* xr = h ? x1 : x0;
      __m512 wv[kV];
      for (int v = 0; v < kV; ++v) wv[v] = _mm512_load_ps(reinterpret_cast<const float*>(wp + h * kV + v));
      for (int r = 0; r < MR; ++r) {
        const __m512 xb = _mm512_set1_ps(xr[r]);
        for (int v = 0; v < kV; ++v) acc[r][v] = _mm512_fmadd_ps(wv[v], xb, acc[r][v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kV; ++v) {
      float* t = total + r * kBlockN + 16 * v;
      _mm512_storeu_ps(t, _mm512_fmadd_ps(s[v], acc[r][v], _mm512_loadu_ps(t)));
    }
}

ALWAYS_INLINE void fma_rows(const __m512* w, int64_t np, const float* xt, int64_t ldt, int64_t M, float* total,
                            const __m512* s, const char* pf, int pf_lines) {
  constexpr int64_t kMaxMR = 6;
  const int64_t ntiles = (M + kMaxMR - 1) / kMaxMR;
  const int64_t base = M / ntiles, extra = M % ntiles;
  int64_t m0 = 0;
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t mr = base + (t < extra ? 1 : 0);
    const float* xr = xt + m0;
    float* tr = total + m0 * kBlockN;
    switch (mr) {
      case 6: fma_tile<6>(w, np, xr, ldt, tr, s, pf, pf_lines); break;
      case 5: fma_tile<5>(w, np, xr, ldt, tr, s, pf, pf_lines); break;
      case 4: fma_tile<4>(w, np, xr, ldt, tr, s, pf, pf_lines); break;
      case 3: fma_tile<3>(w, np, xr, ldt, tr, s, pf, pf_lines); break;
      case 2: fma_tile<2>(w, np, xr, ldt, tr, s, pf, pf_lines); break;
      default: fma_tile<1>(w, np, xr, ldt, tr, s, pf, pf_lines); break;
    }
    m0 += mr;
    pf = nullptr;
  }
}

template <class D>
void small_m_f32_tiled(const GemmArgs& a, int64_t b0, int64_t b1, float* total, __m512* scratch) {
  const int64_t M = a.M, Kp = a.Kp, G = a.G;
  for (int64_t b = b0; b < b1; ++b) {
    std::memset(total, 0, static_cast<size_t>(M * kBlockN) * sizeof(float));
    const uint8_t* cb = a.codes + b * (Kp / 2) * D::kPairBytes;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = a.group_ptr[g], k1 = a.group_ptr[g + 1];
      if (k1 <= k0) continue;
      for (int64_t c0 = k0; c0 < k1; c0 += 2 * kChunkF32) {
        const int64_t np = min64(kChunkF32, (k1 - c0) / 2);
        const uint8_t* cc = cb + (c0 / 2) * D::kPairBytes;
        for (int64_t p = 0; p < np; ++p) D::decode(cc + p * D::kPairBytes, scratch + p * 2 * kV);
        __m512 s[kV];
        for (int v = 0; v < kV; ++v) s[v] = load_scale_vec(a, b, g, v);
        fma_rows(scratch, np, a.xt + c0 * M, M, M, total, s, reinterpret_cast<const char*>(cc + np * D::kPairBytes),
                 D::kPairBytes / 64);
      }
      for (int v = 0; v < kV; ++v) {
        const __m512 szc = _mm512_mul_ps(load_scale_vec(a, b, g, v), load_zc_vec(a, b, g, v, 0.f));
        for (int64_t m = 0; m < M; ++m) {
          float* t = total + m * kBlockN + 16 * v;
          _mm512_storeu_ps(t, _mm512_fnmadd_ps(szc, _mm512_set1_ps(a.xsum[m * G + g]), _mm512_loadu_ps(t)));
        }
      }
    }
    store_block(a, b, total);
  }
}

#if !defined(GPTQ_CPU_VBMI)
// ------------------------------------------------------------------------------------------------
// Opt-in W8A8 (int8 weights x int8 activations, AVX512-VNNI). vpdpbusd multiplies 4 unsigned bytes by
// 4 signed bytes per lane into an int32: 64 MACs per instruction, twice vdpbf16ps. The codes are
// already unsigned bytes; two consecutive k-pair rows ([column][k, k+1] and [column][k+2, k+3]) become
// the per-column k-quads VNNI wants with one word interleave (vpermt2w) per 64 weights. Per group:
//   y += s[g, n] * xscale[m, g] * ( sum_k q[k, n] * xq[m, k]  -  z[g, n] * sum_k xq[m, k] )
// in exact int32 until the group's end (|sum| <= K * 255 * 127 fits easily), then fp32. The only
// approximation is xq = round(x / xscale): off by default, see docs/cpu-kernel.md.
// ------------------------------------------------------------------------------------------------
template <int MR>
ALWAYS_INLINE void vnni_tile(const uint8_t* cp, int64_t nquads, const int32_t* xq, int64_t ldq, int64_t g, int64_t G,
                             const float* xsum, const float* xscale, const __m512* s, const __m512* z, float* total,
                             const char* pf) {
  const __m512i interleave = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                              38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  // int32 accumulators, held as __m512 (GCC 12 keeps an array of __m512 in registers more readily).
  __m512 acc[MR][kV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < nquads; ++q) {
    const uint8_t* c0 = cp + 2 * q * 2 * kBlockN;
    const uint8_t* c1 = c0 + 2 * kBlockN;
    if (pf) {
      for (int l = 0; l < 4; ++l) _mm_prefetch(pf + (q * 4 + l) * 64, _MM_HINT_T0);
    }
    __m512i w[kV];
    for (int v = 0; v < kV; ++v) {
      const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + 32 * v)));
      const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c1 + 32 * v)));
      w[v] = _mm512_permutex2var_epi16(a, interleave, b);  // dword i = q(k..k+3) of column 16v + i
    }
    const int32_t* xr = xq + q * ldq;
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kV; ++v) dpbusd_bcast(acc[r][v], w[v], xr + r);
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 xs = _mm512_set1_ps(xsum[r * G + g]);
    const __m512 sx = _mm512_set1_ps(xscale[r * G + g]);
    float* t = total + r * kBlockN;
    for (int v = 0; v < kV; ++v) {
      const __m512 d = _mm512_fnmadd_ps(z[v], xs, _mm512_cvtepi32_ps(_mm512_castps_si512(acc[r][v])));
      _mm512_storeu_ps(t + 16 * v, _mm512_fmadd_ps(_mm512_mul_ps(s[v], sx), d, _mm512_loadu_ps(t + 16 * v)));
    }
  }
}

void small_m_w8a8_impl(const GemmArgs& a, int64_t b0, int64_t b1, float* total) {
  const int64_t M = a.M, Kp = a.Kp, G = a.G;
  // Tiles of up to 6 rows x 64 columns (24 accumulators). With the _mm512_dpbusd_epi32 intrinsic GCC 12
  // copied every tied accumulator through the stack at this size (194 GFLOP/s per core at M = 16, 278
  // with 4-row tiles); dpbusd_bcast's inline asm keeps them in registers and folds the broadcast of x
  // into the instruction: 292-327 GFLOP/s per core at M = 16 (one core, weights in L3, CPU time).
  constexpr int64_t kMaxMR = 6;
  const int64_t ntiles = (M + kMaxMR - 1) / kMaxMR;
  const int64_t base = M / ntiles, extra = M % ntiles;
  for (int64_t b = b0; b < b1; ++b) {
    std::memset(total, 0, static_cast<size_t>(M * kBlockN) * sizeof(float));
    const uint8_t* cb = a.codes + b * (Kp / 2) * 2 * kBlockN;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = a.group_ptr[g], k1 = a.group_ptr[g + 1];
      if (k1 <= k0) continue;
      __m512 s[kV], z[kV];
      load_group_terms(a, b, g, 0.f, s, z);
      const uint8_t* cg = cb + (k0 / 2) * 2 * kBlockN;
      const char* pf = reinterpret_cast<const char*>(cb + (k1 / 2) * 2 * kBlockN);
      int64_t m0 = 0;
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t mr = base + (t < extra ? 1 : 0);
        const int32_t* xq = a.xq4 + (k0 / 4) * M + m0;
        const float* xs = a.xsum + m0 * G;
        const float* sx = a.xscale + m0 * G;
        float* tr = total + m0 * kBlockN;
        const int64_t nq = (k1 - k0) / 4;
        switch (mr) {
          case 6: vnni_tile<6>(cg, nq, xq, M, g, G, xs, sx, s, z, tr, pf); break;
          case 5: vnni_tile<5>(cg, nq, xq, M, g, G, xs, sx, s, z, tr, pf); break;
          case 4: vnni_tile<4>(cg, nq, xq, M, g, G, xs, sx, s, z, tr, pf); break;
          case 3: vnni_tile<3>(cg, nq, xq, M, g, G, xs, sx, s, z, tr, pf); break;
          case 2: vnni_tile<2>(cg, nq, xq, M, g, G, xs, sx, s, z, tr, pf); break;
          default: vnni_tile<1>(cg, nq, xq, M, g, G, xs, sx, s, z, tr, pf); break;
        }
        m0 += mr;
        pf = nullptr;
      }
    }
    store_block(a, b, total);
  }
}

#endif  // !GPTQ_CPU_VBMI

// One block's [M][64] fp32 totals for an entry point's call (freed by it); aligned_alloc wants the size
// rounded up to the alignment. nullptr when out of memory.
inline float* alloc_totals(int64_t M) {
  return static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(((M * kBlockN * 4 + 63) / 64) * 64)));
}

// ------------------------------------------------------------------------------------------------
// The small-M driver: blocks [b0, b1), all M rows.
// ------------------------------------------------------------------------------------------------
template <class K, int MR, class X>
ALWAYS_INLINE void tile_group(const uint8_t* cp, int64_t npairs, const X* x, int64_t ldx, int64_t g, int64_t G,
                              const float* xsum, const __m512* s, const __m512* zc, float* total) {
  __m512 res[MR][kV];
  K::template run<MR>(cp, npairs, x, ldx, res);
  for (int r = 0; r < MR; ++r) {
    const __m512 xs = _mm512_set1_ps(xsum[r * G + g]);
    float* t = total + r * kBlockN;
    for (int v = 0; v < kV; ++v) {
      const __m512 d = _mm512_fnmadd_ps(zc[v], xs, res[r][v]);  // sum x*(q+cb) - (z+cb)*sum x
      _mm512_storeu_ps(t + 16 * v, _mm512_fmadd_ps(s[v], d, _mm512_loadu_ps(t + 16 * v)));
    }
  }
}

template <class K, class X>
ALWAYS_INLINE void dispatch_tile(int mr, const uint8_t* cp, int64_t npairs, const X* x, int64_t ldx, int64_t g,
                                 int64_t G, const float* xsum, const __m512* s, const __m512* zc, float* total) {
  switch (mr) {
    case 1: tile_group<K, 1>(cp, npairs, x, ldx, g, G, xsum, s, zc, total); break;
    case 2: tile_group<K, 2>(cp, npairs, x, ldx, g, G, xsum, s, zc, total); break;
    case 3: tile_group<K, 3>(cp, npairs, x, ldx, g, G, xsum, s, zc, total); break;
    case 4: if constexpr (K::kMaxMR >= 4) tile_group<K, 4>(cp, npairs, x, ldx, g, G, xsum, s, zc, total); break;
    case 5: if constexpr (K::kMaxMR >= 5) tile_group<K, 5>(cp, npairs, x, ldx, g, G, xsum, s, zc, total); break;
    case 6: if constexpr (K::kMaxMR >= 6) tile_group<K, 6>(cp, npairs, x, ldx, g, G, xsum, s, zc, total); break;
    default: break;
  }
}

template <class K>
ALWAYS_INLINE void small_m_impl(const GemmArgs& a, int64_t b0, int64_t b1, float* total) {
  using X = typename std::conditional_t<K::kBf16, uint16_t, float>;
  const X* xg;
  if constexpr (K::kBf16) xg = a.xb; else xg = a.xf;
  const int64_t M = a.M, Kp = a.Kp, G = a.G;
  // Row tiles as even as possible: M = 7 with MR <= 6 runs 4 + 3, not 6 + 1.
  const int64_t ntiles = (M + K::kMaxMR - 1) / K::kMaxMR;
  const int64_t mr_base = M / ntiles, mr_extra = M % ntiles;
  __m512 s[kV], zc[kV];
  for (int64_t b = b0; b < b1; ++b) {
    std::memset(total, 0, static_cast<size_t>(M * kBlockN) * sizeof(float));
    const uint8_t* cb = a.codes + b * (Kp / 2) * K::kPairBytes;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = a.group_ptr[g], k1 = a.group_ptr[g + 1];
      if (k1 <= k0) continue;
      // Ask for the next group's codes early: the hardware prefetcher does the rest of the stream.
      if (g + 1 < G) _mm_prefetch(reinterpret_cast<const char*>(cb + (k1 / 2) * K::kPairBytes), _MM_HINT_T0);
      load_group_terms(a, b, g, K::kCodeBias, s, zc);
      int64_t m0 = 0;
      for (int64_t t = 0; t < ntiles; ++t) {
        const int mr = static_cast<int>(mr_base + (t < mr_extra ? 1 : 0));
        dispatch_tile<K>(mr, cb + (k0 / 2) * K::kPairBytes, (k1 - k0) / 2, xg + m0 * Kp + k0, Kp, g, G,
                         a.xsum + m0 * G, s, zc, total + m0 * kBlockN);
        m0 += mr;
      }
    }
    store_block(a, b, total);
  }
}

template <class K>
void small_m_entry(const GemmArgs& a, int64_t b0, int64_t b1, float* total) {
  small_m_impl<K>(a, b0, b1, total);
}
template <class K>
void small_m_entry_bf16(const GemmArgs& a, int64_t b0, int64_t b1, float* total) {
  small_m_impl<K>(a, b0, b1, total);
}

#if !defined(GPTQ_CPU_VBMI)
// ------------------------------------------------------------------------------------------------
// Dequantization into a [Kp][ldo] tile (the large-M path and the dequant op).
// ------------------------------------------------------------------------------------------------
ALWAYS_INLINE void store_row16(const DequantArgs& a, int64_t row, int64_t col, __m512 w) {
  store_out(a.out, a.out_type, row * a.ldo + col, w, static_cast<__mmask16>(0xffff));
}

void dequant_impl(const DequantArgs& a, int64_t b0, int64_t b1) {
  const bool nib = a.bits != 8;
  const float cb = nib ? 128.f : 0.f;
  const int64_t pb = nib ? kBlockN : 2 * kBlockN;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 s[kV], zc[kV];
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* cbk = a.codes + b * (a.Kp / 2) * pb;
    const int64_t col = (b - a.b_origin) * kBlockN;
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t k0 = a.group_ptr[g], k1 = a.group_ptr[g + 1];
      if (k1 <= k0) continue;
      load_group_terms(a, b, g, cb, s, zc);
      for (int64_t k = k0; k < k1; k += 2) {
        const uint8_t* c = cbk + (k / 2) * pb;
        if (nib) {
          __m512i P[kV];
          unpack_nibbles(c, P);
          for (int v = 0; v < kV; ++v) {
            const __m512 e = _mm512_castsi512_ps(_mm512_slli_epi32(P[v], 16));
            const __m512 o = _mm512_castsi512_ps(_mm512_and_si512(P[v], hi_mask));
            // (128 + q) - (128 + z) is exact; one rounding in the multiply, as format.dequantize.
            store_row16(a, k, col + 16 * v, _mm512_mul_ps(_mm512_sub_ps(e, zc[v]), s[v]));
            store_row16(a, k + 1, col + 16 * v, _mm512_mul_ps(_mm512_sub_ps(o, zc[v]), s[v]));
          }
        } else {
          for (int v = 0; v < kV; ++v) {
            const __m512 lo = u8x16_to_ps(c + 32 * v), hi = u8x16_to_ps(c + 32 * v + 16);
            const __m512 r0 = _mm512_permutex2var_ps(lo, even, hi), r1 = _mm512_permutex2var_ps(lo, odd, hi);
            store_row16(a, k, col + 16 * v, _mm512_mul_ps(_mm512_sub_ps(r0, zc[v]), s[v]));
            store_row16(a, k + 1, col + 16 * v, _mm512_mul_ps(_mm512_sub_ps(r1, zc[v]), s[v]));
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Transposed BF16 dequantization for the large-M path: writes W^T (row n, column k), the [N, K]
// layout oneDNN multiplies fastest (7% faster than [K, N] at M = 256 on this machine: the difference
// between meeting and missing "no slower than 1.1x dense"). Each dword of a decoded vector is a BF16
// (k, k+1) pair of one column, so a 16x16 dword transpose of 16 k-pairs turns 16 decoded vectors into
// 16 output rows of 32 contiguous k. W = q * s - z * s by one fmsub: z * s is exact in fp32 (8 + 11
// significant bits) so this rounds once, exactly as (q - z) * s does.
// ------------------------------------------------------------------------------------------------
ALWAYS_INLINE void transpose16x16_epi32(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + j]: lane L holds column 4L + j of rows i..i+3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
  }
  for (int j = 0; j < 8; ++j) {  // r[c] = column c of the 16 input rows
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// One group's dequantization terms for the BF16 writers: s and z * s per column, and for the 8-bit
// layout (lanes alternate k, k+1 of one column) the same duplicated to lane pairs.
struct Bf16Terms {
  __m512 s[kV], zs[kV], sl[kV], sh[kV], zl[kV], zh[kV];
};

ALWAYS_INLINE void load_bf16_terms(const DequantArgs& a, int64_t b, int64_t g, bool nib, Bf16Terms& t) {
  const __m512i dup_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i dup_hi = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
  load_group_terms(a, b, g, 0.f, t.s, t.zs);
  for (int v = 0; v < kV; ++v) t.zs[v] = _mm512_mul_ps(t.zs[v], t.s[v]);  // z * s, exact
  if (!nib) {
    for (int v = 0; v < kV; ++v) {
      t.sl[v] = _mm512_permutexvar_ps(dup_lo, t.s[v]);
      t.sh[v] = _mm512_permutexvar_ps(dup_hi, t.s[v]);
      t.zl[v] = _mm512_permutexvar_ps(dup_lo, t.zs[v]);
      t.zh[v] = _mm512_permutexvar_ps(dup_hi, t.zs[v]);
    }
  }
}

// One k-pair of one block -> 4 vectors of 16 BF16 (k, k+1) pairs, columns 16v .. 16v + 15 in order.
ALWAYS_INLINE void dequant_pair_bf16(const uint8_t* c, bool nib, const Bf16Terms& t, __m512i* out) {
  if (nib) {
    // word 2i <- word i (bf16 of code(k)), word 2i+1 <- word 16 + i (code(k+1)): _mm512_set_epi16
    // lists words from 31 down to 0.
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23,
                                                7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i lo16 = _mm512_set1_epi32(0xffff);
    __m512i P[kV];
    unpack_nibbles<0>(c, P);
    for (int v = 0; v < kV; ++v) {
      const __m512 e = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(P[v], lo16)), t.s[v], t.zs[v]);
      const __m512 o = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(P[v], 16)), t.s[v], t.zs[v]);
      out[v] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(o, e));
    }
  } else {
    for (int v = 0; v < kV; ++v) {
      const __m512 lo = _mm512_fmsub_ps(u8x16_to_ps(c + 32 * v), t.sl[v], t.zl[v]);
      const __m512 hi = _mm512_fmsub_ps(u8x16_to_ps(c + 32 * v + 16), t.sh[v], t.zh[v]);
      out[v] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    }
  }
}

void dequant_t_bf16_impl(const DequantArgs& a, int64_t b0, int64_t b1) {
  const bool nib = a.bits != 8;
  const int64_t pb = nib ? kBlockN : 2 * kBlockN;
  alignas(64) __m512i scratch[16][kV];
  uint16_t* out = static_cast<uint16_t*>(a.out);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* cbk = a.codes + b * (a.Kp / 2) * pb;
    uint16_t* rows = out + (b - a.b_origin) * kBlockN * a.ldo;
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t k0 = a.group_ptr[g], k1 = a.group_ptr[g + 1];
      if (k1 <= k0) continue;
      Bf16Terms t;
      load_bf16_terms(a, b, g, nib, t);
      for (int64_t p0 = k0 / 2; p0 < k1 / 2; p0 += 16) {
        const int np = static_cast<int>(min64(16, k1 / 2 - p0));
        for (int j = 0; j < np; ++j) dequant_pair_bf16(cbk + (p0 + j) * pb, nib, t, scratch[j]);
        const __mmask16 mask = tail_mask(np);
        // The next 16 k-pairs' codes (contiguous, across groups too) arrive while we transpose.
        const char* next = reinterpret_cast<const char*>(cbk + (p0 + np) * pb);
        const int lines = static_cast<int>(16 * pb / 64 / kV);
        for (int v = 0; v < kV; ++v) {
          for (int l = 0; l < lines; ++l) _mm_prefetch(next + (v * lines + l) * 64, _MM_HINT_T0);
          __m512i r[16];
          for (int j = 0; j < 16; ++j) r[j] = j < np ? scratch[j][v] : _mm512_setzero_si512();
          transpose16x16_epi32(r);
          // Masked stores only for a group's last, partial 16 k-pairs: on Zen 4 a masked zmm store
          // costs several times a plain one.
          if (np == 16) {
            for (int i = 0; i < 16; ++i) _mm512_storeu_si512(rows + (16 * v + i) * a.ldo + 2 * p0, r[i]);
          } else {
            for (int i = 0; i < 16; ++i) _mm512_mask_storeu_epi32(rows + (16 * v + i) * a.ldo + 2 * p0, mask, r[i]);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// BF16 dequantization into the "VNNI" layout oneDNN's brgemm ukernel multiplies without repacking:
// [k-pair][column][k, k+1]. That is the order the decode already produces (kernel.h: codes are stored
// k-pair-major, column, then k / k+1), so this is the transposed writer above minus the transpose:
// every decoded vector is stored as is. Rows [k_begin, k_end) of the padded K, so a tile can stay in
// L2 while the GEMM runs over it.
// ------------------------------------------------------------------------------------------------
void dequant_vnni_bf16_impl(const DequantArgs& a, int64_t b0, int64_t b1) {
  const bool nib = a.bits != 8;
  const int64_t pb = nib ? kBlockN : 2 * kBlockN;
  uint16_t* out = static_cast<uint16_t*>(a.out);
  const int64_t kb = a.k_begin, ke = a.k_end < 0 ? a.Kp : a.k_end;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* cbk = a.codes + b * (a.Kp / 2) * pb;
    uint16_t* cols = out + (b - a.b_origin) * kBlockN * 2;
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t k0 = a.group_ptr[g] > kb ? a.group_ptr[g] : kb;
      const int64_t k1 = a.group_ptr[g + 1] < ke ? a.group_ptr[g + 1] : ke;
      if (k1 <= k0) continue;
      Bf16Terms t;
      load_bf16_terms(a, b, g, nib, t);
      for (int64_t p = k0 / 2; p < k1 / 2; ++p) {
        __m512i w[kV];
        dequant_pair_bf16(cbk + p * pb, nib, t, w);
        uint16_t* dst = cols + (p - kb / 2) * a.ldo * 2;
        for (int v = 0; v < kV; ++v) _mm512_storeu_si512(dst + 32 * v, w[v]);
      }
    }
  }
}

#endif  // !GPTQ_CPU_VBMI

}  // namespace

#if defined(GPTQ_CPU_VBMI)
namespace avx512_vbmi {

bool fused_gemm_i8_bf16(const GemmArgs& a, int64_t b0, int64_t b1) {
  if (a.M >= kTiledMinM || a.bits != 8) return false;
  float* total = alloc_totals(a.M);
  if (!total) return false;
  small_m_entry_bf16<I8Bf16>(a, b0, b1, total);
  std::free(total);
  return true;
}

}  // namespace avx512_vbmi
#else
namespace avx512 {

bool fused_gemm(const GemmArgs& a, int64_t b0, int64_t b1, bool bf16_dot) {
  float* total = alloc_totals(a.M);
  if (!total) return false;
  if (bf16_dot && a.M >= kTiledMinM) {
    __m512i* scratch = static_cast<__m512i*>(std::aligned_alloc(64, kChunk * kV * sizeof(__m512i)));
    if (!scratch) {
      std::free(total);
      return false;
    }
    if (a.bits == 8) small_m_bf16_tiled<DecI8>(a, b0, b1, total, scratch);
    else small_m_bf16_tiled<DecI4>(a, b0, b1, total, scratch);
    std::free(scratch);
  } else if (!bf16_dot && a.M >= kTiledMinM) {
    __m512* scratch = static_cast<__m512*>(std::aligned_alloc(64, kChunkF32 * 2 * kV * sizeof(__m512)));
    if (!scratch) {
      std::free(total);
      return false;
    }
    if (a.bits == 8) small_m_f32_tiled<DecF32I8>(a, b0, b1, total, scratch);
    else small_m_f32_tiled<DecF32I4>(a, b0, b1, total, scratch);
    std::free(scratch);
  } else if (a.bits == 8) {
    if (bf16_dot) small_m_entry_bf16<I8Bf16>(a, b0, b1, total);
    else small_m_entry<I8F32>(a, b0, b1, total);
  } else {
    if (bf16_dot) small_m_entry_bf16<I4Bf16>(a, b0, b1, total);
    else small_m_entry<I4F32>(a, b0, b1, total);
  }
  std::free(total);
  return true;
}

bool fused_gemm_w8a8(const GemmArgs& a, int64_t b0, int64_t b1) {
  float* total = alloc_totals(a.M);
  if (!total) return false;
  small_m_w8a8_impl(a, b0, b1, total);
  std::free(total);
  return true;
}

bool dequant(const DequantArgs& a, int64_t b0, int64_t b1) {
  dequant_impl(a, b0, b1);
  return true;
}

bool dequant_t_bf16(const DequantArgs& a, int64_t b0, int64_t b1) {
  dequant_t_bf16_impl(a, b0, b1);
  return true;
}

bool dequant_vnni_bf16(const DequantArgs& a, int64_t b0, int64_t b1) {
  dequant_vnni_bf16_impl(a, b0, b1);
  return true;
}

}  // namespace avx512
#endif  // GPTQ_CPU_VBMI
}  // namespace gptq_cpu

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#if !defined(GPTQ_CPU_VBMI)
namespace gptq_cpu {
bool avx512_compiled() { return true; }
}  // namespace gptq_cpu
#endif

#else  // not x86-64
#if defined(GPTQ_CPU_VBMI)
namespace gptq_cpu::avx512_vbmi {
bool fused_gemm_i8_bf16(const GemmArgs&, int64_t, int64_t) { return false; }
}  // namespace gptq_cpu::avx512_vbmi
#else

namespace gptq_cpu {
namespace avx512 {
bool fused_gemm(const GemmArgs&, int64_t, int64_t, bool) { return false; }
bool fused_gemm_w8a8(const GemmArgs&, int64_t, int64_t) { return false; }
bool dequant(const DequantArgs&, int64_t, int64_t) { return false; }
bool dequant_t_bf16(const DequantArgs&, int64_t, int64_t) { return false; }
bool dequant_vnni_bf16(const DequantArgs&, int64_t, int64_t) { return false; }
}  // namespace avx512
bool avx512_compiled() { return false; }
}  // namespace gptq_cpu
#endif  // GPTQ_CPU_VBMI
#endif
