// Torch glue for the CPU GPTQ kernels: argument checks, activation gather, ISA dispatch, the small-M
// (fused, bandwidth-bound) and large-M (dequantized tiles into oneDNN's brgemm micro-kernel, or into
// ATen's GEMM) paths, and the op registration.
//
// Ops (namespace gptq_ascend, all CPU; fake/meta implementations are registered from Python in
// gptq_ascend/backends/cpu.py with torch.library.register_fake so torch.compile can trace them):
//   cpu_gemm(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor row_map, Tensor group_ptr,
//            Tensor? bias, int bits, float sym_zero, int in_features, int out_features) -> Tensor
//   cpu_gemm.out(..., *, Tensor(a!) out) -> Tensor(a!)
//   cpu_dequant(Tensor codes, Tensor scales, Tensor? zeros, Tensor row_map, Tensor group_ptr, int bits,
//               float sym_zero, int in_features, int out_features, ScalarType dtype) -> Tensor
//   cpu_kernel_config(str isa="", int small_m_max=-1, int small_m_max_f32=-1, int w8a8=-1,
//                     int brgemm=-1) -> str
// The packed tensors are described in kernel.h and produced by CPUBackend.repack.
//
// This file is compiled at the baseline ISA; it only calls into the AVX-512/AVX2 units after checking
// the CPU at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <Python.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "kernel.h"

