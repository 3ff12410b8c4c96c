// Internal interface of the CPU extension's torch-side translation units: config.cpp (kernel tiers, the
// per-tier tuning table, cache sizes), gather.cpp (activations into the kernels' layouts), large_m.cpp
// (dequantized tiles into oneDNN's brgemm or ATen's GEMM) and ops.cpp (argument checks, the fused path,
// the ops and their registration). All of them are compiled at the baseline ISA; the ISA kernels
// (kernel_*.cpp) never include this header or any torch header (see the ODR note in kernel.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "kernel.h"

namespace gptq_cpu::host {

// ---- config.cpp --------------------------------------------------------------------------------------
enum class Isa { Generic = 0, Avx2 = 1, Avx512 = 2 };
enum class Tier { Generic = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Avx512Vbmi = 4 };

struct Config {
  Tier tier = Tier::Generic;
  Tier cap = Tier::Avx512Vbmi;   // GPTQ_ASCEND_CPU_ISA, else the top
  bool capped = false;
  Isa isa = Isa::Generic;        // the kernels the tier runs
  bool bf16_dot = false;  // bf16 activations use vdpbf16ps (tiers avx512bf16 and up)
  bool vbmi = false;      // int8 x BF16 at M < kTiledMinM with the VBMI byte-table decode (kernel_avx512_vbmi.cpp)
  // Overrides of the table's switch-overs (< 0: the table's value).
  int64_t small_m_max_bf16 = -1;
  int64_t small_m_max_f32 = -1;
  // Opt-in int8 activations (W8A8 / W4A8: AVX512-VNNI, AVX2 vpmaddwd / vpmaddubsw); which calls take
  // them is int8_activations in ops.cpp. Changes the numerics (x is rounded to 8 bits), so it is off
  // unless asked for (GPTQ_ASCEND_CPU_W8A8=1 or cpu_kernel_config).
  bool w8a8 = false;
  bool vnni = false;  // an AVX-512 tier on a CPU with AVX512-VNNI
  bool w8a8_ok = false;  // the tier has a W8A8 kernel: AVX-512 with VNNI, or AVX2
  // Large M with bf16 activations through oneDNN's brgemm micro-kernel (run_large_m_brgemm); off ->
  // dequantized tiles into ATen's GEMM (run_large_m). GPTQ_ASCEND_CPU_BRGEMM=0 or cpu_kernel_config.
  bool brgemm = true;
};

// The settings now in force (a copy: cpu_kernel_config may change them from another thread).
Config current_config();
// cpu_kernel_config's body: apply the changes, return the description (kernel_settings() parses it).
std::string configure(const std::string& isa, int64_t small_m_max, int64_t small_m_max_f32, int64_t w8a8,
                      int64_t brgemm);
// Largest M the fused kernel takes for activations of `dt`; `brgemm` = brgemm_on(cfg) for bf16.
int64_t small_m_max(const Config& cfg, at::ScalarType dt, bool brgemm);
int64_t pow2_floor(int64_t v);
int64_t brgemm_tile_rows();  // padded rows per brgemm tile (from the L2 size)
int64_t gemm_tile_bytes();   // bytes per dequantized GEMM tile (from the L3 size)

// ---- ops.cpp: the dispatch rule and the checked packed weight ----------------------------------------
// Whether cpu_gemm rounds x to int8 (the opt-in W8A8 / W4A8 kernels) for M rows of dtype `dt` on a
// `bits`-bit layer with k-quad groups (every layer CPUBackend.repack packs), under `cfg`. The one owner
// of that rule: the fused path's dispatch calls it, and so does the cpu_int8_activations op, which
// benchmarks and tests ask instead of repeating it.
bool int8_activations(const Config& cfg, int64_t bits, int64_t M, at::ScalarType dt);

struct Packed {
  at::Tensor codes, scales, row_map, group_ptr;
  c10::optional<at::Tensor> zeros;
  int64_t bits, K, N, Kp, G, nblk;
  float sym_zero;
  bool identity;  // row_map is 0, 1, ..., K-1 (no act-order, no padding): gathers are plain copies
};
// The kernels' view of a packed weight (the part GemmArgs and DequantArgs share).
PackedView packed_view(const Packed& p);
OutType out_type_of(at::ScalarType st);

// Running block ranges on all threads. Blocks are handed out from an atomic counter rather than split
// statically: on a shared machine one core is often slowed by a neighbour, and a static split would
// leave the other core idle at the end.
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

// ---- gather.cpp -----------------------------------------------------------------------------------
// The layouts the fused kernels read x in (see gather.cpp).
enum class XLayout { F32Rows, F32KMajor, Bf16Rows, Bf16Pairs, Int8Quads, Int16PairRows, Int8PairRows };
struct XBuffers {
  std::vector<float> f32, xsum, xscale;
  std::vector<uint16_t> b16;
  std::vector<uint32_t> u32;
};
// x2 [M, K] (fp32 / bf16 / fp16, contiguous) into `layout`, with the per-group sums (and for the int8
// layouts the per-group scales; xsum then sums the int8 values).
void gather_x(const at::Tensor& x2, const Packed& p, XLayout layout, XBuffers& out);
// x [M, K] -> [M, Kp] in the kernel's row order (pads zero), dtype `ct`.
at::Tensor gather_rows(const at::Tensor& x2, const Packed& p, at::ScalarType ct);

// ---- large_m.cpp ----------------------------------------------------------------------------------
// Blocks [b0, b1) of W (padded K order) into dst [Kp][ldo] (fp32 or bf16), in parallel.
void dequant_blocks(const Config& cfg, const Packed& p, int64_t b0, int64_t b1, at::Tensor& dst);
bool brgemm_works();              // oneDNN's brgemm ukernel runs a known BF16 product exactly (probed once)
bool brgemm_on(const Config& cfg);  // the large-M bf16 path is brgemm
void run_large_m_brgemm(const at::Tensor& x2, const Packed& p, const c10::optional<at::Tensor>& bias,
                        at::Tensor& out2);
void run_large_m(const Config& cfg, const at::Tensor& x2, const Packed& p, const c10::optional<at::Tensor>& bias,
                 at::Tensor& out2);

}  // namespace gptq_cpu::host
