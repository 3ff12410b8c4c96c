// gptq-ascend CPU kernel: the packed layout and the interface between the torch glue (ops.cpp) and the
// ISA-specific kernels (kernel_avx512.cpp and its VBMI build kernel_avx512_vbmi.cpp, kernel_avx2.cpp,
// kernel_generic.cpp).
//
// This header deliberately includes NO torch header. The ISA translation units are compiled with
// `#pragma GCC target(...)`; any inline function they instantiated from a shared header (ATen's included)
// would be emitted with AVX-512 instructions and the linker could pick that copy for a generic caller,
// crashing a CPU without AVX-512 (an ODR trap). So the kernels see only plain pointers, and every helper
// they define lives in an anonymous namespace (internal linkage, one copy per ISA).
//
// ---------------------------------------------------------------------------------------------------
// THE PACKED LAYOUT (produced once at load time by python/gptq_ascend/backends/cpu.py)
// ---------------------------------------------------------------------------------------------------
// Decode (M = 1..~32 tokens) is bound by memory bandwidth: the kernel must read every weight byte
// exactly once, as one sequential stream per thread, and do little enough arithmetic per byte that two
// cores keep up with DRAM. Hence:
//
// * K is reordered once: act-order permutation (format.act_order_perm), then each group's rows are
//   padded to a multiple of 4 rows (the kernels read k-pairs; the opt-in W8A8 path reads k-quads).
//   `row_map[i]` (int32 [Kp]) is the checkpoint row feeding padded row i, or -1
//   for a pad row. The kernel gathers x through row_map per call (x is tiny next to W at small M), so
//   the inner loop only ever sees contiguous groups of whole K-pairs. `group_ptr` (int32 [G+1]) holds the
//   padded row where each stored group starts; groups with no rows are dropped at repack time.
// * N is cut into blocks of 64 columns (N padded up with code 0 / scale 0). Block b's codes are one
//   contiguous run [Kp/2 k-pairs][bytes per k-pair], so one thread streams whole blocks front to back.
//   64 columns = 4 zmm of fp32 accumulators per activation row.
// * 8-bit codes: per k-pair 128 bytes, ordered [column 0..63][k, k+1]. Zero-extending 16 bytes gives
//   8 columns x (k, k+1); cvtne2ps2bf16 of two such vectors is exactly the (k, k+1) BF16 pair per
//   column that vdpbf16ps wants, in natural column order.
// * <=4-bit codes (4-bit, and 2/3-bit which reuse it: one code path, still 1/4 of the bytes of BF16):
//   per k-pair 64 bytes, each byte = code(k) | code(k+1) << 4. Byte j holds column
//   16*((j>>2)&3) + 4*(j>>4) + (j&3): the permutation that makes the AVX-512 unpack sequence
//   (and/shift, unpack lo/hi with itself, then unpack lo/hi with 0x43) land column c in lane c%16 of
//   vector c/16. The unpack against 0x43 builds the BF16 number 0x43cc = 128 + c exactly, so the nibble
//   -> BF16 conversion costs ~2 shuffles per 32 weights and no int->float conversion at all. The +128
//   is removed per group with the sum of x (see below).
// * scales: [nblk][G][64], fp16 when the checkpoint's are fp16 (exact, half the bytes) else fp32.
// * zeros: [nblk][G][64] uint8, the TRUE zero point z (format.unpack_zeros already applied the v1
//   offset), or absent when every z is the same value (`sym_zero`; all symmetric checkpoints).
//
// ---------------------------------------------------------------------------------------------------
// THE ARITHMETIC
// ---------------------------------------------------------------------------------------------------
//   y[m, n] = sum_g s[g, n] * ( sum_{k in g} x[m, k] * (q[k, n] + cb)  -  (z[g, n] + cb) * X[m, g] )
// with X[m, g] = sum_{k in g} x[m, k] computed once per call, and cb the constant the decode adds
// (0 for 8-bit and AVX2's I4F32; 128 for the +128 nibble paths; -2^(bits-1) for AVX2's fp32 table decode
// I4Lut, which centres the codes: exact, and the zero-point term is 0 for symmetric layers). The inner
// loop is conversion + FMA/dot only; zero point and scale cost one fnmadd + one fmadd per 16 outputs per
// group. Accumulation is fp32 throughout.
// Pad rows have x = 0 so they contribute nothing whatever their code.
#pragma once

#include <cstdint>