namespace gptq_cpu {
namespace {

// ---------------------------------------------------------------------------------------------------
// ISA selection and tunables
// ---------------------------------------------------------------------------------------------------
enum class Isa { Generic = 0, Avx2 = 1, Avx512 = 2 };

struct Config {
  Isa isa = Isa::Generic;
  bool bf16_dot = false;  // AVX512-BF16 present: bf16 activations use vdpbf16ps
  // isa "avx512vbmi": the AVX-512 kernels, and int8 x BF16 at M < kTiledMinM with the VBMI byte-table
  // decode (kernel_avx512_vbmi.cpp). The default where the CPU has AVX512-VBMI and AVX512-BF16.
  bool vbmi = false;
  // Largest M the fused kernel takes; above it the large-M paths run. Picked by measurement
  // (docs/cpu-kernel.md, 2-core Zen 4, interleaved with dense, int8 Qwen3-1.7B layers). The fused
  // kernel does the multiply-adds itself at 16 (fp32 FMA) or 32 (vdpbf16ps) MACs per instruction from
  // one cheap decode per weight (no scale); the large-M paths apply the scale while dequantizing and
  // hand the tile to oneDNN, whose register blocking runs closer to peak. With bf16 activations and the
  // brgemm path, fused vs brgemm: M=32 0.81-4.62 vs 0.91-5.35 ms, M=48 1.18-6.63 vs 1.25-7.17 ms,
  // M=64 qkv 3.04 vs 3.06, down 4.88 vs 4.40 ms -> 48. Without brgemm (run_large_m, dequantized tiles
  // into ATen's GEMM, ~0.2 ns per weight more) the switch is at M=192 (int8 K=2048 N=4096, one core:
  // M=128 11.5 vs 13.0 ms, M=192 17.6 vs 17.7 ms). fp32/fp16 activations use ATen's fp32 GEMM, half
  // as fast as BF16: the fused kernel still wins at M=256 (44.9 vs 50.9 ms).
  // small_m_max_bf16 < 0 means "by path": 48 with brgemm, 192 without.
  int64_t small_m_max_bf16 = -1;
  int64_t small_m_max_f32 = 256;
  // Opt-in: 8-bit layers with kTiledMinM <= M <= small_m_max quantize x to int8 per row and group and
  // use AVX512-VNNI (twice the multiply rate of vdpbf16ps). Changes the numerics (x is rounded to
  // 8 bits), so it is off unless asked for (GPTQ_ASCEND_CPU_W8A8=1 or cpu_kernel_config).
  bool w8a8 = false;
  bool vnni = false;  // the CPU has AVX512-VNNI (and the AVX-512 kernels are selected)
  // Large M with bf16 activations through oneDNN's brgemm micro-kernel (run_large_m_brgemm); off ->
  // dequantized tiles into ATen's GEMM (run_large_m). GPTQ_ASCEND_CPU_BRGEMM=0 or cpu_kernel_config.
  bool brgemm = true;
};

bool cpu_has(const char* feature) {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (!std::strcmp(feature, "avx512")) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  if (!std::strcmp(feature, "avx512bf16")) return __builtin_cpu_supports("avx512bf16");
  if (!std::strcmp(feature, "avx512vnni")) return __builtin_cpu_supports("avx512vnni");
  if (!std::strcmp(feature, "avx512vbmi")) return __builtin_cpu_supports("avx512vbmi");
  if (!std::strcmp(feature, "avx2")) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
#else
  (void)feature;
#endif
  return false;
}

const char* isa_name(const Config& c) {
  switch (c.isa) {
    case Isa::Avx512: return c.vbmi ? "avx512vbmi" : "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

Isa best_isa() {
  if (avx512_compiled() && cpu_has("avx512")) return Isa::Avx512;
  if (avx2_compiled() && cpu_has("avx2")) return Isa::Avx2;
  return Isa::Generic;
}

// Set the ISA by name; TORCH_CHECKs that this CPU can run it.
void set_isa(Config& c, const std::string& name) {
  const bool vbmi_ok = cpu_has("avx512vbmi") && cpu_has("avx512bf16");
  bool vbmi = false;
  if (name == "auto") {
    c.isa = best_isa();
    vbmi = c.isa == Isa::Avx512 && vbmi_ok;
  } else if (name == "avx512vbmi") {
    TORCH_CHECK(avx512_compiled() && cpu_has("avx512") && vbmi_ok,
                "gptq_ascend cpu: isa 'avx512vbmi' requested but this CPU lacks AVX-512 F/BW/VL/DQ, VBMI or BF16");
    c.isa = Isa::Avx512;
    vbmi = true;
  } else if (name == "avx512") {
    TORCH_CHECK(avx512_compiled() && cpu_has("avx512"),
                "gptq_ascend cpu: isa 'avx512' requested but this CPU lacks AVX-512 F/BW/VL/DQ");
    c.isa = Isa::Avx512;
  } else if (name == "avx2") {
    TORCH_CHECK(avx2_compiled() && cpu_has("avx2"),
                "gptq_ascend cpu: isa 'avx2' requested but this CPU lacks AVX2/FMA/F16C");
    c.isa = Isa::Avx2;
  } else if (name == "generic") {
    c.isa = Isa::Generic;
  } else {
    TORCH_CHECK(false, "gptq_ascend cpu: unknown isa '", name,
                "'; expected one of auto, avx512vbmi, avx512, avx2, generic");
  }
  c.vbmi = vbmi;
  c.bf16_dot = c.isa == Isa::Avx512 && cpu_has("avx512bf16");
  c.vnni = c.isa == Isa::Avx512 && cpu_has("avx512vnni");
}

Config make_config() {
  Config c;
  const char* env = std::getenv("GPTQ_ASCEND_CPU_ISA");
  set_isa(c, env && *env ? std::string(env) : std::string("auto"));
  if (const char* w = std::getenv("GPTQ_ASCEND_CPU_W8A8")) c.w8a8 = *w && std::strcmp(w, "0") != 0;
  if (const char* b = std::getenv("GPTQ_ASCEND_CPU_BRGEMM")) c.brgemm = !(*b && std::strcmp(b, "0") == 0);
  if (const char* m = std::getenv("GPTQ_ASCEND_CPU_SMALL_M_MAX")) {
    const long v = std::strtol(m, nullptr, 10);
    if (v >= 0) c.small_m_max_bf16 = c.small_m_max_f32 = v;
  }
  return c;
}

std::mutex g_config_mutex;
Config& config() {
  static Config c = make_config();
  return c;
}

bool brgemm_works();  // large-M section below
bool brgemm_on(const Config& cfg);
int64_t small_m_max_bf16(const Config& cfg, bool brgemm);

std::string describe(const Config& c) {
  return std::string("isa=") + isa_name(c) + " bf16_dot=" + (c.bf16_dot ? "1" : "0") +
         " small_m_max_bf16=" + std::to_string(small_m_max_bf16(c, brgemm_on(c))) +
         " small_m_max_f32=" + std::to_string(c.small_m_max_f32) +
         " w8a8=" + (c.w8a8 ? (c.vnni ? "1" : "1(no-vnni:off)") : "0") +
         " brgemm=" + (!c.brgemm ? "0" : !c.bf16_dot ? "1(no-bf16:off)" : brgemm_works() ? "1" : "1(no-ukernel:off)") +
         " threads=" + std::to_string(at::get_num_threads());
}

// ---------------------------------------------------------------------------------------------------
// Argument checks: every message says what was expected.
// ---------------------------------------------------------------------------------------------------
struct Packed {
  at::Tensor codes, scales, row_map, group_ptr;
  c10::optional<at::Tensor> zeros;
  int64_t bits, K, N, Kp, G, nblk;
  float sym_zero;
};

Packed check_packed(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                    const c10::optional<at::Tensor>& zeros, const at::Tensor& row_map, const at::Tensor& group_ptr,
                    int64_t bits, double sym_zero, int64_t in_features, int64_t out_features) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, ": bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(in_features > 0 && out_features > 0, op, ": in_features and out_features must be positive, got ",
              in_features, " and ", out_features);
  for (const auto* t : {&codes, &scales, &row_map, &group_ptr}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": packed tensors must be on the CPU, got one on ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": packed tensors must be contiguous (as CPUBackend.repack makes them)");
  }
  TORCH_CHECK(row_map.scalar_type() == at::kInt && row_map.dim() == 1, op,
              ": row_map must be a 1-D int32 tensor, got ", row_map.scalar_type(), " ", row_map.sizes());
  const int64_t Kp = row_map.numel();
  TORCH_CHECK(Kp >= in_features && Kp % 2 == 0, op, ": row_map must have an even length >= in_features (",
              in_features, "), got ", Kp);
  TORCH_CHECK(group_ptr.scalar_type() == at::kInt && group_ptr.dim() == 1 && group_ptr.numel() >= 2, op,
              ": group_ptr must be a 1-D int32 tensor of G+1 >= 2 offsets, got ", group_ptr.scalar_type(), " ",
              group_ptr.sizes());
  const int64_t G = group_ptr.numel() - 1;
  const int32_t* gp = group_ptr.data_ptr<int32_t>();
  TORCH_CHECK(gp[0] == 0 && gp[G] == Kp, op, ": group_ptr must run from 0 to len(row_map) = ", Kp, ", got ", gp[0],
              " .. ", gp[G]);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(gp[g + 1] >= gp[g] && gp[g] % 2 == 0, op,
                ": group_ptr must be non-decreasing even offsets; entry ", g, " is ", gp[g], " -> ", gp[g + 1]);
  }
  const int64_t nblk = (out_features + kBlockN - 1) / kBlockN;
  const int64_t pair_bytes = bits == 8 ? 2 * kBlockN : kBlockN;
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(codes.numel() == nblk * (Kp / 2) * pair_bytes, op, ": codes must hold ", nblk, " blocks x ", Kp / 2,
              " k-pairs x ", pair_bytes, " bytes for out_features=", out_features, " bits=", bits, ", got ",
              codes.numel(), " bytes");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, op,
              ": scales must be float16 or float32, got ", scales.scalar_type());
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == nblk && scales.size(1) == G && scales.size(2) == kBlockN, op,
              ": scales must have shape [", nblk, ", ", G, ", ", kBlockN, "], got ", scales.sizes());
  if (zeros.has_value()) {
    const auto& z = *zeros;
    TORCH_CHECK(z.device().is_cpu() && z.is_contiguous() && z.scalar_type() == at::kByte, op,
                ": zeros must be a contiguous uint8 CPU tensor, got ", z.scalar_type(), " on ", z.device());
    TORCH_CHECK(z.sizes() == scales.sizes(), op, ": zeros must have the shape of scales ", scales.sizes(), ", got ",
                z.sizes());
  }
  return Packed{codes, scales, row_map, group_ptr, zeros, bits, in_features, out_features, Kp, G, nblk,
                static_cast<float>(sym_zero)};
}

