// The CPU ops (namespace gptq_ascend): argument checks, the fused dequant-GEMM path (x gathered, then the
// ISA kernels over column blocks on all threads), the choice between it and the large-M paths, and the
// op registration.
//
// Ops (all CPU; fake/meta implementations are registered from Python in gptq_ascend/backends/cpu.py with
// torch.library.register_fake so torch.compile can trace them):
//   cpu_gemm(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor row_map, Tensor group_ptr,
//            Tensor? bias, int bits, float sym_zero, int in_features, int out_features) -> Tensor
//   cpu_gemm.out(..., *, Tensor(a!) out) -> Tensor(a!)
//   cpu_dequant(Tensor codes, Tensor scales, Tensor? zeros, Tensor row_map, Tensor group_ptr, int bits,
//               float sym_zero, int in_features, int out_features, ScalarType dtype) -> Tensor
//   cpu_kernel_config(str isa="", int small_m_max=-1, int small_m_max_f32=-1, int w8a8=-1,
//                     int brgemm=-1) -> str
//   cpu_int8_activations(int bits, int m, ScalarType dtype) -> bool   (int8_activations below)
// The packed tensors are described in kernel.h and produced by CPUBackend.repack.
//
// Baseline ISA; it calls into the AVX-512 / AVX2 units only for the tier config.cpp chose for this CPU.
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <vector>

#include "host.h"

namespace gptq_cpu::host {
namespace {

// ---------------------------------------------------------------------------------------------------
// Argument checks: every message says what was expected.
// ---------------------------------------------------------------------------------------------------
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
  const int32_t* rm = row_map.data_ptr<int32_t>();
  bool identity = Kp == in_features;
  for (int64_t i = 0; identity && i < Kp; ++i) identity = rm[i] == i;
  return Packed{codes, scales, row_map, group_ptr, zeros, bits, in_features, out_features, Kp, G, nblk,
                static_cast<float>(sym_zero), identity};
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


}  // namespace

PackedView packed_view(const Packed& p) {
  PackedView v;
  v.Kp = p.Kp;
  v.G = p.G;
  v.nblk = p.nblk;
  v.bits = static_cast<int>(p.bits);
  v.codes = p.codes.data_ptr<uint8_t>();
  v.scales = p.scales.data_ptr();
  v.scales_f16 = p.scales.scalar_type() == at::kHalf;
  v.zeros = p.zeros.has_value() ? p.zeros->data_ptr<uint8_t>() : nullptr;
  v.sym_zero = p.sym_zero;
  v.group_ptr = p.group_ptr.data_ptr<int32_t>();
  return v;
}

OutType out_type_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return OutType::F32;
    case at::kBFloat16: return OutType::BF16;
    case at::kHalf: return OutType::F16;
    default: TORCH_CHECK(false, "gptq_ascend cpu: unsupported output dtype ", st);
  }
}

namespace {
// Large-M calls of `dt` go through oneDNN's brgemm (bf16 activations on a bf16-dot tier).
bool brgemm_for(const Config& cfg, at::ScalarType dt) {
  return cfg.bf16_dot && dt == at::kBFloat16 && brgemm_on(cfg);  // brgemm_on implies bf16_dot
}
// M rows of `dt` go to the fused kernels (else to a large-M path).
bool fused_m(const Config& cfg, int64_t M, at::ScalarType dt) {
  return M <= small_m_max(cfg, dt, brgemm_for(cfg, dt));
}
}  // namespace

bool int8_activations(const Config& cfg, int64_t bits, int64_t M, at::ScalarType dt) {
  if (!cfg.w8a8 || !cfg.w8a8_ok || M < 1 || !fused_m(cfg, M, dt)) return false;  // large M: exact paths
  // 8-bit layers from the tiled M on (AVX-512 VNNI or AVX2); <=4-bit layers on AVX2 at every fused M
  // (the vpmaddubsw kernel measured 1.1-1.9x the exact one, before I4Lut, from M = 1 to the switch-over).
  return bits == 8 ? M >= kTiledMinM : cfg.isa == Isa::Avx2;
}

