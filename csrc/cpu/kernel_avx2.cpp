// AVX2 + FMA + F16C kernels (Haswell and later, Zen 1-3) for the layout of kernel.h (read its header
// comment first), written with intrinsics on the shared small-M driver (driver.inc). Only this
// translation unit gets the target flags, through isa_begin.inc, so the rest of the extension stays
// at the baseline ISA. Nothing in here includes a torch header (see the ODR note in kernel.h). The
// dequantization for the large-M path is here too (dequant_impl).
//
// WHY IT IS SHAPED THIS WAY
// * 16 ymm registers. A 64-column block row is 8 ymm of fp32, and the 8-bit layout's natural decode
//   (vpmovzxbd of 8 bytes = 4 columns x (k, k+1)) keeps even- and odd-k partial sums in alternate lanes,
//   so one activation row needs 16 accumulators for a whole block. The driver therefore walks a k-chunk
//   (kChunkPairs k-pairs, in L1) in column strips sized so that MR rows x strip fit in registers, with
//   the accumulators in a small per-block buffer between chunks; the strips re-read the chunk from L1,
//   the first row tile prefetches the next chunk (spread over its strips). Every weight is still decoded once per row tile, and for
//   M <= kMaxMR there is one row tile: one decode per weight.
// * Decode cost per 8 weights: 8-bit vpmovzxbd (load + 1 shuffle) + vcvtdq2ps; <=4-bit per 16 weights
//   vpmovzxbd + 2 vpand + 2 vcvtdq2ps. The high nibble is converted in place (16 * q, no shift) and the
//   odd-k activations are pre-divided by 16 once per call (exact: a power of two), saving one shift
//   per 8 weights. Then one FMA per 8 weights per row. Pair partials are added once per group
//   (vhaddps + vpermpd), the scale and zero point are applied once per group from X[m, g] (kernel.h).
// * Exact: codes become exact small integers in fp32, accumulation is fp32, one rounding at the store.
#include <cstdlib>
#include <cstring>

#include "kernel.h"

#define GPTQ_ISA_TARGET "avx2,fma,f16c"
#define GPTQ_ISA_COMPILED avx2_compiled
#define GPTQ_ISA_PORTABLE  // store_out, nib_byte
#include "isa_begin.inc"
#if GPTQ_ISA_X86_64

namespace gptq_cpu {
namespace {
#include "driver.inc"

// ------------------------------------------------------------------------------------------------
// Tunables, with where their numbers come from.
// ------------------------------------------------------------------------------------------------
// k-pairs per chunk: 64 k-pairs of int8 codes are 8 KiB (int4: 4 KiB), plus at most 6 rows x 128 fp32
// activations (3 KiB): well inside the smallest L1d of the AVX2 tier (32 KiB on Haswell..Zen 3), so the
// strips after the first read the chunk from L1. A group of 128 rows is one chunk.
constexpr int64_t kChunk = 64;

ALWAYS_INLINE __m256 u8x8_to_ps(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

ALWAYS_INLINE __m256 bcast_pair(const float* p) {  // (p[0], p[1]) in every lane pair
  double d;
  std::memcpy(&d, p, 8);
  return _mm256_castpd_ps(_mm256_set1_pd(d));
}

// ------------------------------------------------------------------------------------------------
// Per-group terms (natural column order, 8 columns per vector).
// ------------------------------------------------------------------------------------------------
ALWAYS_INLINE __m256 scale8(const GemmArgs& a, int64_t off) {
  if (a.scales_f16)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(a.scales) + off)));
  return _mm256_loadu_ps(static_cast<const float*>(a.scales) + off);
}

// z + cb: cb is the constant the decode adds to every code (kernel.h), exact (z + cb <= 255 + 128).
ALWAYS_INLINE __m256 zero8(const GemmArgs& a, int64_t off, float cb = 0.f) {
  if (!a.zeros) return _mm256_set1_ps(a.sym_zero + cb);
  const __m256 z = u8x8_to_ps(a.zeros + off);
  return cb == 0.f ? z : _mm256_add_ps(z, _mm256_set1_ps(cb));
}

// total[m][8u..8u+8) += s * (y - (z + cb) * X[m, g]) for the natural vector y of row m, column vector u.
template <class Nat>
ALWAYS_INLINE void fold_group(const GemmArgs& a, int64_t b, int64_t g, float* total, Nat&& natural, float cb = 0.f) {
  const int64_t off = (b * a.G + g) * kBlockN;
  for (int u = 0; u < kBlockN / 8; ++u) {
    const __m256 s = scale8(a, off + 8 * u), z = zero8(a, off + 8 * u, cb);
    for (int64_t m = 0; m < a.M; ++m) {
      float* t = total + m * kBlockN + 8 * u;
      const __m256 d = _mm256_fnmadd_ps(z, _mm256_set1_ps(a.xsum[m * a.G + g]), natural(m, u));
      _mm256_storeu_ps(t, _mm256_fmadd_ps(s, d, _mm256_loadu_ps(t)));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Output: fp32 -> out dtype, round to nearest even (NaN stays NaN), only the columns < N.
// ------------------------------------------------------------------------------------------------
ALWAYS_INLINE __m128i ps_to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i rb = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                      _mm256_set1_epi32(0x7fff));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, rb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i pk = _mm256_packus_epi32(r, r);  // [r0..3 r0..3 | r4..7 r4..7] as words
  return _mm_unpacklo_epi64(_mm256_castsi256_si128(pk), _mm256_extracti128_si256(pk, 1));
}

// 8 values to out[idx..idx+8) in the out dtype (one rounding).
ALWAYS_INLINE void store8(void* out, OutType t, int64_t idx, __m256 v) {
  switch (t) {
    case OutType::F32: _mm256_storeu_ps(static_cast<float*>(out) + idx, v); break;
    case OutType::BF16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + idx), ps_to_bf16(v));
      break;
    case OutType::F16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + idx),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
  }
}