void check_x(const char* op, const at::Tensor& x, const Packed& p) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got one on ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == p.K, op, ": x must have shape [..., ", p.K, "] (in_features), got ",
              x.sizes());
}

void check_bias(const char* op, const c10::optional<at::Tensor>& bias, const Packed& p) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be a CPU tensor, got one on ", bias->device());
  TORCH_CHECK(bias->is_floating_point(), op, ": bias must be a floating-point tensor, got ", bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.N, op, ": bias must have shape [", p.N,
              "] (out_features), got ", bias->sizes());
}

OutType out_type_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return OutType::F32;
    case at::kBFloat16: return OutType::BF16;
    case at::kHalf: return OutType::F16;
    default: TORCH_CHECK(false, "gptq_ascend cpu: unsupported output dtype ", st);
  }
}

// ---------------------------------------------------------------------------------------------------
// Running block ranges on all threads. Blocks are handed out from an atomic counter rather than split
// statically: on a shared machine one core is often slowed by a neighbour, and a static split would
// leave the other core idle at the end.
// ---------------------------------------------------------------------------------------------------
template <class F>
void parallel_blocks(int64_t nblk, const F& fn) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), nblk);
  if (nt <= 1 || at::in_parallel_region()) {
    fn(0, nblk);
    return;
  }
  // Chunks of ~1/8 of a thread's share: big enough to stream, small enough to balance.
  const int64_t chunk = std::max<int64_t>(1, nblk / (nt * 8));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (;;) {
        const int64_t b = next.fetch_add(chunk);
        if (b >= nblk) break;
        fn(b, std::min(b + chunk, nblk));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Small M: gather x through row_map into the layout the kernel reads, with the per-group sums.
// One routine per row, rows in parallel: this is M*K work done before the kernel starts, 15% of a
// W8A8 call at M = 16 when it was serial. Each row is first materialized as fp32 (exact for all three
// input dtypes), then written out in the kernel's layout:
//   xf  [M][Kp] fp32 (direct fp32 kernels)      xt  [Kp][M] fp32 (tiled fp32 kernels)
//   xb  [M][Kp] bf16 bits (direct BF16 kernels)  xp  [Kp/2][M] bf16 pairs (tiled BF16 kernels)
//   xq4 [Kp/4][M] int8 quads + xscale (opt-in W8A8)
// ---------------------------------------------------------------------------------------------------
enum class XLayout { F32Rows, F32KMajor, Bf16Rows, Bf16Pairs, Int8Quads };

template <class T>
float to_f32(T v) {
  return static_cast<float>(v);
}

uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Round to nearest even for |v| < 2**22 without SSE4.1 (vectorizes at the baseline ISA).
inline float round_even(float v) {
  const float magic = 12582912.f;  // 1.5 * 2**23
  return (v + magic) - magic;
}

template <class T>
void row_to_f32(const T* xm, const Packed& p, bool identity, float* v) {
  if (identity) {
    for (int64_t i = 0; i < p.Kp; ++i) v[i] = to_f32(xm[i]);
  } else {
    const int32_t* rm = p.row_map.data_ptr<int32_t>();
    for (int64_t i = 0; i < p.Kp; ++i) v[i] = rm[i] >= 0 ? to_f32(xm[rm[i]]) : 0.f;
  }
}

// Sum and max|.| of v[0, n) with eight independent partial results. One running sum is a chain of
// dependent adds (~4 cycles each) that the compiler may not reorder: at M = 16, K = 2048, one thread,
// the op's fixed cost went from ~57 to ~44 us with this (N = 64; the whole op is 370 us at N = 1024).
inline float sum8(const float* v, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += v[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += v[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

inline float absmax8(const float* v, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] = std::max(acc[j], std::fabs(v[i + j]));
  for (int j = 0; i < n; ++i, ++j) acc[j] = std::max(acc[j], std::fabs(v[i]));
  float m = 0.f;
  for (float a : acc) m = std::max(m, a);
  return m;
}

struct XBuffers {
  std::vector<float> f32, xsum, xscale;
  std::vector<uint16_t> b16;
  std::vector<uint32_t> u32;
};

template <class T>
void gather_x(const T* x, int64_t M, const Packed& p, XLayout layout, XBuffers& out) {
  const int32_t* gp = p.group_ptr.data_ptr<int32_t>();
  const int32_t* rm = p.row_map.data_ptr<int32_t>();
  bool identity = p.Kp == p.K;
  for (int64_t i = 0; identity && i < p.Kp; ++i) identity = rm[i] == i;
  const int64_t Kp = p.Kp, G = p.G, K = p.K;
  out.xsum.resize(static_cast<size_t>(M * G));
  switch (layout) {
    case XLayout::F32Rows:
    case XLayout::F32KMajor: out.f32.resize(static_cast<size_t>(M * Kp)); break;
    case XLayout::Bf16Rows: out.b16.resize(static_cast<size_t>(M * Kp)); break;
    case XLayout::Bf16Pairs: out.u32.resize(static_cast<size_t>(M * Kp / 2)); break;
    case XLayout::Int8Quads:
      out.u32.resize(static_cast<size_t>(M * Kp / 4));
      out.xscale.resize(static_cast<size_t>(M * G));
      break;
  }
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> row(static_cast<size_t>(Kp));
    float* v = row.data();
    for (int64_t m = m0; m < m1; ++m) {
      row_to_f32(x + m * K, p, identity, v);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i0 = gp[g], i1 = gp[g + 1];
        if (layout == XLayout::Int8Quads) {
          const float amax = absmax8(v + i0, i1 - i0);
          const float inv = amax > 0.f ? 127.f / amax : 0.f;
          for (int64_t i = i0; i < i1; ++i)  // |v * inv| <= 127: clamping only guards rounding
            v[i] = std::min(127.f, std::max(-127.f, round_even(v[i] * inv)));
          out.xscale[m * G + g] = amax / 127.f;
          out.xsum[m * G + g] = sum8(v + i0, i1 - i0);  // exact: integers
        } else {
          out.xsum[m * G + g] = sum8(v + i0, i1 - i0);
        }
      }
      switch (layout) {
        case XLayout::F32Rows: std::memcpy(out.f32.data() + m * Kp, v, static_cast<size_t>(Kp) * 4); break;
        case XLayout::F32KMajor:
          for (int64_t i = 0; i < Kp; ++i) out.f32[i * M + m] = v[i];
          break;
        case XLayout::Bf16Rows:  // v holds bf16 values exactly: the top half of their fp32 bits
          for (int64_t i = 0; i < Kp; ++i) out.b16[m * Kp + i] = static_cast<uint16_t>(f32_bits(v[i]) >> 16);
          break;
        case XLayout::Bf16Pairs:
          for (int64_t i = 0; i < Kp; i += 2)
            out.u32[(i / 2) * M + m] = (f32_bits(v[i]) >> 16) | (f32_bits(v[i + 1]) & 0xffff0000u);
          break;
        case XLayout::Int8Quads:
          for (int64_t i = 0; i < Kp; i += 4) {
            uint32_t word = 0;
            for (int j = 0; j < 4; ++j)
              word |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(static_cast<int32_t>(v[i + j]))))
                      << (8 * j);
            out.u32[(i / 4) * M + m] = word;
          }
          break;
      }
    }
  });
}

