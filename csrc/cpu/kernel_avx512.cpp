// AVX-512 kernels for the layout of kernel.h (read its header comment first).
//
// Only this translation unit (and kernel_avx512_vbmi.cpp) is compiled for AVX-512 (F/BW/VL/DQ/BF16),
// via isa_begin.inc; config.cpp picks it at run time with __builtin_cpu_supports, so the extension still
// loads and runs on CPUs without it. No torch header and no std:: function template is used in here
// (ODR note in kernel.h). The pieces kernel_avx512_vbmi.cpp compiles too (the shared driver, group
// terms, BF16 decode, the direct BF16 micro-kernel, the output store) are in kernel_avx512.inc; here
// are the other micro-kernels, their policies on the driver, the dequantization writers and the entry
// points.
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
// * Loop order per N-block (driver.inc's register policies): for each group, the group's codes (<= 8 KiB
//   for g = 128) are decoded once per MR-row tile while they sit in L1 (M < kTiledMinM), or once per
//   chunk into an L1 scratch that every row tile reads (M >= kTiledMinM); sums are folded into a
//   per-block [M][64] fp32 total with the scale and zero point; the epilogue adds bias and rounds once
//   to the output dtype.
#include <cstdlib>
#include <cstring>

#include "kernel.h"

#define GPTQ_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma,f16c"
#define GPTQ_ISA_COMPILED avx512_compiled
#include "isa_begin.inc"
#if GPTQ_ISA_X86_64
// AVX512-BF16 and -VNNI are enabled for the whole unit (GCC refuses to inline a BF16-target
// micro-kernel into a driver without it), but their instructions come only from explicit intrinsics
// (vdpbf16ps / vcvtne2ps2bf16 in the BF16 kernels and dequant_t_bf16, vpdpbusd in the W8A8 kernel):
// no __bf16 arithmetic and no integer dot-product loops the compiler could lower to them on its own.
// config.cpp enables those only when the CPU reports avx512bf16 / avx512vnni; an AVX-512 CPU without them
// runs the fp32 kernels.