void store_block(const GemmArgs& a, int64_t b, const float* total) {
  const int64_t n0 = b * kBlockN;
  for (int64_t m = 0; m < a.M; ++m) {
    for (int u = 0; u < kBlockN / 8; ++u) {
      const int64_t n = n0 + 8 * u;
      if (n >= a.N) break;
      const int64_t left = a.N - n;
      __m256 y = _mm256_loadu_ps(total + m * kBlockN + 8 * u);
      const int64_t idx = m * a.ldo + n;
      if (left >= 8) {
        if (a.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(a.bias + n));
        store8(a.out, a.out_type, idx, y);
      } else {  // the last, partial vector of the last block: through a buffer, never past column N
        alignas(32) float t[8];
        _mm256_store_ps(t, y);
        for (int64_t i = 0; i < left; ++i) {
          const float v = a.bias ? t[i] + a.bias[n + i] : t[i];
          store_out(a.out, a.out_type, idx + i, v);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// What every AVX2 policy shares (driver.inc lists the members); a policy overrides what differs.
// ------------------------------------------------------------------------------------------------
struct PolicyBase {
  static constexpr bool kDecodeOnce = false;
  using XType = float;
  using AccType = float;
  static constexpr int kKPerX = 1;
  static constexpr int kSlotAcc = 8;
  static constexpr int64_t kChunkPairs = kChunk;
  static constexpr int kMaxMR = 6;
  static void store_block(const GemmArgs& a, int64_t b, const float* total) { gptq_cpu::store_block(a, b, total); }
};

// ------------------------------------------------------------------------------------------------
// 8-bit codes, fp32 activations. Slot s = bytes 8s..8s+7 of a k-pair row = columns 4s..4s+3 x (k, k+1);
// accumulator lanes alternate even/odd k (kAccW = 128 partial sums per row).
// ------------------------------------------------------------------------------------------------
struct I8F32 : PolicyBase {
  static constexpr int kPairBytes = 2 * kBlockN;
  static constexpr int kSlots = 16;
  static constexpr int kSrcSlotBytes = 8;
  static constexpr int kAccW = 2 * kBlockN;
  // MR x NS accumulators + MR pair broadcasts + 1 weight vector <= 16 ymm.
  template <int MR>
  static constexpr int strip() { return MR == 1 ? 8 : MR <= 3 ? 4 : 2; }

  template <int MR, int NS>
  static ALWAYS_INLINE void tile(const uint8_t* c, int64_t np, const float* x, int64_t ldx, float* acc, const char* pf) {
    __m256 A[MR][NS];
    for (int r = 0; r < MR; ++r)
      for (int s = 0; s < NS; ++s) A[r][s] = _mm256_loadu_ps(acc + r * kAccW + 8 * s);
    for (int64_t p = 0; p < np; ++p) {
      const uint8_t* cp = c + p * kPairBytes;
      if (pf) _mm_prefetch(pf + 64 * p, _MM_HINT_T0);
      __m256 xb[MR];
      for (int r = 0; r < MR; ++r) xb[r] = bcast_pair(x + r * ldx + 2 * p);
      for (int s = 0; s < NS; ++s) {
        const __m256 w = u8x8_to_ps(cp + 8 * s);
        for (int r = 0; r < MR; ++r) A[r][s] = _mm256_fmadd_ps(w, xb[r], A[r][s]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int s = 0; s < NS; ++s) _mm256_storeu_ps(acc + r * kAccW + 8 * s, A[r][s]);
  }

  static void group_end(const GemmArgs& a, int64_t b, int64_t g, const float* acc, float* total) {
    // natural columns 8u..8u+7 = slots 2u (columns 8u..8u+3) and 2u+1: hadd -> [c0 c1 c4 c5 | c2 c3 c6 c7].
    fold_group(a, b, g, total, [&](int64_t m, int u) {
      const float* p = acc + m * kAccW + 16 * u;
      const __m256 h = _mm256_hadd_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8));
      return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(h), 0xd8));
    });
  }
};

// ------------------------------------------------------------------------------------------------
// <=4-bit codes, fp32 activations. Slot t = bytes 8t..8t+7 of a k-pair row: 8 columns (kernel.h's
// permutation: byte j is column nib_col(j), so lane j of the native accumulator row is the column whose
// byte is j), each byte q(k) | q(k+1) << 4. x is the call's copy with odd k divided by 16, so the high
// nibble needs no shift: (b & 0xf0) = 16 q(k+1).
// ------------------------------------------------------------------------------------------------
struct I4F32 : PolicyBase {
  static constexpr int kPairBytes = kBlockN;
  static constexpr int kSlots = 8;
  static constexpr int kSrcSlotBytes = 8;
  static constexpr int kAccW = kBlockN;
  // One row: 4 slots with separate even-k / odd-k accumulators (8 FMA chains of one FMA per k-pair;
  // with 8 slots and one accumulator each, two dependent FMAs per k-pair made the loop latency-bound).
  template <int MR>
  static constexpr int strip() { return MR <= 2 ? 4 : 2; }

  template <int MR, int NS>
  static ALWAYS_INLINE void tile(const uint8_t* c, int64_t np, const float* x, int64_t ldx, float* acc, const char* pf) {
    constexpr bool kSplit = MR == 1;
    __m256 A[MR][NS], B[kSplit ? NS : 1];
    for (int r = 0; r < MR; ++r)
      for (int s = 0; s < NS; ++s) A[r][s] = _mm256_loadu_ps(acc + r * kAccW + 8 * s);
    if constexpr (kSplit) {
      for (int s = 0; s < NS; ++s) B[s] = _mm256_setzero_ps();
    }
    const __m256i m_lo = _mm256_set1_epi32(0x0f), m_hi = _mm256_set1_epi32(0xf0);
    for (int64_t p = 0; p < np; ++p) {
      const uint8_t* cp = c + p * kPairBytes;
      if (pf) _mm_prefetch(pf + 64 * p, _MM_HINT_T0);
      for (int s = 0; s < NS; ++s) {
        const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp + 8 * s)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(d, m_lo));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_and_si256(d, m_hi));
        if constexpr (kSplit) {
          A[0][s] = _mm256_fmadd_ps(lo, _mm256_broadcast_ss(x + 2 * p), A[0][s]);
          B[s] = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(x + 2 * p + 1), B[s]);
        } else {
          for (int r = 0; r < MR; ++r) {
            A[r][s] = _mm256_fmadd_ps(lo, _mm256_broadcast_ss(x + r * ldx + 2 * p), A[r][s]);
            A[r][s] = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(x + r * ldx + 2 * p + 1), A[r][s]);
          }
        }
      }
    }
    if constexpr (kSplit) {
      for (int s = 0; s < NS; ++s) A[0][s] = _mm256_add_ps(A[0][s], B[s]);
    }
    for (int r = 0; r < MR; ++r)
      for (int s = 0; s < NS; ++s) _mm256_storeu_ps(acc + r * kAccW + 8 * s, A[r][s]);
  }

  static void group_end(const GemmArgs& a, int64_t b, int64_t g, const float* acc, float* total) {
    // natural columns 8u..8u+3 and 8u+4..8u+7 are 4 consecutive lanes each in native order, at lane
    // nib_byte(column) (kernel.h: the low two bits of the byte index are the low two of the column).
    fold_group(a, b, g, total, [&](int64_t m, int u) {
      const float* p = acc + m * kAccW;
      return _mm256_set_m128(_mm_loadu_ps(p + nib_byte(8 * u + 4)), _mm_loadu_ps(p + nib_byte(8 * u)));
    });
  }
};

