// torch ops for the Ascend NPU (PrivateUse1): gptq_ascend::ascend_dequant and gptq_ascend::ascend_gemm.
//
// Contract (the same as every gptq-ascend backend, see python/gptq_ascend/ops.py):
//   ascend_dequant(qweight, zeros, scales, bits, group_size, in_features, dtype) -> W [K, N] in `dtype`
//     qweight int32 [ceil(K*bits/32), N] (GPTQ layout, rows in kernel order), zeros = TRUE zero points and
//     scales [G, N] in float16 or bfloat16, bits 4 or 8, dtype float16 or bfloat16.
//   ascend_gemm(x, qweight, zeros, scales, perm?, bias?, bits, group_size, in_features) -> y = x[..., perm] @ W + bias
//     in x's dtype, shape [..., N]; the matmul is torch's NPU matmul (fp32 accumulation in the cube unit).
// Meta/fake kernels are registered from Python (gptq_ascend.backends.ascend.dequant._register_fakes).
//
// Built only with CANN + torch_npu (top-level CMakeLists.txt); NOT compiled or run on the machines this
// project is developed on (no CANN, no NPU): see docs/ascend.md.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "acl/acl.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"
#include "torch_npu/csrc/framework/OpCommand.h"

#include "../tiling.h"

namespace gptq_ascend {

int LaunchGptqDequant(void* stream, bool param_bf16, bool out_bf16, void* qweight, void* zeros, void* scales,
                      void* out, const DequantTiling& t);

namespace {

uint32_t VectorCoreNum(int32_t device)
{
    int64_t aiv = 0;
    aclError rc = aclGetDeviceCapability(static_cast<uint32_t>(device), ACL_DEVICE_INFO_VECTOR_CORE_NUM, &aiv);
    TORCH_CHECK(rc == ACL_SUCCESS && aiv > 0, "gptq_ascend: aclGetDeviceCapability(VECTOR_CORE_NUM) failed (",
                rc, ")");
    return static_cast<uint32_t>(aiv);
}

bool IsHalfOrBf16(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// The SoC the kernel library was compiled for (CMakeLists.txt: SOC_VERSION) and its Unified Buffer.
#if !defined(GPTQ_ASCEND_SOC)
#error "GPTQ_ASCEND_SOC (the SOC_VERSION the kernels are compiled for) must be defined"
#endif
const uint32_t kUbBytes = UbBytesForSoc(GPTQ_ASCEND_SOC);

}  // namespace

at::Tensor ascend_dequant(const at::Tensor& qweight, const at::Tensor& zeros, const at::Tensor& scales, int64_t bits,
                          int64_t group_size, int64_t in_features, at::ScalarType dtype)
{
    TORCH_CHECK(qweight.device().type() == c10::DeviceType::PrivateUse1,
                "gptq_ascend::ascend_dequant: qweight must be an NPU tensor, got ", qweight.device());
    TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2,
                "gptq_ascend::ascend_dequant: qweight must be 2-D int32, got ", qweight.scalar_type(), " ",
                qweight.sizes());
    TORCH_CHECK(bits == 4 || bits == 8, "gptq_ascend::ascend_dequant: bits must be 4 or 8, got ", bits);
    TORCH_CHECK(IsHalfOrBf16(dtype), "gptq_ascend::ascend_dequant: dtype must be float16 or bfloat16, got ", dtype);
    TORCH_CHECK(IsHalfOrBf16(scales.scalar_type()) && zeros.scalar_type() == scales.scalar_type(),
                "gptq_ascend::ascend_dequant: zeros and scales must share one dtype, float16 or bfloat16; got ",
                zeros.scalar_type(), " and ", scales.scalar_type());
    TORCH_CHECK(in_features > 0 && in_features <= 0xFFFFFFFFLL && qweight.size(1) > 0,
                "gptq_ascend::ascend_dequant: empty or oversized layer");
    const uint32_t k = static_cast<uint32_t>(in_features);
    const uint32_t n = static_cast<uint32_t>(qweight.size(1));