namespace gptq_cpu {

constexpr int kBlockN = 64;  // columns per N-block
// From this M on, the AVX-512 kernels decode each chunk of weights once and run register tiles over
// it; they want x pair-major (GemmArgs::xp, BF16) or k-major (GemmArgs::xt, fp32). Below it the
// direct kernels read x row-major (GemmArgs::xb / xf).
constexpr int64_t kTiledMinM = 5;

enum class OutType : int { F32 = 0, BF16 = 1, F16 = 2 };

// A packed weight as the kernels see it (CPUBackend.repack's tensors): shared by GemmArgs and DequantArgs.
struct PackedView {
  int64_t Kp = 0;       // padded K (a multiple of 4)
  int64_t G = 0;        // stored groups
  int64_t nblk = 0;     // N-blocks of kBlockN columns
  int bits = 8;         // 8 -> byte layout; 2/3/4 -> nibble layout
  const uint8_t* codes = nullptr;
  const void* scales = nullptr;  // [nblk][G][64]
  bool scales_f16 = true;        // else fp32
  const uint8_t* zeros = nullptr;  // [nblk][G][64] or null
  float sym_zero = 0.f;          // z when zeros == null
  const int32_t* group_ptr = nullptr;  // [G+1]
};

struct GemmArgs : PackedView {
  int64_t M = 0;        // activation rows
  int64_t N = 0;        // true out_features (columns >= N are padding, never written)
  const float* xf = nullptr;     // [M][Kp] activations gathered to fp32 (fp32 paths)
  const uint16_t* xb = nullptr;  // [M][Kp] activations gathered as bf16 bits (bf16 dot path, M < kTiledMinM)
  const uint32_t* xp = nullptr;  // [Kp/2][M] bf16 (k, k+1) pairs, pair-major (bf16 dot path, M >= kTiledMinM)
  const float* xt = nullptr;     // [Kp][M] fp32, k-major (AVX-512 fp32 path, M >= kTiledMinM)
  // Opt-in int8 activations (W8A8: 8-bit weights, AVX512-VNNI or AVX2; W4A8: <=4-bit, AVX2):
  // x[m, k] ~= xscale[m, g] * xq, xq in [-127, 127], one scale per row and group; xq4 holds k-quads,
  // quad-major ([Kp/4][M] of 4 x int8), and xsum then holds the per-group sums of xq (exact integers).
  // A group holding a NaN gets xscale NaN (its outputs are NaN, as the exact kernels' are).
  // The AVX2 kernels read the same xq row-major instead, as the (xq[k], xq[k+1]) word their tiles
  // broadcast: xq16p as two int16 (vpmaddwd, W8A8), xq8p as two int8 (vpmaddubsw, W4A8); gathered once
  // per call (gather.cpp), not per block range.
  const int32_t* xq4 = nullptr;
  const uint32_t* xq16p = nullptr;  // [M][Kp/2]: (uint16)xq[k] | (uint16)xq[k+1] << 16 (AVX2 W8A8)
  const uint16_t* xq8p = nullptr;   // [M][Kp/2]: (uint8)xq[k] | (uint8)xq[k+1] << 8 (AVX2 W4A8)
  const float* xscale = nullptr;  // [M][G]
  const float* xsum = nullptr;   // [M][G] per-group sums of the gathered activations
  const float* bias = nullptr;   // [N] fp32 or null
  void* out = nullptr;           // [M][ldo] of out_type
  int64_t ldo = 0;
  OutType out_type = OutType::F32;
};

struct DequantArgs : PackedView {
  void* out = nullptr;  // [Kp][ldo], block b lands at columns (b - b_origin) * 64 (dequant_t: transposed)
  int64_t ldo = 0;
  int64_t b_origin = 0;
  OutType out_type = OutType::F32;  // F32 or BF16
  int64_t k_begin = 0, k_end = -1;  // dequant_vnni_bf16 only: padded rows [k_begin, k_end), -1 = Kp
};

// Block-range entry points, one set per ISA. `fused_gemm` (the fused dequant-GEMM, for every M up to the
// tier's switch-over, 32-256 rows, see config.cpp) computes output columns of blocks [b0, b1) for all M
// rows; `dequant` writes blocks [b0, b1) of W (padded K order) into out. The `generic` tier's entry
// points are the portable kernels (kernel_portable.inc) compiled at the baseline ISA. All but
// avx512::fused_gemm have one of these two signatures, so each ISA below lists only its names.
using BlockGemm = bool(const GemmArgs& a, int64_t b0, int64_t b1);
using BlockDequant = bool(const DequantArgs& a, int64_t b0, int64_t b1);
namespace avx512 {
bool fused_gemm(const GemmArgs& a, int64_t b0, int64_t b1, bool bf16_dot);
// The opt-in W8A8 kernel (GemmArgs::xq4 set, bits == 8, group_ptr multiples of 4). Needs AVX512-VNNI.
BlockGemm fused_gemm_w8a8;
BlockDequant dequant;
// W^T in BF16: block b's column n lands in row (b - b_origin) * 64 + n, padded K along the row.
// Needs AVX512-BF16.
BlockDequant dequant_t_bf16;
// W in BF16, rows [k_begin, k_end) as oneDNN's brgemm "VNNI" B operand: out[(k - k_begin) / 2][ldo][2],
// block b's column n at (b - b_origin) * 64 + n. Needs AVX512-BF16.
BlockDequant dequant_vnni_bf16;
}  // namespace avx512
namespace avx512_vbmi {
// The direct int8 x BF16 kernel (bits == 8, M < kTiledMinM, bf16 dot) with the AVX512-VBMI decode.
// Returns false for any other call. Needs AVX512-BF16 and AVX512-VBMI.
BlockGemm fused_gemm_i8_bf16;
}  // namespace avx512_vbmi
namespace avx2 {
// Reads GemmArgs::xf ([M][Kp] fp32) for every M; intrinsics kernels on the shared driver (driver.inc).
BlockGemm fused_gemm;
// The opt-in W8A8 kernel on AVX2 (GemmArgs::xq16p / xscale / xsum: the same quantized x and the same
// exact int32 sums as avx512::fused_gemm_w8a8, with vpmaddwd): bits == 8, group_ptr multiples of 4.
BlockGemm fused_gemm_w8a8;
// The opt-in W4A8 kernel on AVX2 (vpmaddubsw; GemmArgs::xq8p / xscale / xsum, the same int32 sums):
// bits <= 4, group_ptr multiples of 4, every M of the fused path (row tiles of <= 4 rows).
BlockGemm fused_gemm_w4a8;
BlockDequant dequant;
}  // namespace avx2
namespace generic {
BlockGemm fused_gemm;
BlockDequant dequant;
}  // namespace generic

// Compiled-in ISAs (the AVX TUs compile to stubs returning false on non-x86 targets).
bool avx512_compiled();
bool avx2_compiled();

}  // namespace gptq_cpu