// ------------------------------------------------------------------------------------------------
// <=4-bit codes, M = 1, bf16 / fp16 activations: no int -> float conversion, and the whole 64-column
// block in one strip. Per k-pair, each 32-byte half of the row is one load; one vpsrlw 4 and two vpand
// 0x0f give the k nibbles (lo) and the k+1 nibbles (hi) of its 32 columns, one per byte; unpacking
// those bytes against 0x43 gives the words 0x43cc, the high half of fp32 128 + c (the AVX-512 BF16
// kernels' byte trick, kernel.h); a vpslld 16 (even bytes) or a vpand 0xffff0000 (odd bytes) makes each
// word a whole fp32. The k vectors are multiplied by a vbroadcastss of x[k], the k+1 vectors by one of
// x[k+1], into the same 8 accumulators (8 columns each). Per 128 weights: 4 loads + 2 broadcasts,
// 2 vpsrlw, 4 vpand, 8 vpunpck, 8 vpslld / vpand, 16 FMA = 46 vector uops; the x rows are read as
// gathered (no per-call table), and 128 X[m, g] is taken off with the zero point once per group.
// Exact as the AVX-512 BF16 path is: bf16 (8 bits) or fp16 (11 bits) x times 128 + c (8 bits) is an
// exact fp32 product, accumulated in fp32. The +128 costs the fp32 sums ~5 bits of cancellation
// (invisible in a bf16/fp16 result, 2^-19 against their 2^-9 / 2^-12 ulp), which is why fp32
// activations take I4Lut (below; the AVX-512 fp32 kernels refuse the +128 for the same reason).
// Why a whole-block strip and the k / k+1 FMAs on one accumulator: a k-pair is then 16 FMAs on 8
// chains (2 dependent FMAs per chain, 8 cycles of latency against ~15 cycles of port throughput), the
// chunk is read once (no L1 re-read by a second strip), the x broadcasts and loop overhead are shared
// by 128 weights. The k nibbles of both halves go first, under one x broadcast, then the k+1 nibbles
// (the halves reloaded from L1): 8 accumulators + 1 x + 3 constants leave 4 registers for temporaries
// and GCC spills nothing (both x broadcasts live at once, it spilled one accumulator per k-pair:
// 1.00-1.09x slower, llvm-mca 17.1 against 15.9 cycles on Skylake).
// Measured (Intel Xeon, Sapphire Rapids class, KVM, forced to AVX2; 2026-12-01; one thread, CPU time,
// M = 1 bf16 x, medians of 11-21 interleaved rounds in one process, host load 5-7 on 2 vCPUs) against
// session 5's form (16-byte piece broadcast to both lanes + vpsrlvd, 32-column strips, per-call
// (x[k] x 4 | x[k+1] x 4) table): in cache (K = 2048, N = 1024) 1.10-1.12x (3 runs); from DRAM (3x L3
// rotation) gate_up 1.27x, down 1.31x. Dropped (same runs): 32-column strips of this decode with
// separate k / k+1 accumulators (0.98-1.03x: the re-read and the doubled per-k-pair overhead cancel the
// vpsrlvd saving); x as a per-call table of 8-float splats read as FMA memory operands (frees the 2 broadcast
// registers, no spill, but 0.98-1.06x: 16 extra loads per k-pair). kChunkPairs 32 / 64 / 128 (the
// prefetch runs 2 / 4 / 8 KiB ahead; with 128-row groups 64 and 128 chunk alike): within noise in
// cache, 128 best from DRAM (1.27x / 1.31x against 1.19x / 1.29x for 64).
// llvm-mca 14, cycles per 128 weights (this / session 5's form): haswell 16.0 / 22.9, skylake 15.9 /
// 18.3, icelake-server 15.7 / 19.8, znver2 14.1 / 16.9, znver3 18.1 / 20.8 (docs/notes/issue-11-avx2.md,
// session 6).
// ------------------------------------------------------------------------------------------------
// The loop I4Bias128 and I4Lut share; Words makes the 16-bit words (the high halves of fp32 c + kCb) of a
// vector of nibble bytes: against the byte 0x43 here, by two table lookups in I4Lut.
template <class Words>
struct I4Words : PolicyBase {
  static constexpr float kCb = Words::kCb;
  static constexpr int kPairBytes = kBlockN;
  static constexpr int kSlots = 8;  // 8 columns per slot, one strip of all 8
  static constexpr int kSrcSlotBytes = 8;
  static constexpr int kAccW = kBlockN;
  static constexpr int kMaxMR = 1;
  // Up to 128 k-pairs per chunk (a group of 128 rows is one chunk of 64): nothing re-reads a chunk here,
  // and run() prefetches kChunkPairs * 64 bytes = 8 KiB ahead.
  static constexpr int64_t kChunkPairs = 2 * kChunk;
  template <int MR>
  static constexpr int strip() { return kSlots; }

  template <int MR, int NS>
  static ALWAYS_INLINE void tile(const uint8_t* c, int64_t np, const float* x, int64_t, float* acc, const char* pf) {
    static_assert(MR == 1 && NS == kSlots, "one row, the whole block");
    __m256 A[NS];
    for (int s = 0; s < NS; ++s) A[s] = _mm256_loadu_ps(acc + 8 * s);
    const __m256i m_lo = _mm256_set1_epi8(0x0f);
    const __m256i m_hw = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    const Words words;
    for (int64_t p = 0; p < np; ++p) {
      const uint8_t* cp = c + p * kPairBytes;
      if (pf) _mm_prefetch(pf + 64 * p, _MM_HINT_T0);
      // k first, then k + 1, each over both 32-byte halves (columns of bytes 32h .. 32h + 31): one x
      // broadcast live at a time, the halves reloaded from L1 for k + 1 (see above: no spill).
      for (int e = 0; e < 2; ++e) {
        const __m256 xe = _mm256_broadcast_ss(x + 2 * p + e);
        for (int h = 0; h < 2; ++h) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp + 32 * h));
          const __m256i nb = e ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), m_lo) : _mm256_and_si256(raw, m_lo);
          __m256i w0, w1;
          words(nb, w0, w1);
          // slot 4h: even bytes 0..6 of each lane, 4h+1: odd bytes 1..7, 4h+2 / 4h+3: bytes 8..15
          const __m256i d[4] = {_mm256_slli_epi32(w0, 16), _mm256_and_si256(w0, m_hw), _mm256_slli_epi32(w1, 16),
                                _mm256_and_si256(w1, m_hw)};
          for (int j = 0; j < 4; ++j) A[4 * h + j] = _mm256_fmadd_ps(_mm256_castsi256_ps(d[j]), xe, A[4 * h + j]);
        }
      }
    }
    for (int s = 0; s < NS; ++s) _mm256_storeu_ps(acc + 8 * s, A[s]);
  }

  // Columns of bytes j0..j0+3 (j0 % 4 == 0): byte j of half P = j / 32 sits in lane (j % 32) / 16 of
  // slot 4P + 2 (b / 8) + b % 2 (b = j % 16), at element (b % 8) / 2 of that lane.
  static ALWAYS_INLINE __m128 quad(const float* accm, int j0) {
    const int b = j0 % 16;
    const float* e = accm + 8 * (4 * (j0 / 32) + 2 * (b / 8)) + 4 * ((j0 % 32) / 16);
    const __m128 ev = _mm_loadu_ps(e), od = _mm_loadu_ps(e + 8);
    return b % 8 == 0 ? _mm_unpacklo_ps(ev, od) : _mm_unpackhi_ps(ev, od);
  }

  static void group_end(const GemmArgs& a, int64_t b, int64_t g, const float* acc, float* total) {
    fold_group(
        a, b, g, total,
        [&](int64_t m, int u) {
          const float* p = acc + m * kAccW;
          return _mm256_set_m128(quad(p, nib_byte(8 * u + 4)), quad(p, nib_byte(8 * u)));
        },
        kCb);
  }
};

// Unpacking the nibble bytes against 0x43 gives the words 0x43cc: the bf16 of 128 + c.
struct Bias128Words {
  static constexpr float kCb = 128.f;
  const __m256i c43;
  // Explicit constructors: an implicit one would not get this unit's target pragma (AVX2 intrinsics).
  ALWAYS_INLINE Bias128Words() : c43(_mm256_set1_epi8(0x43)) {}
  ALWAYS_INLINE void operator()(__m256i nb, __m256i& w0, __m256i& w1) const {
    w0 = _mm256_unpacklo_epi8(nb, c43);
    w1 = _mm256_unpackhi_epi8(nb, c43);
  }
};
using I4Bias128 = I4Words<Bias128Words>;

