// Kernel tiers (which ISA kernels run, chosen at run time and capped by GPTQ_ASCEND_CPU_ISA), the per-tier
// tuning table (every switch-over and tile size, with where its number came from), the machine's cache
// sizes (sysfs), and the settings cpu_kernel_config reads and changes. Baseline ISA.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "host.h"

namespace gptq_cpu::host {
namespace {

// ---------------------------------------------------------------------------------------------------
// ISA tiers, the per-tier tuning table, cache sizes
// ---------------------------------------------------------------------------------------------------
// The kernels come in three instruction sets (Isa); a tier is an Isa plus the optional extensions it may
// use. Tiers, best first (a tier runs on any CPU that has its features):
//   avx512vbmi  AVX-512 F/BW/VL/DQ + BF16 + VBMI (Zen 4, Sapphire Rapids): VBMI byte-table int8 decode
//   avx512bf16  AVX-512 F/BW/VL/DQ + BF16 (Cooper Lake): vdpbf16ps, brgemm large M
//   avx512      AVX-512 F/BW/VL/DQ (Skylake-SP, Cascade Lake, Ice Lake): fp32 FMA kernels; bf16
//               activations are widened to fp32
//   avx2        AVX2 + FMA + F16C (Haswell .. Zen 3)
//   generic     the portable C++ at the baseline ISA
// VNNI (the opt-in W8A8 mode) is used by every AVX-512 tier where the CPU has it.
// GPTQ_ASCEND_CPU_ISA=<tier> caps the process at that tier: "auto" then means the best tier up to it, and
// asking for a higher one is an error. So one machine runs every lower tier's code (tests, CI, A/Bs).
constexpr const char* kTierNames[] = {"generic", "avx2", "avx512", "avx512bf16", "avx512vbmi"};

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

// The one statement of what each tier needs. A feature is a bit; its label names it in errors and in
// describe's why= field (no spaces: describe is space-separated key=value). A higher AVX-512 tier needs
// everything the lower ones do; avx2 needs only its own (the avx512 kernels use no AVX2-only code).
enum Feature : unsigned { kAvx2 = 1, kAvx512 = 2, kBf16 = 4, kVbmi = 8 };
constexpr struct { Feature f; const char* label; } kFeatureLabels[] = {
    {kAvx512, "AVX512-F/BW/VL/DQ"}, {kBf16, "AVX512-BF16"}, {kVbmi, "AVX512-VBMI"}, {kAvx2, "AVX2/FMA/F16C"}};

unsigned tier_needs(Tier t) {
  switch (t) {
    case Tier::Generic: return 0;
    case Tier::Avx2: return kAvx2;
    case Tier::Avx512: return kAvx512;
    case Tier::Avx512Bf16: return kAvx512 | kBf16;
    case Tier::Avx512Vbmi: return kAvx512 | kBf16 | kVbmi;
  }
  return 0;
}

// The features of `needs` this build and CPU do not have.
unsigned lacking(unsigned needs) {
  unsigned miss = 0;
  if ((needs & kAvx2) && !(avx2_compiled() && cpu_has("avx2"))) miss |= kAvx2;
  if ((needs & kAvx512) && !(avx512_compiled() && cpu_has("avx512"))) miss |= kAvx512;
  if ((needs & kBf16) && !cpu_has("avx512bf16")) miss |= kBf16;
  if ((needs & kVbmi) && !cpu_has("avx512vbmi")) miss |= kVbmi;
  return miss;
}

std::string labels(unsigned features) {  // comma-separated, no spaces
  std::string s;
  for (const auto& fl : kFeatureLabels)
    if (features & fl.f) s += (s.empty() ? "" : ",") + std::string(fl.label);
  return s;
}

// Why this CPU cannot run a tier, or "" when it can.
std::string tier_missing(Tier t) { return labels(lacking(tier_needs(t))); }

// The per-tier tuning table: every switch-over and tile size, and where its number came from. Sizes that
// depend on the caches scale with the sizes read from sysfs (CacheSizes below).
struct Tuning {
  // Largest M the fused kernel takes for bf16 activations, with / without the brgemm large-M path, and
  // for fp32 / fp16 activations (and bf16 ones on tiers without BF16, which are widened to fp32).
  int64_t small_m_max_bf16_brgemm, small_m_max_bf16_gemm, small_m_max_f32;
};
// Where the numbers come from (the measurements themselves: docs/notes/issue-3-cpu-kernel.md for the
// AVX-512 tiers, docs/notes/issue-10-tiers.md for avx2 and generic):
// avx512*: 2-core Zen 4, int8 Qwen3-1.7B layers, fused kernel vs brgemm, vs dequantized tiles into
//   ATen's GEMM, and fp32 FMA fused vs ATen's fp32 GEMM, interleaved, where each pair crosses.
// avx2: the AVX2 intrinsics kernels vs dequantized tiles into ATen's fp32 GEMM capped at AVX2.
// generic: the portable C++ at the baseline ISA vs ATen's fp32 GEMM at the CPU's best ISA.
constexpr Tuning kTuning[] = {
    /* generic    */ {32, 32, 32},
    /* avx2       */ {192, 192, 192},
    /* avx512     */ {256, 256, 256},
    /* avx512bf16 */ {48, 192, 256},
    /* avx512vbmi */ {48, 192, 256},
};

// Cache sizes of this machine (sysfs; per-core L2, the L3 this core shares), with the Zen 4 figures
// the table's measurements were taken on as the fallback where sysfs says nothing.
struct CacheSizes {
  int64_t l2 = 1 << 20, l3 = 32 << 20;
  bool from_sysfs = false;
};

int64_t parse_size(const std::string& s) {  // "2048K", "32M", "512"
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (v <= 0) return 0;
  const char unit = end && *end ? *end : ' ';
  return unit == 'K' ? v << 10 : unit == 'M' ? v << 20 : unit == 'G' ? v << 30 : v;
}

std::string read_line(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return "";
  char buf[64] = {0};
  const bool ok = std::fgets(buf, sizeof buf, f) != nullptr;
  std::fclose(f);
  std::string s = ok ? buf : "";
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

const CacheSizes& cache_sizes() {
  static const CacheSizes cs = [] {
    CacheSizes c;
    for (int i = 0; i < 8; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      const std::string level = read_line(dir + "level"), type = read_line(dir + "type");
      if (level.empty()) break;
      if (type == "Instruction") continue;
      const int64_t size = parse_size(read_line(dir + "size"));
      if (size <= 0) continue;
      if (level == "2") c.l2 = size, c.from_sysfs = true;
      if (level == "3") c.l3 = size, c.from_sysfs = true;
    }
    return c;
  }();
  return cs;
}

}  // namespace

int64_t pow2_floor(int64_t v) {
  int64_t r = 1;
  while (2 * r <= v) r *= 2;
  return r;
}


// brgemm large-M path: padded rows per dequantized BF16 tile of one 64-column block. 1024 rows (128 KiB)
// measured best with Zen 4's 1 MiB L2 (512 and 8192 rows slower, docs/cpu-kernel.md): L2 / 8.
int64_t brgemm_tile_rows() {
  return std::min<int64_t>(4096, std::max<int64_t>(256, pow2_floor(cache_sizes().l2 / 8 / (2 * kBlockN))));
}


// Dequantized-tile GEMM path: bytes per tile, shared by the threads. 4 MiB measured best with Zen 4's
// 32 MiB L3 (1 MiB and 16 MiB both slower at M = 256, docs/cpu-kernel.md "Paths"): L3 / 8.
// GPTQ_ASCEND_CPU_TILE_KIB overrides it (a tuning knob, read once).
int64_t gemm_tile_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("GPTQ_ASCEND_CPU_TILE_KIB");
    if (e && std::atol(e) > 0) return static_cast<int64_t>(std::atol(e)) << 10;
    return std::min<int64_t>(16 << 20, std::max<int64_t>(1 << 20, cache_sizes().l3 / 8));
  }();
  return v;
}