GemmArgs base_args(const Packed& p) {
  GemmArgs a;
  a.N = p.N;
  a.Kp = p.Kp;
  a.G = p.G;
  a.nblk = p.nblk;
  a.bits = static_cast<int>(p.bits);
  a.codes = p.codes.data_ptr<uint8_t>();
  a.scales = p.scales.data_ptr();
  a.scales_f16 = p.scales.scalar_type() == at::kHalf;
  a.zeros = p.zeros.has_value() ? p.zeros->data_ptr<uint8_t>() : nullptr;
  a.sym_zero = p.sym_zero;
  a.group_ptr = p.group_ptr.data_ptr<int32_t>();
  return a;
}

DequantArgs dequant_args(const Packed& p) {
  DequantArgs d;
  d.Kp = p.Kp;
  d.G = p.G;
  d.nblk = p.nblk;
  d.bits = static_cast<int>(p.bits);
  d.codes = p.codes.data_ptr<uint8_t>();
  d.scales = p.scales.data_ptr();
  d.scales_f16 = p.scales.scalar_type() == at::kHalf;
  d.zeros = p.zeros.has_value() ? p.zeros->data_ptr<uint8_t>() : nullptr;
  d.sym_zero = p.sym_zero;
  d.group_ptr = p.group_ptr.data_ptr<int32_t>();
  return d;
}