// ------------------------------------------------------------------------------------------------
// <=4-bit codes, M = 1, exact table decode (no +128): I4Bias128's loop with the 0x43 constant byte
// replaced by two vpshufb lookups of the nibble bytes. Every v = c + kCb for c in 0..15 and
// kCb in [-8, 8] is an integer of at most 5 significant bits, so float(v) is exactly a bf16 number:
// its fp32 bits are (word << 16) with a word that is a function of c alone. Table L holds the words'
// low bytes, table H their high bytes; vpunpck{l,h}bw(L[nb], H[nb]) are the same words in the same
// lanes as I4Bias128's vpunpck(nb, 0x43), and the same vpslld 16 / vpand 0xffff0000 make each a whole
// fp32. No vcvtdq2ps, and the weights reach the FMA as exact fp32 v: an FMA of fp32 x by v into fp32
// sums, as I4F32's, with one rounding per FMA and no large constant for the group epilogue to cancel.
// kCb = -2^(bits-1): v is the code centred on the symmetric zero point, so the sums are of x * (q - z)
// for symmetric checkpoints (the zero term (z + kCb) X[m, g] is exactly 0) and |v| <= 8 otherwise,
// i.e. SMALLER terms than I4F32's x * q (rms 4.6 against 8.8 for uniform 4-bit codes): no cancellation
// where I4F32 loses ~1 bit to z X and I4Bias128 ~5. Relative error against float64 (M = 1, fp32 x,
// K = 6144, N = 512, group 128, mean of 8 x; int4 / int3 / int2 sym): this 2.4 / 2.3 / 2.1e-7, I4F32
// 3.6 / 3.3 / 2.7e-7, I4Bias128 6.8e-6 / 1.3e-5 / 2.4e-5 (asym alike).
// Cost per 128 weights: I4Bias128's 46 vector uops + 8 vpshufb = 54 (16 of them shuffles, against
// I4F32's 56 with 16 vcvtdq2ps on the FMA ports, in two 32-column strips); GCC keeps the 8 accumulators
// and both tables in registers (the 0x0f mask becomes a memory operand).
// Measured (Intel Xeon, Sapphire Rapids class, KVM, forced to AVX2; 2026-12-01 20:31-20:40 UTC; one
// thread, CPU time, M = 1, int4 group 128, medians of 11-21 interleaved rounds in one process, host
// load 2-4.8 on 2 vCPUs), time of the other / time of this:
// * fp32 x, against I4F32: in cache (K = 2048, N = 1024) 1.09-1.13x (5 runs; a sixth 0.74x, I4F32
//   unusually fast in that process); from DRAM (3x L3 of rotated copies, 3 runs) gate_up 2048 x 12288
//   1.12-1.21x, down 6144 x 2048 1.16-1.20x. benchmarks.dequant (Qwen3-1.7B shapes, medians of 3
//   alternated runs per shape): one thread 1.59-1.91x the floor against 2.12-2.25x before, two threads
//   (quiet host) 1.57-1.81x against 1.65-1.91x. Kept for fp32 activations.
// * bf16 x, against I4Bias128: 0.86x in cache, 0.87x / 0.91x from DRAM: the +128 trick's one fewer
//   shuffle per 32 weights wins where its cancellation is invisible (bf16 / fp16 results), so
//   I4Bias128 stays there (x reaches both as fp32, so fp16 x runs the same loop as bf16).
// * Dropped: one table (v = c + 8: every v in 8..23 has the high byte 0x41, so H is the constant and
//   one vpshufb per 32 weights goes): 1.16x / 1.24x / 1.24x against I4F32 (3-7% faster than the two
//   tables), but its +8 costs 2.3x (int4) to 8x (int2) I4F32's error (8.1e-7 / 1.1e-6 / 1.7e-6 above).
constexpr uint32_t f32_bits_of_int(int v) {  // v an integer with |v| < 2^24
  if (v == 0) return 0;
  const uint32_t s = v < 0 ? 0x80000000u : 0u;
  const uint32_t m = static_cast<uint32_t>(v < 0 ? -v : v);
  const int e = 31 - __builtin_clz(m);
  return s | (static_cast<uint32_t>(127 + e) << 23) | ((m << (23 - e)) & 0x7fffffu);
}

struct LutBytes {
  alignas(16) uint8_t lo[16], hi[16];
  bool exact = true;
};

constexpr LutBytes lut_bytes(int cb) {
  LutBytes t{};
  for (int c = 0; c < 16; ++c) {
    const uint32_t b = f32_bits_of_int(c + cb);
    t.exact = t.exact && (b & 0xffffu) == 0;
    t.lo[c] = static_cast<uint8_t>(b >> 16);
    t.hi[c] = static_cast<uint8_t>(b >> 24);
  }
  return t;
}

template <int kCbInt>
struct LutWords {
  static constexpr float kCb = static_cast<float>(kCbInt);
  static constexpr LutBytes kTab = lut_bytes(kCbInt);
  static_assert(kTab.exact, "every v = c + cb must be a bf16 number");
  const __m256i lo, hi;
  ALWAYS_INLINE LutWords()
      : lo(_mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kTab.lo)))),
        hi(_mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kTab.hi)))) {}
  ALWAYS_INLINE void operator()(__m256i nb, __m256i& w0, __m256i& w1) const {
    const __m256i lb = _mm256_shuffle_epi8(lo, nb), hb = _mm256_shuffle_epi8(hi, nb);
    w0 = _mm256_unpacklo_epi8(lb, hb);
    w1 = _mm256_unpackhi_epi8(lb, hb);
  }
};
template <int kCbInt>
using I4Lut = I4Words<LutWords<kCbInt>>;

// The block layout of the <=4-bit kernels that work on whole 32-byte halves of a k-pair row (one
// slot = 32 columns, 32 accumulator lanes per slot): I4LutRows and I4W4A8.
struct KPairHalves : PolicyBase {
  static constexpr int kPairBytes = kBlockN;
  static constexpr int kSlots = 2;
  static constexpr int kSrcSlotBytes = 32;
  static constexpr int kSlotAcc = 32;
  static constexpr int kAccW = kBlockN;
  static constexpr int64_t kChunkPairs = 2 * kChunk;
};

// ------------------------------------------------------------------------------------------------
// <=4-bit codes, M = 4 and 6 (one row tile): I4Lut's exact table decode, done once per row tile and
// fed to every row's FMAs (the same words, lanes, accumulator layout and group epilogue as I4Lut, so the
// same results contract: exact fp32 v = c + kCb, fp32 sums, scale once per group; the error against
// float64 halves against I4F32's, 2.07-2.37e-7 against 3.9-4.8e-7). A strip is one 32-byte half
// of a k-pair row (I4Lut's slots 4h .. 4h + 3); 4 MR accumulators do not fit in 16 ymm beside the two
// tables, so the half is done in two passes over the chunk, slots (4h, 4h + 1) from the unpacklo words,
// then (4h + 2, 4h + 3) from the unpackhi ones, 2 MR accumulators each, each pass repeating the load,
// the nibble split and the lookups: per 32 weights 13 decode uops (I4F32: 10, 4 of them vcvtdq2ps on
// the FMA ports) + 4 MR FMAs. What it buys is port balance, not fewer uops: at 4-6 rows the FMAs fill
// p0/p1 on Intel, where I4F32's conversions also run, while the lookups and unpacks go to p5.
// Measured (Intel Xeon, Sapphire Rapids class, KVM, forced to AVX2; 2026-12-02 00:00-00:10 UTC; one
// thread, CPU time, int4 sym group 128, fp32 x, medians of 5-9 interleaved rounds in one process, host
// load 2-5 on 2 vCPUs), time of I4F32 / time of this: in cache (K = 2048, N = 1024) M = 4 1.06 / 1.06 /
// 1.15, M = 6 1.07 / 1.05 / 1.11 (3 runs); from DRAM (3x L3 of rotated copies) gate_up 2048 x 12288
// M = 4 1.19 / 1.02, M = 6 1.05; down 6144 x 2048 M = 4 1.01 / 1.01, M = 6 1.04. Not kept for M = 2, 3, 5
// (same runs): M = 2 with the whole half in one pass (8 accumulators, 19 decode uops per 64 weights)
// 1.00 / 1.05 / 1.02 in cache but 0.88-1.00 (gate_up) and 0.90-0.99 (down) from DRAM; M = 3 0.96-0.99
// in cache, 0.97-1.01 from DRAM; M = 5 1.00-1.02 / 0.99-1.02. Dropped: the table decode into the
// decode-once scratch with TiledF32's tiles (weights as FMA memory operands), 0.72-0.93x at M = 2..8.
template <int kCbInt>
struct I4LutRows : KPairHalves {
  static constexpr float kCb = static_cast<float>(kCbInt);
  static constexpr int kMaxMR = 6;
  template <int MR>
  static constexpr int strip() { return 1; }