namespace {


const char* isa_name(const Config& c) { return kTierNames[static_cast<int>(c.tier)]; }

bool tier_by_name(const std::string& name, Tier& t) {
  for (int i = 0; i <= static_cast<int>(Tier::Avx512Vbmi); ++i)
    if (name == kTierNames[i]) return t = static_cast<Tier>(i), true;
  return false;
}

// Set the tier by name ("auto" = the best this CPU runs, up to the cap); TORCH_CHECKs that it can run.
void set_isa(Config& c, const std::string& name) {
  Tier t = Tier::Generic;
  if (name == "auto") {
    t = c.cap;
    while (t > Tier::Generic && !tier_missing(t).empty()) t = static_cast<Tier>(static_cast<int>(t) - 1);
  } else {
    TORCH_CHECK(tier_by_name(name, t), "gptq_ascend cpu: unknown isa '", name,
                "'; expected one of auto, avx512vbmi, avx512bf16, avx512, avx2, generic");
    const std::string miss = tier_missing(t);
    TORCH_CHECK(miss.empty(), "gptq_ascend cpu: isa '", name, "' requested but this CPU lacks ", miss);
    TORCH_CHECK(t <= c.cap, "gptq_ascend cpu: isa '", name, "' requested but GPTQ_ASCEND_CPU_ISA=",
                kTierNames[static_cast<int>(c.cap)], " caps this process at that tier");
  }
  c.tier = t;
  c.isa = t >= Tier::Avx512 ? Isa::Avx512 : t == Tier::Avx2 ? Isa::Avx2 : Isa::Generic;
  c.bf16_dot = t >= Tier::Avx512Bf16;
  c.vbmi = t == Tier::Avx512Vbmi;
  c.vnni = t >= Tier::Avx512 && cpu_has("avx512vnni");
  c.w8a8_ok = c.vnni || t == Tier::Avx2;  // AVX512-VNNI, or AVX2's vpmaddwd
}

Config make_config() {
  Config c;
  const char* env = std::getenv("GPTQ_ASCEND_CPU_ISA");
  if (env && *env && std::strcmp(env, "auto") != 0) {
    Tier cap;
    TORCH_CHECK(tier_by_name(env, cap), "gptq_ascend cpu: GPTQ_ASCEND_CPU_ISA='", env,
                "' is not one of auto, avx512vbmi, avx512bf16, avx512, avx2, generic");
    const std::string miss = tier_missing(cap);
    TORCH_CHECK(miss.empty(), "gptq_ascend cpu: GPTQ_ASCEND_CPU_ISA=", env, " but this CPU lacks ", miss);
    c.cap = cap;
    c.capped = true;
  }
  set_isa(c, "auto");
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

}  // namespace

Config current_config() {
  std::lock_guard<std::mutex> lock(g_config_mutex);
  return config();
}

namespace {

const Tuning& tuning(const Config& c) { return kTuning[static_cast<int>(c.tier)]; }

}  // namespace

// Largest M the fused kernel takes for activations of `dt`; `brgemm` = brgemm_on(cfg) for bf16.
int64_t small_m_max(const Config& cfg, at::ScalarType dt, bool brgemm) {
  if (dt == at::kBFloat16 && cfg.bf16_dot) {
    if (cfg.small_m_max_bf16 >= 0) return cfg.small_m_max_bf16;
    return brgemm ? tuning(cfg).small_m_max_bf16_brgemm : tuning(cfg).small_m_max_bf16_gemm;
  }
  return cfg.small_m_max_f32 >= 0 ? cfg.small_m_max_f32 : tuning(cfg).small_m_max_f32;
}

namespace {

// What the large-M path multiplies bf16 activations with: "brgemm" (oneDNN's micro-kernel on VNNI
// tiles), "bf16" (dequantized BF16 tiles into ATen's GEMM) where the CPU has native BF16 dot products,
// else "fp32" (activations widened once, fp32 tiles into ATen's fp32 GEMM: a BF16 GEMM without native
// BF16 runs 20-50x slower than fp32, issue 10).
const char* large_m_bf16_path(const Config& c) { return brgemm_on(c) ? "brgemm" : c.bf16_dot ? "bf16" : "fp32"; }

std::string cpu_features() {
  std::string s;
  for (const char* f : {"avx2", "avx512", "avx512bf16", "avx512vnni", "avx512vbmi"})
    if (cpu_has(f)) s += (s.empty() ? "" : ",") + std::string(f);
  return s.empty() ? "baseline" : s;
}

// Why the process runs tier c.tier and not a higher one (describe's why= field, worded for the log by
// backends/cpu.py): "best" (the top tier), "cap" (GPTQ_ASCEND_CPU_ISA stops it below the next tier),
// "requested" (cpu_kernel_config named a tier below one this CPU runs), or "lacks:<labels>" (the
// features this CPU lacks for the tiers above).
std::string tier_why(const Config& c) {
  constexpr Tier kTop = Tier::Avx512Vbmi;
  if (c.tier == kTop) return "best";
  const Tier above = static_cast<Tier>(static_cast<int>(c.tier) + 1);
  if (above > c.cap) return "cap";
  if (tier_missing(above).empty()) return "requested";
  unsigned miss = 0;
  for (int t = static_cast<int>(above); t <= static_cast<int>(kTop); ++t)
    miss |= lacking(tier_needs(static_cast<Tier>(t)));
  return "lacks:" + labels(miss);
}

std::string describe(const Config& c) {
  const bool bg = brgemm_on(c);
  const CacheSizes& cs = cache_sizes();
  return std::string("isa=") + isa_name(c) + " bf16_dot=" + (c.bf16_dot ? "1" : "0") +
         " small_m_max_bf16=" + std::to_string(small_m_max(c, at::kBFloat16, bg)) +
         " small_m_max_f32=" + std::to_string(small_m_max(c, at::kFloat, false)) +
         " w8a8=" + (c.w8a8 ? (c.w8a8_ok ? "1" : "1(no-vnni:off)") : "0") +
         " brgemm=" + (!c.brgemm ? "0" : !c.bf16_dot ? "1(no-bf16:off)" : brgemm_works() ? "1" : "1(no-ukernel:off)") +
         " large_m_bf16=" + large_m_bf16_path(c) +
         " threads=" + std::to_string(at::get_num_threads()) +
         " cap=" + (c.capped ? kTierNames[static_cast<int>(c.cap)] : "none") + " why=" + tier_why(c) +
         " cpu=" + cpu_features() +
         " l2=" + std::to_string(cs.l2 >> 10) + "K l3=" + std::to_string(cs.l3 >> 10) + "K" +
         (cs.from_sysfs ? "" : "(assumed)");
}


}  // namespace

// isa: "" keeps it, "reset" restores the start-up settings (environment included) before the other
// arguments apply; small_m_max: >= 0 sets the switch-over for both paths, small_m_max_f32 >= 0 then
// overrides the fp32 path's.
std::string configure(const std::string& isa, int64_t small_m_max, int64_t small_m_max_f32, int64_t w8a8,
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


}  // namespace gptq_cpu::host