namespace gptq_cpu {
namespace {

#include "kernel_avx512.inc"

// ------------------------------------------------------------------------------------------------
// Direct micro-kernels for fp32 activations (the BF16 one is DirectBf16 in kernel_avx512.inc).
// ------------------------------------------------------------------------------------------------

// 8-bit codes, fp32 activations. A 16-byte load is 8 columns x (k, k+1); the (x[k], x[k+1]) pair is
// broadcast as one 64-bit value, so each accumulator lane pair (2i, 2i+1) holds column i's even- and
// odd-k partial sums, added together once at the end of the group.
struct I8F32 {
  static constexpr int kMaxMR = 3;  // 8 accumulators per row
  static constexpr float kCodeBias = 0.f;
  static constexpr int kPairBytes = 2 * kBlockN;
  static const float* rows(const GemmArgs& a) { return a.xf; }
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

// Nibble codes, fp32 activations. The same unpack with 0 instead of 0x43 gives exact integer pairs,
// converted with cvtdq2ps. (The +128 BF16 form would save the two conversions, but its cancellation
// costs fp32 results ~5 bits -- relative error up to 4e-5 for 2-bit codes -- which is invisible in
// BF16 but not acceptable for fp32 activations.)
struct I4F32 {
  static constexpr int kMaxMR = 5;
  static constexpr float kCodeBias = 0.f;
  static constexpr int kPairBytes = kBlockN;
  static const float* rows(const GemmArgs& a) { return a.xf; }
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

// ------------------------------------------------------------------------------------------------
// BF16 activations, M >= ~5: decode once, multiply many times.
//
// With the direct kernels a tile of MR <= 6 rows re-decodes the group's codes for every tile: at
// M = 16 that is 3 decodes per weight and the conversions, not the dot products, take half the issue
// slots. Here each chunk of <= kChunk k-pairs of the group is decoded ONCE into an L1-resident scratch
// of BF16 pairs (kChunk * 256 B = 16 KiB), then register tiles of up to 6 rows x 64 columns stream it:
// per 4 x MR dot products 4 64-byte loads from L1 and MR broadcasts of x pairs, no conversion. One
// decode per weight whatever M is.
// ------------------------------------------------------------------------------------------------
constexpr int64_t kChunk = 64;  // k-pairs per decoded chunk

// acc += w . broadcast(*x) with the broadcast folded into the instruction ({1to16} memory operand),
// which GCC does not do for the intrinsic (it emits a vpbroadcastd per row).
ALWAYS_INLINE void dpbusd_bcast(__m512& acc, __m512i w, const int32_t* x) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x));
}

// Rows [m0, m0 + MR) of one chunk: acc[r][v] = sum_p w[p][v] . x[r][p], then folded into the totals. A
// 2-D register tile (6 x 4 = 24 accumulators): per k-pair 4 weight vectors and MR broadcasts feed 4*MR
// dot products. x is pair-major (xp[p * M + r]): one base pointer and constant offsets, no per-row
// address registers.
//
// The first row tile of a chunk (kDecode) decodes each k-pair from the codes itself and, when more
// tiles follow, leaves it in the L1 scratch for them; they only load it. Decoding inside the first tile
// lets the conversions overlap its dot products; as a phase of its own before the tiles it cost ~17%
// of the time at M = 16 (the conversions and the dot products use different ports). The first tile
// also prefetches the NEXT chunk's codes, kPairBytes / 64 cache lines per k-pair (decoding and
// multiplying without it left memory idle: ~45% of the first version's time was stalls), into L2
// (prefetcht1), not L1: the first tile issues a whole chunk of prefetches (8 KiB for int8) in about a
// third of the chunk's time, more misses than L1 keeps in flight, and with T0 they backed up into its
// loads. T1 vs T0, 2 threads, weights from DRAM: int8 M=8 -8..-17%, M=16 -4..-11% time. Two or four
// chunks ahead: no better (-5..+7%). The direct kernels (M <= 4) and the fp32 tiles showed no
// difference either way (+-4%) and keep T0.
// The group's zero-point term (z + cb) * X[r, g] goes with its first chunk only: MR * 4 fnmadds here
// instead of a load-fnmadd-store pass over the block's totals per group.
template <int MR, class D, bool kDecode>
ALWAYS_INLINE void dot_tile(const GemmArgs& a, const RegTile& rt) {
  constexpr int kPfLines = D::kPairBytes / 64;
  // Locals, not a.* / rt.* in the loop: the scratch stores (__m512i may alias anything) would make the
  // compiler reload them every k-pair.
  const int64_t M = a.M, np = rt.np;
  const uint8_t* codes = rt.codes;
  __m512i* w = static_cast<__m512i*>(rt.scratch);
  const bool keep = kDecode && rt.ntiles > 1;
  const char* pf = reinterpret_cast<const char*>(codes + np * D::kPairBytes);
  const uint32_t* xp = a.xp + (rt.ck / 2) * M + rt.m0;
  __m512 acc[MR][kV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < np; ++p) {
    __m512i wv[kV];
    if constexpr (kDecode) {
      for (int l = 0; l < kPfLines; ++l) _mm_prefetch(pf + (p * kPfLines + l) * 64, _MM_HINT_T1);
      D::decode(codes + p * D::kPairBytes, wv);
      if (keep) {
        for (int v = 0; v < kV; ++v) _mm512_store_si512(w + p * kV + v, wv[v]);
      }
    } else {
      for (int v = 0; v < kV; ++v) wv[v] = _mm512_load_si512(w + p * kV + v);
    }
    const uint32_t* xr = xp + p * M;
    for (int r = 0; r < MR; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xr[r]));
      for (int v = 0; v < kV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)wv[v], xb);
    }
  }
  fold_group<MR>(a, rt, D::kCodeBias, rt.first_chunk, acc);
}

template <class D>
struct TiledBf16 : Avx512Policy {
  static constexpr int kPairBytes = D::kPairBytes;
  static constexpr int kMaxMR = 6;
  static constexpr int64_t kChunkPairs = kChunk;
  static constexpr size_t kScratchBytes = kChunk * kV * sizeof(__m512i);
  template <int MR>
  static ALWAYS_INLINE void tile(const GemmArgs& a, const Terms&, const RegTile& rt) {
    if (rt.t == 0) dot_tile<MR, D, true>(a, rt);
    else dot_tile<MR, D, false>(a, rt);
  }
};