void run_small_m(const Config& cfg, const at::Tensor& x2, const Packed& p, const c10::optional<at::Tensor>& bias,
                 at::Tensor& out2) {
  const int64_t M = x2.size(0);
  const bool dot = cfg.bf16_dot && x2.scalar_type() == at::kBFloat16;
  GemmArgs a = base_args(p);
  a.M = M;
  bool quads = true;
  for (int64_t g = 0; g <= p.G && quads; ++g) quads = p.group_ptr.data_ptr<int32_t>()[g] % 4 == 0;
  const bool w8a8 = cfg.w8a8 && (cfg.vnni || cfg.isa == Isa::Avx2) && p.bits == 8 && M >= kTiledMinM && quads;
  const bool tiled = cfg.isa == Isa::Avx512 && M >= kTiledMinM;
  const bool vbmi_direct = cfg.vbmi && dot && !tiled && p.bits == 8;
  const XLayout layout = w8a8 ? XLayout::Int8Quads
                         : dot ? (tiled ? XLayout::Bf16Pairs : XLayout::Bf16Rows)
                               : (tiled ? XLayout::F32KMajor : XLayout::F32Rows);
  XBuffers xbuf;
  switch (x2.scalar_type()) {
    case at::kFloat: gather_x(x2.data_ptr<float>(), M, p, layout, xbuf); break;
    case at::kBFloat16: gather_x(x2.data_ptr<at::BFloat16>(), M, p, layout, xbuf); break;
    default: gather_x(x2.data_ptr<at::Half>(), M, p, layout, xbuf); break;
  }
  switch (layout) {
    case XLayout::F32Rows: a.xf = xbuf.f32.data(); break;
    case XLayout::F32KMajor: a.xt = xbuf.f32.data(); break;
    case XLayout::Bf16Rows: a.xb = xbuf.b16.data(); break;
    case XLayout::Bf16Pairs: a.xp = xbuf.u32.data(); break;
    case XLayout::Int8Quads:
      a.xq4 = reinterpret_cast<const int32_t*>(xbuf.u32.data());
      a.xscale = xbuf.xscale.data();
      break;
  }
  a.xsum = xbuf.xsum.data();
  at::Tensor bias32;
  if (bias.has_value()) {
    bias32 = bias->to(at::kFloat).contiguous();
    a.bias = bias32.data_ptr<float>();
  }
  a.out = out2.data_ptr();
  a.ldo = out2.stride(0);
  a.out_type = out_type_of(out2.scalar_type());
  const Isa isa = cfg.isa;
  std::atomic<bool> ok{true};
  parallel_blocks(p.nblk, [&](int64_t b0, int64_t b1) {
    bool r;
    switch (isa) {
      case Isa::Avx512:
        r = w8a8          ? avx512::small_m_w8a8(a, b0, b1)
            : vbmi_direct ? avx512_vbmi::small_m_i8_bf16(a, b0, b1)
                          : avx512::small_m(a, b0, b1, dot);
        break;
      case Isa::Avx2: r = w8a8 ? avx2::small_m_w8a8(a, b0, b1) : avx2::small_m(a, b0, b1); break;
      default: r = generic::small_m(a, b0, b1); break;
    }
    if (!r) ok = false;
  });
  TORCH_CHECK(ok.load(), "gptq_ascend::cpu_gemm: out of memory for the per-thread accumulators (M=", M, ")");
}

// ---------------------------------------------------------------------------------------------------
// Dequantization of blocks [b0, b1) into a [Kp][ldo] tensor (fp32 or bf16), in parallel.
// ---------------------------------------------------------------------------------------------------
void dequant_blocks(const Config& cfg, const Packed& p, int64_t b0, int64_t b1, at::Tensor& dst) {
  DequantArgs d = dequant_args(p);
  d.out = dst.data_ptr();
  d.ldo = dst.stride(0);
  d.b_origin = b0;
  d.out_type = out_type_of(dst.scalar_type());
  const Isa isa = cfg.isa;
  parallel_blocks(b1 - b0, [&](int64_t c0, int64_t c1) {
    switch (isa) {
      case Isa::Avx512: avx512::dequant(d, b0 + c0, b0 + c1); break;
      case Isa::Avx2: avx2::dequant(d, b0 + c0, b0 + c1); break;
      default: generic::dequant(d, b0 + c0, b0 + c1); break;
    }
  });
}

// x [M, K] -> [M, Kp] in the kernel's row order (pads zero), dtype `ct`. Identity row maps (no
// act-order, no padding) skip the gather.
at::Tensor gather_rows(const at::Tensor& x2, const Packed& p, at::ScalarType ct) {
  at::Tensor xc = x2.scalar_type() == ct ? x2 : x2.to(ct);
  const int32_t* rm = p.row_map.data_ptr<int32_t>();
  bool identity = p.Kp == p.K;
  for (int64_t i = 0; identity && i < p.Kp; ++i) identity = rm[i] == i;
  if (identity) return xc;
  at::Tensor idx = p.row_map.to(at::kLong);
  at::Tensor pad = idx.lt(0);
  at::Tensor xg = xc.index_select(1, idx.clamp_min(0));
  xg.masked_fill_(pad.unsqueeze(0), 0);
  return xg;
}

void dequant_blocks_t_bf16(const Packed& p, int64_t b0, int64_t b1, at::Tensor& dst) {
  DequantArgs d = dequant_args(p);
  d.out = dst.data_ptr();
  d.ldo = dst.stride(0);
  d.b_origin = b0;
  d.out_type = OutType::BF16;
  parallel_blocks(b1 - b0, [&](int64_t c0, int64_t c1) { avx512::dequant_t_bf16(d, b0 + c0, b0 + c1); });
}

// Large M, bf16 activations, AVX512-BF16: dequantize-and-multiply fused per thread through oneDNN's
// brgemm micro-kernel (ATen's at::native::cpublas::brgemm; the oneDNN "ukernel" API, made for exactly
// this: the caller produces B tiles, oneDNN supplies the register-blocked multiply).
//
// Why not a plain GEMM on a dequantized tile (run_large_m below): that writes each tile out (4 MiB,
// past L2), then oneDNN's matmul reads it back and repacks it into its own blocked "VNNI" layout
// before multiplying: two extra passes over every weight, 1.14-1.37x oneDNN's time at M = 256 here
// (interleaved, 2 threads) against 1.02-1.06x this way. The brgemm B operand IS the VNNI layout
// ([k-pair][column][k, k+1]), which is the order our codes are already stored in, so the
// dequantization writes it directly with no transpose, one L2-resident tile of kBrgemmK rows x 64
// columns at a time, and the GEMM consumes it while it is hot. Threads take
// 64-column blocks from a shared counter; each accumulates its block's [M, 64] result in fp32 over the
// K chunks, then adds the bias and rounds once, like the small-M kernels.
constexpr int64_t kBrgemmK = 1024;   // padded rows per dequantized tile: 128 KiB of BF16 per block
constexpr int64_t kBrgemmM = 512;    // most activation rows per brgemm call

