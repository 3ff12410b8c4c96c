// Activations into the layouts the kernels read: gathered through row_map (the act-order permutation and
// the per-group padding), converted, and summed per group (the zero-point term). Baseline ISA.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "host.h"

namespace gptq_cpu::host {
namespace {

// ---------------------------------------------------------------------------------------------------
// The fused kernels' x: gather x through row_map into the layout the kernel reads, with the per-group sums.
// One routine per row, rows in parallel: this is M*K work done before the kernel starts, 15% of a
// W8A8 call at M = 16 when it was serial. Each row is first materialized as fp32 (exact for all three
// input dtypes), then written out in the kernel's layout:
//   xf  [M][Kp] fp32 (direct fp32 kernels)      xt  [Kp][M] fp32 (tiled fp32 kernels)
//   xb  [M][Kp] bf16 bits (direct BF16 kernels)  xp  [Kp/2][M] bf16 pairs (tiled BF16 kernels)
//   xq4 [Kp/4][M] int8 quads + xscale (opt-in W8A8, AVX-512 VNNI)
//   xq16p [M][Kp/2] int16 pairs, xq8p [M][Kp/2] int8 pairs + xscale (opt-in W8A8 / W4A8, AVX2): the
//   words the AVX2 tiles broadcast, regrouped here once per call, rows in parallel, rather than by each
//   block range of the kernel (up to 8 ranges per thread, parallel_blocks)
// ---------------------------------------------------------------------------------------------------
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

// max |v|, NaN if any v is NaN (sticky: std::max would drop it, and a NaN activation would then be
// quantized to -127 and give finite outputs where the exact kernels give NaN).
inline float nan_max(float acc, float b) { return (b > acc || b != b) ? b : acc; }

inline float absmax8(const float* v, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] = nan_max(acc[j], std::fabs(v[i + j]));
  for (int j = 0; i < n; ++i, ++j) acc[j] = nan_max(acc[j], std::fabs(v[i]));
  float m = 0.f;
  for (float a : acc) m = nan_max(m, a);
  return m;
}


template <class T>
void gather_t(const T* x, int64_t M, const Packed& p, XLayout layout, XBuffers& out) {
  const int32_t* gp = p.group_ptr.data_ptr<int32_t>();
  const bool identity = p.identity;
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
    case XLayout::Int16PairRows:
      out.u32.resize(static_cast<size_t>(M * Kp / 2));
      out.xscale.resize(static_cast<size_t>(M * G));
      break;
    case XLayout::Int8PairRows:
      out.b16.resize(static_cast<size_t>(M * Kp / 2));
      out.xscale.resize(static_cast<size_t>(M * G));
      break;
  }
  const bool int8 = layout == XLayout::Int8Quads || layout == XLayout::Int16PairRows ||
                    layout == XLayout::Int8PairRows;
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> row(static_cast<size_t>(Kp));
    float* v = row.data();
    for (int64_t m = m0; m < m1; ++m) {
      row_to_f32(x + m * K, p, identity, v);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i0 = gp[g], i1 = gp[g + 1];
        if (int8) {
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
        case XLayout::Int16PairRows:  // v holds integers in [-127, 127]: the int16 bits of each
          for (int64_t i = 0; i < Kp; i += 2)
            out.u32[m * (Kp / 2) + i / 2] = static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int32_t>(v[i]))) |
                                            static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int32_t>(v[i + 1])))
                                                << 16;
          break;
        case XLayout::Int8PairRows:
          for (int64_t i = 0; i < Kp; i += 2)
            out.b16[m * (Kp / 2) + i / 2] = static_cast<uint16_t>(
                static_cast<uint8_t>(static_cast<int32_t>(v[i])) |
                static_cast<uint16_t>(static_cast<uint8_t>(static_cast<int32_t>(v[i + 1]))) << 8);
          break;
      }
    }
  });
}

}  // namespace

void gather_x(const at::Tensor& x2, const Packed& p, XLayout layout, XBuffers& out) {
  const int64_t M = x2.size(0);
  switch (x2.scalar_type()) {
    case at::kFloat: gather_t(x2.data_ptr<float>(), M, p, layout, out); break;
    case at::kBFloat16: gather_t(x2.data_ptr<at::BFloat16>(), M, p, layout, out); break;
    default: gather_t(x2.data_ptr<at::Half>(), M, p, layout, out); break;
  }
}

// Identity row maps (no act-order, no padding) skip the gather.
at::Tensor gather_rows(const at::Tensor& x2, const Packed& p, at::ScalarType ct) {
  at::Tensor xc = x2.scalar_type() == ct ? x2 : x2.to(ct);
  if (p.identity) return xc;
  at::Tensor idx = p.row_map.to(at::kLong);
  at::Tensor pad = idx.lt(0);
  at::Tensor xg = xc.index_select(1, idx.clamp_min(0));
  xg.masked_fill_(pad.unsqueeze(0), 0);
  return xg;
}

}  // namespace gptq_cpu::host
