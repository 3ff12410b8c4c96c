// The direct int8 x BF16 kernel (M < kTiledMinM) with an AVX512-VBMI byte-table decode. A unit of its
// own because the VBMI flag must not reach code that runs on AVX-512 CPUs without VBMI (Skylake-SP,
// Cascade Lake, Cooper Lake): it compiles kernel_avx512.inc (the shared driver, the direct BF16
// micro-kernel, group terms, output store) a second time under a target with VBMI, and only adds the
// decode. config.cpp selects it only when the CPU reports avx512vbmi.
#include <cstdlib>
#include <cstring>

#include "kernel.h"

#define GPTQ_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx512vbmi,avx2,fma,f16c"
#include "isa_begin.inc"
#if GPTQ_ISA_X86_64

namespace gptq_cpu {
namespace {

#include "kernel_avx512.inc"

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

// DecI8's words from one 64-byte load: two vectors per step, word j of w[h] = BF16(c[32 v + 32h + j]).
struct DecI8Vbmi {
  static constexpr float kCodeBias = 0.f;
  static constexpr int kPairBytes = 2 * kBlockN;
  static constexpr int kStep = 2;
  static ALWAYS_INLINE void decode_step(const uint8_t* c, int v, __m512i* w) {
    const __m512i q = _mm512_loadu_si512(c + 32 * v);
    const __mmask64 top = _mm512_movepi8_mask(q);
    __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(kVbmi.hi), q, _mm512_load_si512(kVbmi.hi + 64));
    __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(kVbmi.lo), q, _mm512_load_si512(kVbmi.lo + 64));
    hi = _mm512_mask_mov_epi8(hi, top, _mm512_set1_epi8(0x43));
    lo = _mm512_mask_add_epi8(lo, top, q, _mm512_set1_epi8(static_cast<char>(0x80)));
    w[0] = _mm512_permutex2var_epi8(lo, _mm512_load_si512(kVbmi.ilv[0]), hi);
    w[1] = _mm512_permutex2var_epi8(lo, _mm512_load_si512(kVbmi.ilv[1]), hi);
  }
};

}  // namespace

namespace avx512_vbmi {

bool fused_gemm_i8_bf16(const GemmArgs& a, int64_t b0, int64_t b1) {
  if (a.M >= kTiledMinM || a.bits != 8) return false;
  return run_reg_policy<Direct<DirectBf16<DecI8Vbmi>>>(a, b0, b1);
}

}  // namespace avx512_vbmi
}  // namespace gptq_cpu

#else  // not x86-64: stubs, the dispatcher never selects them

namespace gptq_cpu::avx512_vbmi {
bool fused_gemm_i8_bf16(const GemmArgs&, int64_t, int64_t) { return false; }
}  // namespace gptq_cpu::avx512_vbmi
#endif
#include "isa_end.inc"