    TORCH_CHECK(kUbBytes > kUbReserveBytes, "gptq_ascend::ascend_dequant: the kernels were compiled for ",
                GPTQ_ASCEND_SOC, ", whose Unified Buffer they do not know (they cover Atlas A2/A3 only)");
    DequantTiling t;
    TilingStatus st = ComputeTiling(k, n, static_cast<uint32_t>(bits), group_size, 2,
                                    VectorCoreNum(qweight.device().index()), kUbBytes - kUbReserveBytes, &t);
    TORCH_CHECK(st == TilingStatus::kOk, "gptq_ascend::ascend_dequant: ", TilingStatusMessage(st));
    TORCH_CHECK(qweight.size(0) == static_cast<int64_t>(t.packedRows), "gptq_ascend::ascend_dequant: qweight has ",
                qweight.size(0), " rows; ", t.packedRows, " expected for in_features=", in_features, " at ", bits,
                " bits");
    TORCH_CHECK(zeros.dim() == 2 && zeros.size(0) == t.numGroups && zeros.size(1) == n && scales.sizes() == zeros.sizes(),
                "gptq_ascend::ascend_dequant: zeros/scales must be (", t.numGroups, ", ", n, "), got ", zeros.sizes(),
                " and ", scales.sizes());
    TORCH_CHECK(zeros.device() == qweight.device() && scales.device() == qweight.device(),
                "gptq_ascend::ascend_dequant: all inputs must be on ", qweight.device());

    at::Tensor q = qweight.contiguous();
    at::Tensor z = zeros.contiguous();
    at::Tensor s = scales.contiguous();
    at::Tensor out = at::empty({in_features, qweight.size(1)}, qweight.options().dtype(dtype));

    const bool paramBf16 = s.scalar_type() == at::kBFloat16;
    const bool outBf16 = dtype == at::kBFloat16;
    void* qp = q.data_ptr();
    void* zp = z.data_ptr();
    void* sp = s.data_ptr();
    void* op = out.data_ptr();
    aclrtStream stream = c10_npu::getCurrentNPUStream().stream();
    at_npu::native::OpCommand cmd;
    cmd.Name("gptq_ascend_dequant");
    // q, z, s and out stay alive (captured) until the handler has run on the task queue.
    cmd.SetCustomHandler([stream, paramBf16, outBf16, qp, zp, sp, op, t, q, z, s, out]() -> int {
        return LaunchGptqDequant(stream, paramBf16, outBf16, qp, zp, sp, op, t);
    });
    cmd.Run();
    return out;
}

at::Tensor ascend_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& zeros,
                       const at::Tensor& scales, const c10::optional<at::Tensor>& perm,
                       const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t in_features)
{
    TORCH_CHECK(IsHalfOrBf16(x.scalar_type()), "gptq_ascend::ascend_gemm: x must be float16 or bfloat16, got ",
                x.scalar_type());
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "gptq_ascend::ascend_gemm: x has shape ", x.sizes(),
                "; expected [..., ", in_features, "]");
    const int64_t n = qweight.size(1);
    TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == n),
                "gptq_ascend::ascend_gemm: bias must have shape (", n, ")");
    at::Tensor x2 = x.reshape({-1, in_features});
    if (perm.has_value()) {
        x2 = x2.index_select(1, *perm);
    }
    at::Tensor w = ascend_dequant(qweight, zeros, scales, bits, group_size, in_features, x.scalar_type());
    at::Tensor y = at::matmul(x2, w);
    if (bias.has_value()) {
        y = y + bias->to(y.scalar_type());
    }
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
    shape.push_back(n);
    return y.reshape(shape);
}

}  // namespace gptq_ascend

// A FRAGMENT, as csrc/cpu's registration is: TORCH_LIBRARY_FRAGMENT lets both libraries define ops of the
// gptq_ascend namespace and be loaded into one process in either order.
TORCH_LIBRARY_FRAGMENT(gptq_ascend, m)
{
    m.def("ascend_dequant(Tensor qweight, Tensor zeros, Tensor scales, int bits, int group_size, int in_features, "
          "ScalarType dtype) -> Tensor");
    m.def("ascend_gemm(Tensor x, Tensor qweight, Tensor zeros, Tensor scales, Tensor? perm, Tensor? bias, int bits, "
          "int group_size, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptq_ascend, PrivateUse1, m)
{
    m.impl("ascend_dequant", &gptq_ascend::ascend_dequant);
    m.impl("ascend_gemm", &gptq_ascend::ascend_gemm);
}
