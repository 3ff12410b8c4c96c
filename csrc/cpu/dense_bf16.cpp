// The dense BF16 / FP16-weight GEMV / small-M GEMM op (dense_bf16.h): argument checks, the kernel choice from
// the tier config.cpp chose (current_config(): the same GPTQ_ASCEND_CPU_ISA cap as the GPTQ kernels),
// the portable fallback, and its registration. Baseline ISA.
//
//   cpu_dense_gemm(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor
//     x [..., K] fp32 / bf16 / fp16; weight [N, K] bf16 or fp16 with unit stride along K (vLLM's lm_head
//     weight, used in place: no copy, no repack; or lm_head.py's 16-bit copy of a float32 one); bias [N]
//     or None. Returns [..., N] in x's dtype, computed as a correct dense GEMM does (dense_bf16.h: fp32
//     sums, one rounding of the output). Built for M <= ~16 rows (the
//     weight is streamed once per call, the rows are re-read from cache per row tile); correct for any M.
//   cpu_dense_gemm.out(..., *, Tensor(a!) out) -> Tensor(a!)     out: contiguous, x's dtype, [..., N]
//     The fake implementations are registered from Python (gptq_ascend/backends/cpu.py).
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "dense_bf16.h"
#include "host.h"

namespace gptq_cpu {
namespace {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "kernel_portable.inc"  // store_out, bf16_to_float, half_to_float at the baseline ISA
#pragma GCC diagnostic pop

// The generic tier: per output, 8 independent fp32 partial sums (the compiler vectorizes them at the
// baseline ISA), the K tail into the same sums, one rounding at the store.
template <bool F16>
void portable_dense(const dense::DenseArgs& a, int64_t n0, int64_t n1) {
  const int64_t K = a.K;
  const auto wf = [](uint16_t v) { return F16 ? half_to_float(v) : bf16_to_float(v); };
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = a.w + n * a.ldw;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.xf + m * a.ldx;
      float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; ++j) s[j] += wf(w[k + j]) * x[k + j];
      for (int j = 0; k < K; ++k, ++j) s[j] += wf(w[k]) * x[k];
      const float v = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
      store_out(a.out, a.out_type, m * a.ldo + n, v + (a.bias ? a.bias[n] : 0.f));
    }
  }
}

// The AVX2 kernel's x layout (dense_bf16.h): each whole 16-chunk of a row even/odd-split, in place.
void split16_x(float* x, int64_t M, int64_t K) {
  float tmp[16];
  for (int64_t m = 0; m < M; ++m) {
    float* row = x + m * K;
    for (int64_t k = 0; k + 16 <= K; k += 16) {
      for (int j = 0; j < 8; ++j) tmp[j] = row[k + 2 * j], tmp[8 + j] = row[k + 2 * j + 1];
      std::memcpy(row + k, tmp, sizeof tmp);
    }
  }
}

}  // namespace