// ------------------------------------------------------------------------------------------------
// fp32 activations, M >= kTiledMinM: the same decode-once structure with fp32 weights. Per k-pair the
// scratch holds 8 vectors (rows k and k+1, 4 x 16 columns, exact integers q), decoded in a phase of
// its own (chunk_begin); tiles of <= 6 rows x 64 columns do 2 * 4 * MR FMAs per k-pair from 8 L1 loads
// and 2 * MR broadcasts. x is k-major (xt[k * M + m]). The zero point is applied per group in a pass
// of its own (group_end).
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
ALWAYS_INLINE void fma_tile(const __m512* s, float* total, const __m512* w, int64_t np, const float* xt, int64_t ldt,
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
  fold_rows<MR>(acc, s, nullptr, nullptr, 0, total);
}

template <class D>
struct TiledF32 : Avx512Policy {
  static constexpr int kPairBytes = D::kPairBytes;
  static constexpr int kMaxMR = 6;
  static constexpr int64_t kChunkPairs = kChunkF32;
  static constexpr size_t kScratchBytes = kChunkF32 * 2 * kV * sizeof(__m512);
  struct Terms {
    __m512 s[kV];
  };
  static ALWAYS_INLINE void group_begin(const GemmArgs& a, int64_t b, int64_t g, int64_t, int64_t, const uint8_t*,
                                        Terms& t) {
    __m512 zc[kV];
    load_group_terms(a, b, g, 0.f, t.s, zc);
  }
  static ALWAYS_INLINE void chunk_begin(const GemmArgs&, const Terms&, const RegTile& rt) {
    // Locals: the scratch stores (__m512 may alias anything) would reload rt.* every k-pair.
    const int64_t np = rt.np;
    const uint8_t* codes = rt.codes;
    __m512* w = static_cast<__m512*>(rt.scratch);
    for (int64_t p = 0; p < np; ++p) D::decode(codes + p * kPairBytes, w + p * 2 * kV);
  }
  template <int MR>
  static ALWAYS_INLINE void tile(const GemmArgs& a, const Terms& t, const RegTile& rt) {
    // The first tile prefetches the next chunk's codes.
    const char* pf = rt.t == 0 ? reinterpret_cast<const char*>(rt.codes + rt.np * kPairBytes) : nullptr;
    fma_tile<MR>(t.s, rt.total, static_cast<const __m512*>(rt.scratch), rt.np, a.xt + rt.ck * a.M + rt.m0, a.M, pf,
                 kPairBytes / 64);
  }
  static ALWAYS_INLINE void group_end(const GemmArgs& a, int64_t b, int64_t g, const Terms&, float* total) {
    __m512 s[kV], zc[kV];
    load_group_terms(a, b, g, 0.f, s, zc);
    for (int v = 0; v < kV; ++v) {
      const __m512 szc = _mm512_mul_ps(s[v], zc[v]);
      for (int64_t m = 0; m < a.M; ++m) {
        float* p = total + m * kBlockN + 16 * v;
        _mm512_storeu_ps(p, _mm512_fnmadd_ps(szc, _mm512_set1_ps(a.xsum[m * a.G + g]), _mm512_loadu_ps(p)));
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Opt-in W8A8 (int8 weights x int8 activations, AVX512-VNNI). vpdpbusd multiplies 4 unsigned bytes by
// 4 signed bytes per lane into an int32: 64 MACs per instruction, twice vdpbf16ps. The codes are
// already unsigned bytes; two consecutive k-pair rows ([column][k, k+1] and [column][k+2, k+3]) become
// the per-column k-quads VNNI wants with one word interleave (vpermt2w) per 64 weights. Per group:
//   y += s[g, n] * xscale[m, g] * ( sum_k q[k, n] * xq[m, k]  -  z[g, n] * sum_k xq[m, k] )
// in exact int32 until the group's end (|sum| <= K * 255 * 127 fits easily), then fp32. The only
// approximation is xq = round(x / xscale): off by default, see docs/cpu-kernel.md.
// Tiles of up to 6 rows x 64 columns (24 accumulators), a group per chunk. With the _mm512_dpbusd_epi32
// intrinsic GCC 12 copied every tied accumulator through the stack at this size (194 GFLOP/s per core
// at M = 16, 278 with 4-row tiles); dpbusd_bcast's inline asm keeps them in registers and folds the
// broadcast of x into the instruction: 292-327 GFLOP/s per core at M = 16 (one core, weights in L3,
// CPU time).
// ------------------------------------------------------------------------------------------------
template <int MR>
ALWAYS_INLINE void vnni_tile(const GemmArgs& a, const RegTile& rt, const uint8_t* cp, int64_t nquads, const int32_t* xq,
                             int64_t ldq, const char* pf) {
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
      const __m512i q0 = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + 32 * v)));
      const __m512i q1 = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c1 + 32 * v)));
      w[v] = _mm512_permutex2var_epi16(q0, interleave, q1);  // dword i = q(k..k+3) of column 16v + i
    }
    const int32_t* xr = xq + q * ldq;
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kV; ++v) dpbusd_bcast(acc[r][v], w[v], xr + r);
  }
  __m512 s[kV], z[kV];  // loaded after the loop: no registers taken from the accumulators
  load_group_terms(a, rt.b, rt.g, 0.f, s, z);
  const int64_t G = a.G;
  const float* xsum = a.xsum + rt.m0 * G + rt.g;
  const float* xscale = a.xscale + rt.m0 * G + rt.g;
  for (int r = 0; r < MR; ++r) {
    const __m512 xs = _mm512_set1_ps(xsum[r * G]);
    const __m512 sx = _mm512_set1_ps(xscale[r * G]);
    float* t = rt.total + r * kBlockN;
    for (int v = 0; v < kV; ++v) {
      const __m512 d = _mm512_fnmadd_ps(z[v], xs, _mm512_cvtepi32_ps(_mm512_castps_si512(acc[r][v])));
      _mm512_storeu_ps(t + 16 * v, _mm512_fmadd_ps(_mm512_mul_ps(s[v], sx), d, _mm512_loadu_ps(t + 16 * v)));
    }
  }
}