// The "by path" default (see Config); `brgemm` = brgemm_on(cfg), which the caller has already decided.
int64_t small_m_max_bf16(const Config& cfg, bool brgemm) {
  return cfg.small_m_max_bf16 >= 0 ? cfg.small_m_max_bf16 : brgemm ? 48 : 192;
}

// Rows for the next brgemm call: kBrgemmM, else the largest power of two <= the rows left. ATen keeps
// every generated micro-kernel, keyed by its shape, in a per-thread map that is never pruned; serving
// sees every prefill length, so the row counts must come from a small fixed set (here <= 10 values).
int64_t brgemm_rows(int64_t left) {
  if (left >= kBrgemmM) return kBrgemmM;
  int64_t r = 1;
  while (2 * r <= left) r *= 2;
  return r;
}

// ATen only runs a BF16 VNNI brgemm through oneDNN's ukernel (built in on x86 torch, needs
// avx512_core) and raises otherwise; probe it once on a product with a known exact result rather
// than trust build flags we cannot see from the headers.
bool brgemm_works() {
  static const bool ok = [] {
    try {
      constexpr int64_t m = 2, k = 4;
      std::vector<at::BFloat16> a(m * k, at::BFloat16(1.f)), b(k * kBlockN);
      for (int64_t i = 0; i < k * kBlockN; ++i) b[i] = at::BFloat16(static_cast<float>(i % 7));
      std::vector<float> c(m * kBlockN, -1.f);
      at::native::cpublas::brgemm(m, kBlockN, k, k, kBlockN, kBlockN, false, a.data(), b.data(), c.data());
      at::native::cpublas::brgemm_release();
      for (int64_t r = 0; r < m; ++r)
        for (int64_t n = 0; n < kBlockN; ++n) {
          float want = 0.f;  // A is all ones: the sum of column n's B entries
          for (int64_t p = 0; p < k / 2; ++p) {
            const int64_t i = (p * kBlockN + n) * 2;  // B is [k / 2][64][2]: (k, k + 1) of column n
            want += static_cast<float>(i % 7 + (i + 1) % 7);
          }
          if (c[r * kBlockN + n] != want) return false;
        }
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

bool brgemm_on(const Config& cfg) {
  return cfg.isa == Isa::Avx512 && cfg.bf16_dot && cfg.brgemm && at::globalContext().userEnabledMkldnn() &&
         brgemm_works();
}

// acc [M][64] fp32 (+ bias) -> bf16 output columns [0, nv), rounded once.
void store_rows_bf16(const float* acc, const float* bias, int64_t M, int64_t nv, at::BFloat16* out, int64_t ldo) {
  for (int64_t m = 0; m < M; ++m) {
    const float* cr = acc + m * kBlockN;
    at::BFloat16* orow = out + m * ldo;
    for (int64_t n = 0; n < nv; ++n) orow[n] = static_cast<at::BFloat16>(bias ? cr[n] + bias[n] : cr[n]);
  }
}

void run_large_m_brgemm(const at::Tensor& x2, const Packed& p, const c10::optional<at::Tensor>& bias,
                        at::Tensor& out2) {
  const int64_t M = x2.size(0);
  const at::Tensor xg = gather_rows(x2, p, at::kBFloat16).contiguous();  // [M, Kp]
  const auto* A = reinterpret_cast<const at::BFloat16*>(xg.data_ptr());
  const int64_t lda = xg.stride(0);
  at::Tensor bias32;
  if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();
  const float* bias_p = bias.has_value() ? bias32.data_ptr<float>() : nullptr;
  const DequantArgs d0 = dequant_args(p);
  const int64_t ldo = out2.stride(0);
  auto* out_base = reinterpret_cast<at::BFloat16*>(out2.data_ptr());  // out has x's dtype (checked)
  const int64_t kc_max = std::min(p.Kp, kBrgemmK);
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), p.nblk);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    if (t0 >= t1) return;
    std::vector<uint16_t> tile(static_cast<size_t>(kc_max * kBlockN));
    std::vector<float> acc(static_cast<size_t>(M * kBlockN));
    for (int64_t b; (b = next.fetch_add(1)) < p.nblk;) {
      for (int64_t k0 = 0; k0 < p.Kp; k0 += kc_max) {
        const int64_t k1 = std::min(k0 + kc_max, p.Kp);
        DequantArgs d = d0;
        d.out = tile.data();
        d.ldo = kBlockN;
        d.b_origin = b;
        d.k_begin = k0;
        d.k_end = k1;
        d.out_type = OutType::BF16;
        avx512::dequant_vnni_bf16(d, b, b + 1);
        for (int64_t m0 = 0, mb; m0 < M; m0 += mb) {
          mb = brgemm_rows(M - m0);
          at::native::cpublas::brgemm(mb, kBlockN, k1 - k0, lda, kBlockN, kBlockN, /*add_C=*/k0 > 0, A + m0 * lda + k0,
                                      reinterpret_cast<const at::BFloat16*>(tile.data()), acc.data() + m0 * kBlockN);
        }
      }
      const int64_t n0 = b * kBlockN, nv = std::min<int64_t>(kBlockN, p.N - n0);
      store_rows_bf16(acc.data(), bias_p ? bias_p + n0 : nullptr, M, nv, out_base + n0, ldo);
    }
    at::native::cpublas::brgemm_release();
  });
}