namespace {

void run_fused(const Config& cfg, const at::Tensor& x2, const Packed& p, const c10::optional<at::Tensor>& bias,
                 at::Tensor& out2) {
  const int64_t M = x2.size(0);
  const bool dot = cfg.bf16_dot && x2.scalar_type() == at::kBFloat16;
  GemmArgs a;
  static_cast<PackedView&>(a) = packed_view(p);
  a.N = p.N;
  a.M = M;
  bool quads = true;  // always, for CPUBackend.repack's layers; int8_activations assumes it
  for (int64_t g = 0; g <= p.G && quads; ++g) quads = p.group_ptr.data_ptr<int32_t>()[g] % 4 == 0;
  const bool w8a8 = quads && int8_activations(cfg, p.bits, M, x2.scalar_type());
  const bool w4a8 = w8a8 && p.bits != 8;  // AVX2 only (int8_activations)
  const bool tiled = cfg.isa == Isa::Avx512 && M >= kTiledMinM;
  const bool vbmi_direct = cfg.vbmi && dot && !tiled && p.bits == 8;
  const XLayout layout = w8a8 ? (cfg.isa != Isa::Avx2 ? XLayout::Int8Quads
                                 : w4a8               ? XLayout::Int8PairRows
                                                      : XLayout::Int16PairRows)
                         : dot ? (tiled ? XLayout::Bf16Pairs : XLayout::Bf16Rows)
                               : (tiled ? XLayout::F32KMajor : XLayout::F32Rows);
  XBuffers xbuf;
  gather_x(x2, p, layout, xbuf);
  switch (layout) {
    case XLayout::F32Rows: a.xf = xbuf.f32.data(); break;
    case XLayout::F32KMajor: a.xt = xbuf.f32.data(); break;
    case XLayout::Bf16Rows: a.xb = xbuf.b16.data(); break;
    case XLayout::Bf16Pairs: a.xp = xbuf.u32.data(); break;
    case XLayout::Int8Quads:
      a.xq4 = reinterpret_cast<const int32_t*>(xbuf.u32.data());
      a.xscale = xbuf.xscale.data();
      break;
    case XLayout::Int16PairRows:
      a.xq16p = xbuf.u32.data();
      a.xscale = xbuf.xscale.data();
      break;
    case XLayout::Int8PairRows:
      a.xq8p = xbuf.b16.data();
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
        r = w8a8          ? avx512::fused_gemm_w8a8(a, b0, b1)
            : vbmi_direct ? avx512_vbmi::fused_gemm_i8_bf16(a, b0, b1)
                          : avx512::fused_gemm(a, b0, b1, dot);
        break;
      case Isa::Avx2:
        r = !w8a8  ? avx2::fused_gemm(a, b0, b1)
            : w4a8 ? avx2::fused_gemm_w4a8(a, b0, b1)
                   : avx2::fused_gemm_w8a8(a, b0, b1);
        break;
      default: r = generic::fused_gemm(a, b0, b1); break;
    }
    if (!r) ok = false;
  });
  TORCH_CHECK(ok.load(), "gptq_ascend::cpu_gemm: out of memory for the per-thread accumulators (M=", M, ")");
}

// ---------------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------------
void gemm_into(const at::Tensor& x, const Packed& p, const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  const at::Tensor x2 = x.reshape({-1, p.K}).contiguous();
  at::Tensor out2 = out.view({-1, p.N});
  const int64_t M = x2.size(0);
  if (M == 0) return;
  const Config cfg = current_config();
  if (fused_m(cfg, M, x2.scalar_type())) run_fused(cfg, x2, p, bias, out2);
  else if (brgemm_for(cfg, x2.scalar_type())) run_large_m_brgemm(x2, p, bias, out2);
  else run_large_m(cfg, x2, p, bias, out2);
}

// The checks both gemm variants make; `shape` receives the output shape ([..., out_features]).
Packed check_gemm(const char* op, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& zeros, const at::Tensor& row_map, const at::Tensor& group_ptr,
                  const c10::optional<at::Tensor>& bias, int64_t bits, double sym_zero, int64_t in_features,
                  int64_t out_features, std::vector<int64_t>& shape) {
  Packed p = check_packed(op, codes, scales, zeros, row_map, group_ptr, bits, sym_zero, in_features, out_features);
  check_x(op, x, p);
  check_bias(op, bias, p);
  shape.assign(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return p;
}

at::Tensor cpu_gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const c10::optional<at::Tensor>& zeros, const at::Tensor& row_map, const at::Tensor& group_ptr,
                    const c10::optional<at::Tensor>& bias, int64_t bits, double sym_zero, int64_t in_features,
                    int64_t out_features) {
  std::vector<int64_t> shape;
  const Packed p = check_gemm("gptq_ascend::cpu_gemm", x, codes, scales, zeros, row_map, group_ptr, bias, bits,
                              sym_zero, in_features, out_features, shape);
  at::Tensor out = at::empty(shape, x.options());
  gemm_into(x, p, bias, out);
  return out;
}

at::Tensor& cpu_gemm_out(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& zeros, const at::Tensor& row_map,
                         const at::Tensor& group_ptr, const c10::optional<at::Tensor>& bias, int64_t bits,
                         double sym_zero, int64_t in_features, int64_t out_features, at::Tensor& out) {
  const char* op = "gptq_ascend::cpu_gemm.out";
  std::vector<int64_t> shape;
  const Packed p = check_gemm(op, x, codes, scales, zeros, row_map, group_ptr, bias, bits, sym_zero, in_features,
                              out_features, shape);
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
  const Config cfg = current_config();
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

std::string cpu_kernel_config(const std::string& isa, int64_t small_m_max, int64_t small_m_max_f32, int64_t w8a8,
                              int64_t brgemm) {
  return configure(isa, small_m_max, small_m_max_f32, w8a8, brgemm);
}

bool cpu_int8_activations(int64_t bits, int64_t m, at::ScalarType dtype) {
  const char* op = "gptq_ascend::cpu_int8_activations";
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, op, ": bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(m >= 0, op, ": m (rows of x) must be >= 0, got ", m);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": dtype must be float32, bfloat16 or float16 (x's dtype), got ", dtype);
  return int8_activations(current_config(), bits, m, dtype);
}

}  // namespace
}  // namespace gptq_cpu::host

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
        &gptq_cpu::host::cpu_kernel_config);
  m.def("cpu_int8_activations(int bits, int m, ScalarType dtype) -> bool", &gptq_cpu::host::cpu_int8_activations);
}

TORCH_LIBRARY_IMPL(gptq_ascend, CPU, m) {
  m.impl("cpu_gemm", &gptq_cpu::host::cpu_gemm);
  m.impl("cpu_gemm.out", &gptq_cpu::host::cpu_gemm_out);
  m.impl("cpu_dequant", &gptq_cpu::host::cpu_dequant);
}

// `import gptq_ascend._C` loads this library, which runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "gptq-ascend CPU kernels (torch.ops.gptq_ascend)",
                                      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