  // Slots j0, j0 + 1 of the half at c: the unpacklo (j0 = 0) or unpackhi (j0 = 2) words.
  template <int MR, int j0>
  static ALWAYS_INLINE void pass(const uint8_t* c, int64_t np, const float* x, int64_t ldx, float* acc, const char* pf) {
    __m256 A[MR][2];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 2; ++j) A[r][j] = _mm256_loadu_ps(acc + r * kAccW + 8 * (j0 + j));
    const __m256i m_lo = _mm256_set1_epi8(0x0f);
    const __m256i m_hw = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    const LutWords<kCbInt> words;
    for (int64_t p = 0; p < np; ++p) {
      const uint8_t* cp = c + p * kPairBytes;
      if (pf) _mm_prefetch(pf + 64 * p, _MM_HINT_T0);
      for (int e = 0; e < 2; ++e) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp));
        const __m256i nb = e ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), m_lo) : _mm256_and_si256(raw, m_lo);
        __m256i w0, w1;
        words(nb, w0, w1);
        const __m256i w = j0 == 0 ? w0 : w1;
        const __m256 d0 = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        const __m256 d1 = _mm256_castsi256_ps(_mm256_and_si256(w, m_hw));
        for (int r = 0; r < MR; ++r) {
          const __m256 xe = _mm256_broadcast_ss(x + r * ldx + 2 * p + e);
          A[r][0] = _mm256_fmadd_ps(d0, xe, A[r][0]);
          A[r][1] = _mm256_fmadd_ps(d1, xe, A[r][1]);
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 2; ++j) _mm256_storeu_ps(acc + r * kAccW + 8 * (j0 + j), A[r][j]);
  }

  template <int MR, int NS>
  static ALWAYS_INLINE void tile(const uint8_t* c, int64_t np, const float* x, int64_t ldx, float* acc, const char* pf) {
    static_assert(NS == 1, "one half per strip");
    pass<MR, 0>(c, np, x, ldx, acc, pf);
    pass<MR, 2>(c, np, x, ldx, acc, nullptr);  // the first pass prefetched the chunk's lines
  }

  static void group_end(const GemmArgs& a, int64_t b, int64_t g, const float* acc, float* total) {
    I4Lut<kCbInt>::group_end(a, b, g, acc, total);
  }
};

// ------------------------------------------------------------------------------------------------
// M >= kTiledMinM: decode once, multiply many times. With the direct tiles above every row tile
// re-decodes the chunk (M = 16: three decodes per weight, and the conversions take p0/p1 slots the FMAs
// need); here the chunk is decoded once into an L1 scratch of exact fp32 integers (kChunkT k-pairs x
// 128 floats = 16 KiB), in the direct kernels' slot order (nibbles from kPairMinM4 rows: the 8-bit
// one, below), and tiles of up to 6 rows x 2 slots run over it: per k-pair and tile 2 loads + MR
// broadcasts per 2 MR FMAs (nibbles in their own order: 2 MR broadcasts and 4 MR loads per 4 MR FMAs).
// ------------------------------------------------------------------------------------------------
constexpr int64_t kChunkT = 32;
// From which M the decode-once tiles beat the direct ones (in-process A/B, one thread, weights in cache,
// CPU time, K = 2048, N = 1024, fp32 x, Intel Xeon (Sapphire Rapids class, KVM) forced to AVX2,
// 2026-12-01; direct/tiled time): int8 M=8 0.92, 10 0.94, 12 1.16, 14 0.99, 16 1.09, 32 1.20;
// int4 M=5 0.94, 6 0.99, 7 1.08, 8 1.08-1.21, 16 1.20, 32 1.28.
constexpr int64_t kTiledMinM8 = 12;
constexpr int64_t kTiledMinM4 = 7;

// kPair (nibbles): decode to the 8-bit layout's slots, 4 columns x (k, k+1) per vector, 16 per k-pair,
// so the nibble tile is the 8-bit one: per k-pair NS weight loads + MR pair broadcasts for MR x NS
// FMAs (6 x 2: 8 loads per 12 FMAs). Without it the nibble scratch holds separate k / k+1 vectors and
// a row costs 2 broadcasts + 2 NS memory-operand FMAs: 1.5 loads per FMA, all of Golden Cove's 3
// load ports and more than Haswell .. Zen 3 have (2). llvm-mca 14 on the two 6-row loops as built,
// cycles per 192 MACs: without 12.0 (skylake, sapphirerapids), 14.8 (haswell), 13.8 (znver2); with
// 12.0 on all four. Measured here (Sapphire Rapids class, forced to AVX2; in cache, one thread, CPU
// time, int4 K = 2048 N = 1024, 2026-12-01): M = 16 0.96-1.03x, M = 32 1.00x (load ports to spare on
// this core, as predicted), M = 8 0.82-0.89x (the extra shuffles in the decode and the hadds in the
// group epilogue, amortised over too few rows): so from M = kPairMinM4 only.
constexpr int64_t kPairMinM4 = 16;

template <class Direct, bool kPair = false>
struct TiledF32 : PolicyBase {
  static constexpr bool kDecodeOnce = true;
  static constexpr bool kNib = Direct::kPairBytes == kBlockN;
  static constexpr bool kSep = kNib && !kPair;  // nibbles, k and k+1 in separate vectors
  static constexpr int kPairBytes = Direct::kPairBytes;
  static constexpr int kSlots = kSep ? Direct::kSlots : 16;
  static constexpr int kAccW = kSep ? Direct::kAccW : 2 * kBlockN;
  static constexpr int kSrcSlotBytes = kSep ? 64 : 32;
  static constexpr int kSrcPairBytes = 512;
  static constexpr int64_t kChunkPairs = kChunkT;
  template <int MR>
  static constexpr int strip() { return MR == 1 ? 8 : MR <= 3 ? 4 : 2; }