namespace host {
namespace {

bool dense_prefetch() {
  static const bool on = [] {
    const char* e = std::getenv("GPTQ_ASCEND_DENSE_PREFETCH");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

// Checks x / weight / bias; returns the output shape and the fp32 bias (undefined when there is none).
std::vector<int64_t> check_dense(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::Tensor& bias32) {
  TORCH_CHECK(weight.device().is_cpu() && x.device().is_cpu(), op, ": x and weight must be CPU tensors, got ",
              x.device(), " and ", weight.device());
  TORCH_CHECK((weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf) && weight.dim() == 2, op,
              ": weight must be a 2-D bfloat16 or float16 tensor [out_features, in_features], got ",
              weight.scalar_type(), " ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N > 0 && K > 0, op, ": weight must not be empty, got ", weight.sizes());
  TORCH_CHECK(weight.stride(1) == 1 && weight.stride(0) >= K, op,
              ": weight must be row-major with unit stride along in_features, got strides ", weight.strides());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x must have shape [..., ", K, "] (weight's in_features), got ",
              x.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->is_floating_point() && bias->dim() == 1 && bias->size(0) == N, op,
                ": bias must be a 1-D floating-point CPU tensor of ", N, " (out_features), got ", bias->scalar_type(),
                " ", bias->sizes(), " on ", bias->device());
    bias32 = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

void dense_into(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias32, at::Tensor& out) {
  const char* op = "gptq_ascend::cpu_dense_gemm";
  const int64_t N = weight.size(0), K = weight.size(1);
  const auto st = x.scalar_type();
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  if (M == 0) return;

  const Config cfg = current_config();
  const bool f16 = weight.scalar_type() == at::kHalf;
  const bool dot = cfg.isa == Isa::Avx512 && cfg.bf16_dot && st == at::kBFloat16 && !f16;
  at::Tensor xk = dot ? x2 : x2.to(at::kFloat).contiguous();  // bf16 / fp16 -> fp32 is exact
  if (cfg.isa == Isa::Avx2 && !f16) {
    if (xk.data_ptr() == x2.data_ptr()) xk = xk.clone();  // fp32 x arrives as is: never permute the caller's
    split16_x(xk.data_ptr<float>(), M, K);
  }
  dense::DenseArgs a;
  a.M = M;
  a.N = N;
  a.K = K;
  a.w = static_cast<const uint16_t*>(weight.data_ptr());
  a.ldw = weight.stride(0);
  a.w_f16 = f16;
  if (dot) a.xb = reinterpret_cast<const uint16_t*>(xk.data_ptr<at::BFloat16>());
  else a.xf = xk.data_ptr<float>();
  a.ldx = K;
  a.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  a.ldo = N;
  a.out_type = out_type_of(st);
  a.prefetch = dense_prefetch();
  const Isa isa = cfg.isa;
  // Units of kBlockN rows handed out by parallel_blocks (a multiple of the kernels' 4-row tiles).
  const int64_t nblk = (N + kBlockN - 1) / kBlockN;
  std::atomic<bool> ok{true};
  parallel_blocks(nblk, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kBlockN, n1 = std::min<int64_t>(b1 * kBlockN, N);
    bool r = true;
    switch (isa) {
      case Isa::Avx512: r = dot ? dense::avx512::dense_bf16dot(a, n0, n1) : dense::avx512::dense_f32(a, n0, n1); break;
      case Isa::Avx2: r = dense::avx2::dense_f32(a, n0, n1); break;
      default: a.w_f16 ? portable_dense<true>(a, n0, n1) : portable_dense<false>(a, n0, n1); break;
    }
    if (!r) ok = false;
  });
  TORCH_CHECK(ok.load(), op, ": the ", isa == Isa::Avx512 ? "AVX-512" : "AVX2",
              " kernel is not compiled into this build");
}

at::Tensor cpu_dense_gemm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  at::Tensor bias32;
  const auto shape = check_dense("gptq_ascend::cpu_dense_gemm", x, weight, bias, bias32);
  at::Tensor out = at::empty(shape, x.options());
  dense_into(x, weight, bias32, out);
  return out;
}

at::Tensor& cpu_dense_gemm_out(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               at::Tensor& out) {
  const char* op = "gptq_ascend::cpu_dense_gemm.out";
  at::Tensor bias32;
  const auto shape = check_dense(op, x, weight, bias, bias32);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == x.scalar_type() && out.is_contiguous(), op,
              ": out must be a contiguous CPU tensor of x's dtype ", x.scalar_type(), ", got ", out.scalar_type(),
              out.is_contiguous() ? "" : " (not contiguous)", " on ", out.device());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape), op, ": out must have shape ", at::IntArrayRef(shape), ", got ",
              out.sizes());
  dense_into(x, weight, bias32, out);
  return out;
}

}  // namespace
}  // namespace host
}  // namespace gptq_cpu

// A second fragment of the `gptq_ascend` library (ops.cpp holds the first): the dense op lives with its
// kernels, and ops.cpp needs no change.
TORCH_LIBRARY_FRAGMENT(gptq_ascend, m) {
  m.def("cpu_dense_gemm(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("cpu_dense_gemm.out(Tensor x, Tensor weight, Tensor? bias=None, *, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(gptq_ascend, CPU, m) {
  m.impl("cpu_dense_gemm", &gptq_cpu::host::cpu_dense_gemm);
  m.impl("cpu_dense_gemm.out", &gptq_cpu::host::cpu_dense_gemm_out);
}
