// Large M: the weights dequantized tile by tile, each tile multiplied by oneDNN's brgemm micro-kernel
// (native BF16) or ATen's GEMM (elsewhere), so prefill runs at the dense GEMM's speed. Baseline ISA.
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <exception>

#include "host.h"

namespace gptq_cpu::host {

// ---------------------------------------------------------------------------------------------------
// Dequantization of blocks [b0, b1) into a [Kp][ldo] tensor (fp32 or bf16), in parallel.
// ---------------------------------------------------------------------------------------------------
void dequant_blocks(const Config& cfg, const Packed& p, int64_t b0, int64_t b1, at::Tensor& dst) {
  DequantArgs d;
  static_cast<PackedView&>(d) = packed_view(p);
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

namespace {
void dequant_blocks_t_bf16(const Packed& p, int64_t b0, int64_t b1, at::Tensor& dst) {
  DequantArgs d;
  static_cast<PackedView&>(d) = packed_view(p);
  d.out = dst.data_ptr();
  d.ldo = dst.stride(0);
  d.b_origin = b0;
  d.out_type = OutType::BF16;
  parallel_blocks(b1 - b0, [&](int64_t c0, int64_t c1) { avx512::dequant_t_bf16(d, b0 + c0, b0 + c1); });
}
}  // namespace

// Large M, bf16 activations, AVX512-BF16: dequantize-and-multiply fused per thread through oneDNN's
// brgemm micro-kernel (ATen's at::native::cpublas::brgemm; the oneDNN "ukernel" API, made for exactly
// this: the caller produces B tiles, oneDNN supplies the register-blocked multiply).
//
// Why not a plain GEMM on a dequantized tile (run_large_m below): that writes each tile out (4 MiB,
// past L2), then oneDNN's matmul reads it back and repacks it into its own blocked "VNNI" layout
// before multiplying: two extra passes over every weight, 1.14-1.37x oneDNN's time at M = 256 here
// (interleaved, 2 threads) against 1.02-1.06x this way. The brgemm B operand IS the VNNI layout
// ([k-pair][column][k, k+1]), which is the order our codes are already stored in, so the
// dequantization writes it directly with no transpose, one L2-resident tile of brgemm_tile_rows() rows x 64
// columns at a time, and the GEMM consumes it while it is hot. Threads take
// 64-column blocks from a shared counter; each accumulates its block's [M, 64] result in fp32 over the
// K chunks, then adds the bias and rounds once, like the small-M kernels.
constexpr int64_t kBrgemmM = 512;    // most activation rows per brgemm call

namespace {
// Rows for the next brgemm call: kBrgemmM, else the largest power of two <= the rows left. ATen keeps
// every generated micro-kernel, keyed by its shape, in a per-thread map that is never pruned; serving
// sees every prefill length, so the row counts must come from a small fixed set (here <= 10 values).
int64_t brgemm_rows(int64_t left) {
  return left >= kBrgemmM ? kBrgemmM : pow2_floor(left);
}
}  // namespace

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

namespace {
// acc [M][64] fp32 (+ bias) -> bf16 output columns [0, nv), rounded once.
void store_rows_bf16(const float* acc, const float* bias, int64_t M, int64_t nv, at::BFloat16* out, int64_t ldo) {
  for (int64_t m = 0; m < M; ++m) {
    const float* cr = acc + m * kBlockN;
    at::BFloat16* orow = out + m * ldo;
    for (int64_t n = 0; n < nv; ++n) orow[n] = static_cast<at::BFloat16>(bias ? cr[n] + bias[n] : cr[n]);
  }
}
}  // namespace

void run_large_m_brgemm(const at::Tensor& x2, const Packed& p, const c10::optional<at::Tensor>& bias,
                        at::Tensor& out2) {
  const int64_t M = x2.size(0);
  const at::Tensor xg = gather_rows(x2, p, at::kBFloat16).contiguous();  // [M, Kp]
  const auto* A = reinterpret_cast<const at::BFloat16*>(xg.data_ptr());
  const int64_t lda = xg.stride(0);
  at::Tensor bias32;
  if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();
  const float* bias_p = bias.has_value() ? bias32.data_ptr<float>() : nullptr;
  DequantArgs d0;
  static_cast<PackedView&>(d0) = packed_view(p);
  const int64_t ldo = out2.stride(0);
  auto* out_base = reinterpret_cast<at::BFloat16*>(out2.data_ptr());  // out has x's dtype (checked)
  const int64_t kc_max = std::min(p.Kp, brgemm_tile_rows());
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

namespace {
// Large M: dequantize column tiles into a reused buffer and hand each to ATen's GEMM (oneDNN/MKL).
// With AVX512-BF16 and bf16 activations the tile is written transposed ([N, K], like nn.Linear's
// weight), the layout oneDNN is fastest with, else fp32 [K, N]. Tiles are gemm_tile_bytes() (config.cpp)
// and at least 512 columns wide. The buffer is kept per thread between calls.
at::Tensor& tile_buffer(int64_t rows, int64_t cols, at::ScalarType ct) {
  thread_local at::Tensor buf;
  if (!buf.defined() || buf.scalar_type() != ct || buf.numel() < rows * cols) {
    buf = at::empty({rows * cols}, at::TensorOptions().dtype(ct));
  }
  return buf;
}
}  // namespace

void run_large_m(const Config& cfg, const at::Tensor& x2, const Packed& p, const c10::optional<at::Tensor>& bias,
                 at::Tensor& out2) {
  // bf16 activations multiply bf16 weights (what dense BF16 runs); fp32 and fp16 use an fp32 GEMM
  // (CPUs without AVX512-FP16 have no fast fp16 GEMM, and fp32 keeps every bit of both).
  // Without native BF16 dot products (every tier below avx512bf16) bf16 activations are widened once
  // and multiplied in fp32 too: ATen's BF16 GEMM there runs 20-50x slower than its fp32 one (issue 10).
  const at::ScalarType ct = x2.scalar_type() == at::kBFloat16 && cfg.bf16_dot ? at::kBFloat16 : at::kFloat;
  const bool transposed = ct == at::kBFloat16;
  const int64_t elt = ct == at::kBFloat16 ? 2 : 4;
  constexpr int64_t kMinTileCols = 512;
  const int64_t tile_blocks = std::min<int64_t>(
      p.nblk, std::max<int64_t>(kMinTileCols / kBlockN, gemm_tile_bytes() / (p.Kp * kBlockN * elt)));
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

}  // namespace gptq_cpu::host