  static ALWAYS_INLINE void decode_chunk(const uint8_t* c, int64_t np, void* scratch, const char* pf) {
    float* w = static_cast<float*>(scratch);
    const __m256i m_lo = _mm256_set1_epi32(0x0f), m_hi = _mm256_set1_epi32(0xf0);
    for (int64_t p = 0; p < np; ++p) {
      const uint8_t* cp = c + p * kPairBytes;
      float* wp = w + p * (kSrcPairBytes / 4);
      if (pf) {
        for (int l = 0; l < kPairBytes / 64; ++l) _mm_prefetch(pf + p * kPairBytes + 64 * l, _MM_HINT_T0);
      }
      if constexpr (kNib) {
        for (int t = 0; t < 8; ++t) {
          const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp + 8 * t)));
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(d, m_lo));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_and_si256(d, m_hi));
          if constexpr (kPair) {
            // bytes 8t..8t+7 -> slots 2t = (b0 b1 | b4 b5), 2t+1 = (b2 b3 | b6 b7), each byte as its
            // (q(k), 16 q(k+1)) lane pair; the hadd of the two slots is bytes 8t..8t+7 in order.
            _mm256_store_ps(wp + 16 * t, _mm256_unpacklo_ps(lo, hi));
            _mm256_store_ps(wp + 16 * t + 8, _mm256_unpackhi_ps(lo, hi));
          } else {
            _mm256_store_ps(wp + 16 * t, lo);
            _mm256_store_ps(wp + 16 * t + 8, hi);
          }
        }
      } else {
        for (int s = 0; s < 16; ++s) _mm256_store_ps(wp + 8 * s, u8x8_to_ps(cp + 8 * s));
      }
    }
  }

  template <int MR, int NS>
  static ALWAYS_INLINE void tile(const uint8_t* src, int64_t np, const float* x, int64_t ldx, float* acc, const char*) {
    const float* w = reinterpret_cast<const float*>(src);
    __m256 A[MR][NS];
    for (int r = 0; r < MR; ++r)
      for (int s = 0; s < NS; ++s) A[r][s] = _mm256_loadu_ps(acc + r * kAccW + 8 * s);
    for (int64_t p = 0; p < np; ++p) {
      const float* wp = w + p * (kSrcPairBytes / 4);
      if constexpr (kSep) {
        for (int r = 0; r < MR; ++r) {
          const __m256 x0 = _mm256_broadcast_ss(x + r * ldx + 2 * p), x1 = _mm256_broadcast_ss(x + r * ldx + 2 * p + 1);
          for (int s = 0; s < NS; ++s) {
            A[r][s] = _mm256_fmadd_ps(_mm256_load_ps(wp + 16 * s), x0, A[r][s]);
            A[r][s] = _mm256_fmadd_ps(_mm256_load_ps(wp + 16 * s + 8), x1, A[r][s]);
          }
        }
      } else {
        __m256 wv[NS];
        for (int s = 0; s < NS; ++s) wv[s] = _mm256_load_ps(wp + 8 * s);
        for (int r = 0; r < MR; ++r) {
          const __m256 xb = bcast_pair(x + r * ldx + 2 * p);
          for (int s = 0; s < NS; ++s) A[r][s] = _mm256_fmadd_ps(wv[s], xb, A[r][s]);
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int s = 0; s < NS; ++s) _mm256_storeu_ps(acc + r * kAccW + 8 * s, A[r][s]);
  }

  static void group_end(const GemmArgs& a, int64_t b, int64_t g, const float* acc, float* total) {
    if constexpr (kNib && kPair) {
      // Columns 8u..8u+3 / 8u+4..8u+7 are bytes nib_byte(8u) .. +3 / nib_byte(8u + 4) .. +3 (I4F32):
      // 128-bit half (j % 8) / 4 of the hadd of byte group j / 8's two slots.
      fold_group(a, b, g, total, [&](int64_t m, int u) {
        const float* p = acc + m * kAccW;
        auto half = [&](int j) {
          const float* q = p + 16 * (j / 8);
          const __m256 h = _mm256_hadd_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(q + 8));
          return (j % 8) ? _mm256_extractf128_ps(h, 1) : _mm256_castps256_ps128(h);
        };
        return _mm256_set_m128(half(nib_byte(8 * u + 4)), half(nib_byte(8 * u)));
      });
    } else {
      Direct::group_end(a, b, g, acc, total);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Opt-in W8A8 (8-bit weights x int8 activations; the same x quantization as the AVX-512 VNNI kernel,
// the xq / xscale of GemmArgs::xq4, and the same exact int32 sums, so the two give identical results).
// vpmaddwd multiplies 16-bit pairs into int32 with no saturation: the codes zero-extended to words
// (vpmovzxbw of 16 bytes = 8 columns x (k, k+1), natural column order) times the (x[k], x[k+1]) int16
// pair broadcast: 16 MACs per instruction against 8 for an fp32 FMA. (vpmaddubsw, llama.cpp's Q8_0
// dot, would saturate: its int16 pair sums reach 2 * 255 * 127 with unsigned 8-bit codes, and the sign
// trick llama.cpp uses needs weights in [-127, 127].) x arrives as those int16 pairs, [M][Kp/2]
// (GemmArgs::xq16p, gathered once per call by gather.cpp).
// ------------------------------------------------------------------------------------------------
struct I8W8A8 : PolicyBase {
  using XType = uint32_t;
  using AccType = int32_t;
  static constexpr int kKPerX = 2;
  static constexpr int kPairBytes = 2 * kBlockN;
  static constexpr int kSlots = 8;
  static constexpr int kSrcSlotBytes = 16;
  static constexpr int kAccW = kBlockN;
  template <int MR>
  static constexpr int strip() { return MR == 1 ? 8 : MR <= 3 ? 4 : 2; }

  template <int MR, int NS>
  static ALWAYS_INLINE void tile(const uint8_t* c, int64_t np, const uint32_t* x, int64_t ldx, int32_t* acc,
                                 const char* pf) {
    __m256i A[MR][NS];
    for (int r = 0; r < MR; ++r)
      for (int s = 0; s < NS; ++s) A[r][s] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + r * kAccW + 8 * s));
    for (int64_t p = 0; p < np; ++p) {
      const uint8_t* cp = c + p * kPairBytes;
      if (pf) _mm_prefetch(pf + 64 * p, _MM_HINT_T0);
      for (int s = 0; s < NS; ++s) {
        const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + 16 * s)));
        for (int r = 0; r < MR; ++r) {
          const __m256i xb = _mm256_set1_epi32(static_cast<int>(x[r * ldx + p]));
          A[r][s] = _mm256_add_epi32(A[r][s], _mm256_madd_epi16(w, xb));
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int s = 0; s < NS; ++s) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kAccW + 8 * s), A[r][s]);
  }

  static void group_end(const GemmArgs& a, int64_t b, int64_t g, const int32_t* acc, float* total) {
    // y += s * xscale * (sum q xq - z sum xq), the sums exact integers (as vnni_tile in kernel_avx512.cpp).
    const int64_t off = (b * a.G + g) * kBlockN;
    for (int u = 0; u < kBlockN / 8; ++u) {
      const __m256 s = scale8(a, off + 8 * u), z = zero8(a, off + 8 * u);
      for (int64_t m = 0; m < a.M; ++m) {
        float* t = total + m * kBlockN + 8 * u;
        const __m256 q = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + m * kAccW + 8 * u)));
        const __m256 d = _mm256_fnmadd_ps(z, _mm256_set1_ps(a.xsum[m * a.G + g]), q);
        const __m256 sx = _mm256_mul_ps(s, _mm256_set1_ps(a.xscale[m * a.G + g]));
        _mm256_storeu_ps(t, _mm256_fmadd_ps(sx, d, _mm256_loadu_ps(t)));
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Opt-in W4A8 (<=4-bit codes x int8 activations, every fused M; the same x quantization as W8A8:
// GemmArgs::xq8p / xscale / xsum). vpmaddubsw multiplies unsigned bytes by signed bytes and adds
// adjacent pairs into int16 with saturation, which nibble codes never reach: |q(k) xq(k) + q(k+1)
// xq(k+1)| <= 2 * 15 * 127 = 3810, so 8 k-pairs are even summed in int16 (8 * 3810 = 30480 < 2^15)
// before one widening to int32. The pair a vpmaddubsw wants is (q(k), q(k+1)) of ONE column in adjacent
// bytes: per 32-byte half of a k-pair row, one load, vpsrlw 4 + two vpand 0x0f (k / k+1 nibbles, a
// column per byte, kernel.h's byte order), vpunpcklbw / vpunpckhbw of the two (bytes 0..7 / 8..15 of
// each 128-bit lane as (q(k), q(k+1)) words), then per row one vpmaddubsw against the broadcast word
// (xq[k], xq[k+1]) and one vpaddw each. Per 128 weights and row 1: 2 loads, 1 broadcast, 2 vpsrlw,
// 4 vpand, 4 vpunpck, 4 vpmaddubsw, 4 vpaddw = 21 uops (I4Bias128: 46), plus every 8 k-pairs the
// widening (vpmovsxwd of the 128-bit halves) into the int32 accumulators, which stay in kernel.h's
// byte order (lane j = byte j) so that group_end is I4F32's permutation. All sums are exact integers;
// the group fold is I8W8A8's: y += s * xscale * (sum q xq - z sum xq). 2/3-bit codes use the same path.
// llvm-mca 14, M = 1 loop with the widening, cycles per 128 weights (I4Bias128's): haswell 10.4 (16.0),
// skylake 7.8 (15.9), znver2 7.8 (14.1), znver3 6.5 (18.1); Haswell is port-0 bound (vpmaddubsw, vpsrlw).
// Measured (Sapphire Rapids class, forced to AVX2, 2026-12-01, one thread, CPU time, interleaved A/B,
// exact / this): M = 1 from DRAM 1.26-1.30x (bf16 x), 1.73-1.79x (fp32 x, against I4F32: the exact fp32
// M = 1 kernel is now I4Lut, ~1.2x faster, so ~1.4x against it); in cache M = 1..192 1.11-1.88x, so it
// runs at every fused M. Row tiles of 6 rows: no gain at M = 16, 5-row tiles spill.
// ------------------------------------------------------------------------------------------------
struct I4W4A8 : KPairHalves {
  using XType = uint16_t;  // (xq[k], xq[k+1]) as the low / high byte
  using AccType = int32_t;
  static constexpr int kKPerX = 2;
  static constexpr int kMaxMR = 4;
  static constexpr int kInt16Pairs = 8;  // k-pairs summed in int16 before widening (see above)
  // One row: the whole block (4 int16 sums); more rows: one half per strip (2 MR int16 sums + MR x words).
  template <int MR>
  static constexpr int strip() { return MR == 1 ? 2 : 1; }

  static ALWAYS_INLINE void widen_add(int32_t* ap, __m128i w16, int at) {
    __m256i* p = reinterpret_cast<__m256i*>(ap + at);
    _mm256_storeu_si256(p, _mm256_add_epi32(_mm256_loadu_si256(p), _mm256_cvtepi16_epi32(w16)));
  }

  template <int MR, int NS>
  static ALWAYS_INLINE void tile(const uint8_t* c, int64_t np, const uint16_t* x, int64_t ldx, int32_t* acc,
                                 const char* pf) {
    const __m256i m_lo = _mm256_set1_epi8(0x0f);
    for (int64_t p0 = 0; p0 < np; p0 += kInt16Pairs) {
      const int64_t p1 = min64(np, p0 + kInt16Pairs);
      __m256i S[MR][NS][2];
      for (int r = 0; r < MR; ++r)
        for (int s = 0; s < NS; ++s) S[r][s][0] = S[r][s][1] = _mm256_setzero_si256();
      for (int64_t p = p0; p < p1; ++p) {
        const uint8_t* cp = c + p * kPairBytes;
        if (pf) _mm_prefetch(pf + 64 * p, _MM_HINT_T0);
        for (int s = 0; s < NS; ++s) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp + 32 * s));
          const __m256i lo = _mm256_and_si256(raw, m_lo), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m_lo);
          const __m256i u0 = _mm256_unpacklo_epi8(lo, hi), u1 = _mm256_unpackhi_epi8(lo, hi);
          for (int r = 0; r < MR; ++r) {
            const __m256i xb = _mm256_set1_epi16(static_cast<short>(x[r * ldx + p]));
            S[r][s][0] = _mm256_add_epi16(S[r][s][0], _mm256_maddubs_epi16(u0, xb));
            S[r][s][1] = _mm256_add_epi16(S[r][s][1], _mm256_maddubs_epi16(u1, xb));
          }
        }
      }
      // Word i of lane L of the unpacklo sum is byte 16 L + i of the half, of the unpackhi sum byte
      // 16 L + 8 + i: each 128-bit lane, sign-extended, is 8 consecutive bytes' int32 sums.
      for (int r = 0; r < MR; ++r)
        for (int s = 0; s < NS; ++s) {
          int32_t* ap = acc + r * kAccW + 32 * s;
          widen_add(ap, _mm256_castsi256_si128(S[r][s][0]), 0);
          widen_add(ap, _mm256_castsi256_si128(S[r][s][1]), 8);
          widen_add(ap, _mm256_extracti128_si256(S[r][s][0], 1), 16);
          widen_add(ap, _mm256_extracti128_si256(S[r][s][1], 1), 24);
        }
    }
  }

  static void group_end(const GemmArgs& a, int64_t b, int64_t g, const int32_t* acc, float* total) {
    // Columns 8u..8u+3 / 8u+4..8u+7 are the 4 consecutive lanes at nib_byte(8u) / nib_byte(8u + 4) (I4F32).
    const int64_t off = (b * a.G + g) * kBlockN;
    for (int u = 0; u < kBlockN / 8; ++u) {
      const __m256 s = scale8(a, off + 8 * u), z = zero8(a, off + 8 * u);
      for (int64_t m = 0; m < a.M; ++m) {
        const int32_t* p = acc + m * kAccW;
        float* t = total + m * kBlockN + 8 * u;
        const __m256 q = _mm256_cvtepi32_ps(
            _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + nib_byte(8 * u + 4))),
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + nib_byte(8 * u)))));
        const __m256 d = _mm256_fnmadd_ps(z, _mm256_set1_ps(a.xsum[m * a.G + g]), q);
        const __m256 sx = _mm256_mul_ps(s, _mm256_set1_ps(a.xscale[m * a.G + g]));
        _mm256_storeu_ps(t, _mm256_fmadd_ps(sx, d, _mm256_loadu_ps(t)));
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Dequantization into [Kp][ldo] (the large-M path's tiles and the dequant op): w = (q - z) * s, the
// integer difference exact in fp32 and one rounding in the multiply, as format.dequantize; then one
// rounding to bf16 / fp16 where asked. Blocks are written whole (64 columns; the callers' buffers are
// padded to blocks).
// ------------------------------------------------------------------------------------------------
ALWAYS_INLINE void store8(const DequantArgs& a, int64_t idx, __m256 v) { store8(a.out, a.out_type, idx, v); }

void dequant_impl(const DequantArgs& a, int64_t b0, int64_t b1) {
  const bool nib = a.bits != 8;
  const int64_t pb = nib ? kBlockN : 2 * kBlockN;
  const __m256i m_lo = _mm256_set1_epi32(0x0f);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* cbk = a.codes + b * (a.Kp / 2) * pb;
    const int64_t col = (b - a.b_origin) * kBlockN;
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t k0 = a.group_ptr[g], k1 = a.group_ptr[g + 1];
      if (k1 <= k0) continue;
      const int64_t off = (b * a.G + g) * kBlockN;
      __m256 s[8], z[8];
      for (int u = 0; u < 8; ++u) {
        s[u] = a.scales_f16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                                  static_cast<const uint16_t*>(a.scales) + off + 8 * u)))
                            : _mm256_loadu_ps(static_cast<const float*>(a.scales) + off + 8 * u);
        z[u] = a.zeros ? u8x8_to_ps(a.zeros + off + 8 * u) : _mm256_set1_ps(a.sym_zero);
      }
      for (int64_t k = k0; k < k1; k += 2) {
        const uint8_t* c = cbk + (k / 2) * pb;
        const int64_t r0 = k * a.ldo + col, r1 = r0 + a.ldo;
        if (nib) {
          alignas(32) float lo[kBlockN], hi[kBlockN];  // native lane order: lane j = column nib_col(j)
          for (int t = 0; t < 8; ++t) {
            const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * t)));
            _mm256_store_ps(lo + 8 * t, _mm256_cvtepi32_ps(_mm256_and_si256(d, m_lo)));
            _mm256_store_ps(hi + 8 * t, _mm256_cvtepi32_ps(_mm256_srli_epi32(d, 4)));
          }
          for (int u = 0; u < 8; ++u) {
            const int i0 = nib_byte(8 * u), i1 = nib_byte(8 * u + 4);
            const __m256 e = _mm256_set_m128(_mm_load_ps(lo + i1), _mm_load_ps(lo + i0));
            const __m256 o = _mm256_set_m128(_mm_load_ps(hi + i1), _mm_load_ps(hi + i0));
            store8(a, r0 + 8 * u, _mm256_mul_ps(_mm256_sub_ps(e, z[u]), s[u]));
            store8(a, r1 + 8 * u, _mm256_mul_ps(_mm256_sub_ps(o, z[u]), s[u]));
          }
        } else {
          for (int u = 0; u < 8; ++u) {
            // slots 2u, 2u+1: columns 8u..8u+3 and 8u+4..8u+7 as (k, k+1) lane pairs
            const __m256 p0 = u8x8_to_ps(c + 16 * u), p1 = u8x8_to_ps(c + 16 * u + 8);
            const __m256 e = _mm256_shuffle_ps(p0, p1, 0x88);  // [c0 c1 c4 c5 | c2 c3 c6 c7], row k
            const __m256 o = _mm256_shuffle_ps(p0, p1, 0xdd);  // the same for row k+1
            const __m256 en = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xd8));
            const __m256 on = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xd8));
            store8(a, r0 + 8 * u, _mm256_mul_ps(_mm256_sub_ps(en, z[u]), s[u]));
            store8(a, r1 + 8 * u, _mm256_mul_ps(_mm256_sub_ps(on, z[u]), s[u]));
          }
        }
      }
    }
  }
}