// Large M: dequantize column tiles into a reused buffer and hand each to ATen's GEMM (oneDNN/MKL).
// With AVX512-BF16 and bf16 activations the tile is written transposed ([N, K], like nn.Linear's
// weight), the layout oneDNN is fastest with. Tiles are ~4 MiB and at least 512 columns wide. Measured
// (2 threads, quiet, interleaved with dense, ours/dense at M = 256 for qkv, gate_up, down): 1 MiB tiles
// (one 64-column block at K = 6144) 1.14-1.42x, 4 MiB 1.12-1.13x, 16 MiB 1.15-1.19x, 32-64 MiB
// 1.15-1.20x; at M = 1024 all within 1.03-1.11x. The buffer is kept per thread between calls.
at::Tensor& tile_buffer(int64_t rows, int64_t cols, at::ScalarType ct) {
  thread_local at::Tensor buf;
  if (!buf.defined() || buf.scalar_type() != ct || buf.numel() < rows * cols) {
    buf = at::empty({rows * cols}, at::TensorOptions().dtype(ct));
  }
  return buf;
}

void run_large_m(const Config& cfg, const at::Tensor& x2, const Packed& p, const c10::optional<at::Tensor>& bias,
                 at::Tensor& out2) {
  // bf16 activations multiply bf16 weights (what dense BF16 runs); fp32 and fp16 use an fp32 GEMM
  // (CPUs without AVX512-FP16 have no fast fp16 GEMM, and fp32 keeps every bit of both).
  const at::ScalarType ct = x2.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  const bool transposed = ct == at::kBFloat16 && cfg.isa == Isa::Avx512 && cfg.bf16_dot;
  const int64_t elt = ct == at::kBFloat16 ? 2 : 4;
  static const int64_t kTileBytes = [] {  // GPTQ_ASCEND_CPU_TILE_KIB: tuning knob, read once
    const char* e = std::getenv("GPTQ_ASCEND_CPU_TILE_KIB");
    return (e && std::atol(e) > 0 ? std::atol(e) : 4096L) << 10;
  }();
  constexpr int64_t kMinTileCols = 512;
  const int64_t tile_blocks = std::min<int64_t>(
      p.nblk, std::max<int64_t>(kMinTileCols / kBlockN, kTileBytes / (p.Kp * kBlockN * elt)));
  at::Tensor xg = gather_rows(x2, p, ct);
  // Rows of the transposed tile are padded by one cache line: with Kp = 2048 they would be exactly 4 KiB
  // apart, and the 16 row stores of each 16x16 transpose would all land in one L1 set.
  const int64_t tcols = tile_blocks * kBlockN;
  at::Tensor wbuf = transposed
      ? tile_buffer(tcols, p.Kp + 32, ct).narrow(0, 0, tcols * (p.Kp + 32)).view({tcols, p.Kp + 32}).narrow(1, 0, p.Kp)
      : tile_buffer(p.Kp, tcols, ct).narrow(0, 0, p.Kp * tcols).view({p.Kp, tcols});
  c10::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->to(ct);
  const bool direct = out2.scalar_type() == ct;
  for (int64_t b0 = 0; b0 < p.nblk; b0 += tile_blocks) {
    const int64_t b1 = std::min(b0 + tile_blocks, p.nblk);
    const int64_t n0 = b0 * kBlockN;
    const int64_t nv = std::min(b1 * kBlockN, p.N) - n0;
    at::Tensor w;
    if (transposed) {
      dequant_blocks_t_bf16(p, b0, b1, wbuf);
      w = wbuf.narrow(0, 0, nv).t();
    } else {
      dequant_blocks(cfg, p, b0, b1, wbuf);
      w = wbuf.narrow(1, 0, nv);
    }
    at::Tensor dst = out2.narrow(1, n0, nv);
    if (direct) {
      if (bias_c) at::addmm_out(dst, bias_c->narrow(0, n0, nv), xg, w);
      else at::mm_out(dst, xg, w);
    } else {
      dst.copy_(bias_c ? at::addmm(bias_c->narrow(0, n0, nv), xg, w) : at::mm(xg, w));
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------------
void gemm_into(const at::Tensor& x, const Packed& p, const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  const at::Tensor x2 = x.reshape({-1, p.K}).contiguous();
  at::Tensor out2 = out.view({-1, p.N});
  const int64_t M = x2.size(0);
  if (M == 0) return;
  Config cfg;
  {
    std::lock_guard<std::mutex> lock(g_config_mutex);
    cfg = config();
  }
  const bool dot = cfg.bf16_dot && x2.scalar_type() == at::kBFloat16;
  const bool brgemm = dot && brgemm_on(cfg);  // brgemm_on implies bf16_dot
  if (M <= (dot ? small_m_max_bf16(cfg, brgemm) : cfg.small_m_max_f32)) run_small_m(cfg, x2, p, bias, out2);
  else if (brgemm) run_large_m_brgemm(x2, p, bias, out2);
  else run_large_m(cfg, x2, p, bias, out2);
}

at::Tensor cpu_gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const c10::optional<at::Tensor>& zeros, const at::Tensor& row_map, const at::Tensor& group_ptr,
                    const c10::optional<at::Tensor>& bias, int64_t bits, double sym_zero, int64_t in_features,
                    int64_t out_features) {
  const char* op = "gptq_ascend::cpu_gemm";
  Packed p = check_packed(op, codes, scales, zeros, row_map, group_ptr, bits, sym_zero, in_features, out_features);
  check_x(op, x, p);
  check_bias(op, bias, p);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor out = at::empty(shape, x.options());
  gemm_into(x, p, bias, out);
  return out;
}

at::Tensor& cpu_gemm_out(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& zeros, const at::Tensor& row_map,
                         const at::Tensor& group_ptr, const c10::optional<at::Tensor>& bias, int64_t bits,
                         double sym_zero, int64_t in_features, int64_t out_features, at::Tensor& out) {
  const char* op = "gptq_ascend::cpu_gemm.out";
  Packed p = check_packed(op, codes, scales, zeros, row_map, group_ptr, bits, sym_zero, in_features, out_features);
  check_x(op, x, p);
  check_bias(op, bias, p);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  TORCH_CHECK(out.device().is_cpu(), op, ": out must be a CPU tensor, got one on ", out.device());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape), op, ": out must have shape ", at::IntArrayRef(shape), ", got ",
              out.sizes());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  gemm_into(x, p, bias, out);
  return out;
}