struct W8A8 : Avx512Policy {
  static constexpr int kPairBytes = 2 * kBlockN;
  static constexpr int kMaxMR = 6;
  static constexpr int64_t kChunkPairs = 0;
  template <int MR>
  static ALWAYS_INLINE void tile(const GemmArgs& a, const Terms&, const RegTile& rt) {
    // The first tile prefetches the next group's codes.
    const char* pf = rt.t == 0 ? reinterpret_cast<const char*>(rt.codes + rt.np * kPairBytes) : nullptr;
    vnni_tile<MR>(a, rt, rt.codes, rt.np / 2, a.xq4 + (rt.ck / 4) * a.M + rt.m0, a.M, pf);
  }
};

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


}  // namespace

namespace avx512 {

bool fused_gemm(const GemmArgs& a, int64_t b0, int64_t b1, bool bf16_dot) {
  const bool i8 = a.bits == 8;
  if (a.M >= kTiledMinM) {
    if (bf16_dot) return i8 ? run_reg_policy<TiledBf16<DecI8>>(a, b0, b1) : run_reg_policy<TiledBf16<DecI4>>(a, b0, b1);
    return i8 ? run_reg_policy<TiledF32<DecF32I8>>(a, b0, b1) : run_reg_policy<TiledF32<DecF32I4>>(a, b0, b1);
  }
  if (bf16_dot) return i8 ? run_reg_policy<Direct<DirectBf16<DecI8>>>(a, b0, b1) : run_reg_policy<Direct<DirectBf16<DecI4>>>(a, b0, b1);
  return i8 ? run_reg_policy<Direct<I8F32>>(a, b0, b1) : run_reg_policy<Direct<I4F32>>(a, b0, b1);
}

bool fused_gemm_w8a8(const GemmArgs& a, int64_t b0, int64_t b1) { return run_reg_policy<W8A8>(a, b0, b1); }

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
}  // namespace gptq_cpu

#else  // not x86-64: stubs, the dispatcher never selects them

namespace gptq_cpu::avx512 {
bool fused_gemm(const GemmArgs&, int64_t, int64_t, bool) { return false; }
bool fused_gemm_w8a8(const GemmArgs&, int64_t, int64_t) { return false; }
bool dequant(const DequantArgs&, int64_t, int64_t) { return false; }
bool dequant_t_bf16(const DequantArgs&, int64_t, int64_t) { return false; }
bool dequant_vnni_bf16(const DequantArgs&, int64_t, int64_t) { return false; }
}  // namespace gptq_cpu::avx512
#endif
#include "isa_end.inc"