// Per-call buffers, 64-byte aligned (aligned_alloc wants the size rounded up to the alignment).
struct Aligned {
  void* p;
  explicit Aligned(size_t bytes) : p(std::aligned_alloc(64, ((bytes ? bytes : 1) + 63) / 64 * 64)) {}
  ~Aligned() { std::free(p); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
};

template <class P>
bool run(const GemmArgs& a, int64_t b0, int64_t b1, const void* x, int64_t ldx) {
  Aligned total(static_cast<size_t>(a.M * kBlockN) * sizeof(float));
  Aligned acc(static_cast<size_t>(a.M * P::kAccW) * sizeof(typename P::AccType));
  if (!total.p || !acc.p) return false;
  Aligned scratch(P::kDecodeOnce ? static_cast<size_t>(kChunkT * 512) : 0);
  if (!scratch.p) return false;
  DriverCtx c;
  c.scratch = scratch.p;
  c.x = x;
  c.ldx = ldx;
  c.acc = acc.p;
  c.total = static_cast<float*>(total.p);
  // One chunk ahead (8 KiB of int8, 4 KiB of nibble codes: the AVX-512 kernels measured 1-4 KiB
  // within noise of each other), spread over the strips by the driver. The DRAM-resident A/B on this
  // session's shared host varied by 2-5x between rounds, so this distance is not tuned here.
  c.stream_ahead = P::kChunkPairs * P::kPairBytes;
  small_m_driver<P>(a, b0, b1, c);
  return true;
}

}  // namespace