at::Tensor cpu_dequant(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                       const at::Tensor& row_map, const at::Tensor& group_ptr, int64_t bits, double sym_zero,
                       int64_t in_features, int64_t out_features, at::ScalarType dtype) {
  const char* op = "gptq_ascend::cpu_dequant";
  Packed p = check_packed(op, codes, scales, zeros, row_map, group_ptr, bits, sym_zero, in_features, out_features);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble, op,
              ": dtype must be float32, bfloat16, float16 or float64, got ", dtype);
  Config cfg;
  {
    std::lock_guard<std::mutex> lock(g_config_mutex);
    cfg = config();
  }
  // fp32 is exact ((q - z) * s has <= 20 significant bits); bf16 rounds once from it in the kernel;
  // fp16/fp64 convert from fp32 (one rounding, or none), as format.dequantize does.
  const at::ScalarType kt = dtype == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  at::Tensor wp = at::empty({p.Kp, p.nblk * kBlockN}, codes.options().dtype(kt));
  dequant_blocks(cfg, p, 0, p.nblk, wp);
  // Back to checkpoint row order: checkpoint row r sits at padded row i where row_map[i] == r.
  std::vector<int64_t> inv(static_cast<size_t>(p.K), -1);
  const int32_t* rm = p.row_map.data_ptr<int32_t>();
  for (int64_t i = 0; i < p.Kp; ++i) {
    if (rm[i] >= 0) {
      TORCH_CHECK(rm[i] < p.K && inv[rm[i]] < 0, op, ": row_map must name each of the ", p.K,
                  " input rows once; entry ", i, " is ", rm[i]);
      inv[rm[i]] = i;
    }
  }
  for (int64_t r = 0; r < p.K; ++r) TORCH_CHECK(inv[r] >= 0, op, ": row_map never names input row ", r);
  at::Tensor idx = at::from_blob(inv.data(), {p.K}, at::kLong).clone();
  at::Tensor w = wp.index_select(0, idx).narrow(1, 0, p.N);
  return w.to(dtype).contiguous();
}

// isa: "" keeps it, "reset" restores the start-up settings (environment included) before the other
// arguments apply; small_m_max: >= 0 sets the switch-over for both paths, small_m_max_f32 >= 0 then
// overrides the fp32 path's.
std::string cpu_kernel_config(const std::string& isa, int64_t small_m_max, int64_t small_m_max_f32, int64_t w8a8,
                              int64_t brgemm) {
  std::lock_guard<std::mutex> lock(g_config_mutex);
  Config& c = config();
  if (isa == "reset") c = make_config();
  else if (!isa.empty()) set_isa(c, isa);
  if (small_m_max >= 0) c.small_m_max_bf16 = c.small_m_max_f32 = small_m_max;
  if (small_m_max_f32 >= 0) c.small_m_max_f32 = small_m_max_f32;
  if (w8a8 >= 0) c.w8a8 = w8a8 != 0;
  if (brgemm >= 0) c.brgemm = brgemm != 0;
  return describe(c);
}

}  // namespace
}  // namespace gptq_cpu

// The namespace is shared with the Ascend library's ops, hence FRAGMENT: either library may be loaded
// first, and TORCH_LIBRARY would forbid the second from defining ops in `gptq_ascend`.
TORCH_LIBRARY_FRAGMENT(gptq_ascend, m) {
  m.def(
      "cpu_gemm(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor row_map, Tensor group_ptr, "
      "Tensor? bias, int bits, float sym_zero, int in_features, int out_features) -> Tensor");
  m.def(
      "cpu_gemm.out(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor row_map, Tensor group_ptr, "
      "Tensor? bias, int bits, float sym_zero, int in_features, int out_features, *, Tensor(a!) out) -> Tensor(a!)");
  m.def(
      "cpu_dequant(Tensor codes, Tensor scales, Tensor? zeros, Tensor row_map, Tensor group_ptr, int bits, "
      "float sym_zero, int in_features, int out_features, ScalarType dtype) -> Tensor");
  // No tensor arguments, so no dispatch key: registered as a catch-all kernel.
  m.def("cpu_kernel_config(str isa=\"\", int small_m_max=-1, int small_m_max_f32=-1, int w8a8=-1, "
        "int brgemm=-1) -> str",
        &gptq_cpu::cpu_kernel_config);
}

TORCH_LIBRARY_IMPL(gptq_ascend, CPU, m) {
  m.impl("cpu_gemm", &gptq_cpu::cpu_gemm);
  m.impl("cpu_gemm.out", &gptq_cpu::cpu_gemm_out);
  m.impl("cpu_dequant", &gptq_cpu::cpu_dequant);
}

// `import gptq_ascend._C` loads this library, which runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "gptq-ascend CPU kernels (torch.ops.gptq_ascend)",
                                      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