namespace avx2 {
bool fused_gemm(const GemmArgs& a, int64_t b0, int64_t b1) {
  if (!a.xf) return false;
  const bool tiled = a.M >= (a.bits == 8 ? kTiledMinM8 : kTiledMinM4);
  if (a.bits == 8) return tiled ? run<TiledF32<I8F32>>(a, b0, b1, a.xf, a.Kp) : run<I8F32>(a, b0, b1, a.xf, a.Kp);
  // M = 1: bf16 / fp16 activations (out has x's dtype) the +128 decode, fp32 the exact tables (I4Lut).
  if (a.M == 1 && a.out_type != OutType::F32) return run<I4Bias128>(a, b0, b1, a.xf, a.Kp);
  if (a.M == 1) {
    if (a.bits == 2) return run<I4Lut<-2>>(a, b0, b1, a.xf, a.Kp);
    if (a.bits == 3) return run<I4Lut<-4>>(a, b0, b1, a.xf, a.Kp);
    return run<I4Lut<-8>>(a, b0, b1, a.xf, a.Kp);
  }
  // M = 4 and 6 (one row tile): the table decode once for all rows (I4LutRows), whatever the out dtype
  // (x is fp32 here either way); M = 2, 3, 5 keep I4F32 (I4LutRows measured 0.88-1.05x there).
  if (a.M == 4 || a.M == 6) {
    if (a.bits == 2) return run<I4LutRows<-2>>(a, b0, b1, a.xf, a.Kp);
    if (a.bits == 3) return run<I4LutRows<-4>>(a, b0, b1, a.xf, a.Kp);
    return run<I4LutRows<-8>>(a, b0, b1, a.xf, a.Kp);
  }
  // x with odd k divided by 16 (see I4F32), once per call.
  const int64_t n = a.M * a.Kp;
  Aligned xs(static_cast<size_t>(n) * sizeof(float));
  if (!xs.p) return false;
  float* v = static_cast<float*>(xs.p);
  const __m256 sc = _mm256_setr_ps(1.f, 0.0625f, 1.f, 0.0625f, 1.f, 0.0625f, 1.f, 0.0625f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_store_ps(v + i, _mm256_mul_ps(_mm256_loadu_ps(a.xf + i), sc));
  for (; i < n; ++i) v[i] = (i & 1) ? a.xf[i] * 0.0625f : a.xf[i];  // Kp is even: parity of i is that of k
  if (!tiled) return run<I4F32>(a, b0, b1, v, a.Kp);
  return a.M >= kPairMinM4 ? run<TiledF32<I4F32, true>>(a, b0, b1, v, a.Kp) : run<TiledF32<I4F32>>(a, b0, b1, v, a.Kp);
}

bool fused_gemm_w8a8(const GemmArgs& a, int64_t b0, int64_t b1) {
  if (a.bits != 8 || !a.xq16p || !a.xscale) return false;
  return run<I8W8A8>(a, b0, b1, a.xq16p, a.Kp / 2);
}

bool fused_gemm_w4a8(const GemmArgs& a, int64_t b0, int64_t b1) {
  if (a.bits == 8 || !a.xq8p || !a.xscale) return false;
  return run<I4W4A8>(a, b0, b1, a.xq8p, a.Kp / 2);
}

bool dequant(const DequantArgs& a, int64_t b0, int64_t b1) {
  dequant_impl(a, b0, b1);
  return true;
}
}  // namespace avx2
}  // namespace gptq_cpu

#else  // not x86-64: stubs, the dispatcher never selects them

namespace gptq_cpu::avx2 {
bool fused_gemm(const GemmArgs&, int64_t, int64_t) { return false; }
bool fused_gemm_w8a8(const GemmArgs&, int64_t, int64_t) { return false; }
bool fused_gemm_w4a8(const GemmArgs&, int64_t, int64_t) { return false; }
bool dequant(const DequantArgs&, int64_t, int64_t) { return false; }
}  // namespace gptq_cpu::avx2
#endif
#include "isa_end.inc"
