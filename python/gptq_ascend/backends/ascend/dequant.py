"""The dequant path: W written in fp16/bf16 by a dequant kernel (AscendC or Triton), then the NPU matmul.

For layers the fused op refuses. Both kernels read the checkpoint layout (:class:`DequantArgs`) and walk
the same tile plan (:mod:`.tiling`). The AscendC kernel lives in a separate library built from
csrc/ascend only when CANN is present (:func:`ascendc_status` loads it and says why not); without it the
Triton kernel (:mod:`.triton_dequant`, triton-ascend) takes the layer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import format as fmt
from ...errors import BackendError
from ...ops import PackedWeight
from . import device, tiling
from .fused import cpu_tensors, kernel_order

NPU_DTYPES = (torch.float16, torch.bfloat16)
DEQUANT_KEYS = ("qweight", "zeros", "scales")    # PackedWeight.tensors of a dequant-path layer
IMPLS = ("ascendc", "triton")
LIB_NAME = "libgptq_ascend_npu.so"


@dataclass
class DequantArgs:
    """Inputs of the dequant kernels: the checkpoint layout, rows permuted once for act-order."""

    qweight: torch.Tensor         # int32 [ceil(K*bits/32), N], packed along K (format.pack layout)
    zeros: torch.Tensor           # [G, N] TRUE zero points (format.unpack_zeros), in scales' dtype
    scales: torch.Tensor          # [G, N] float16 / bfloat16
    group_size: int               # rows per group (K for one group)
    perm: torch.Tensor | None
    bits: int


def prepare_dequant_args(t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int) -> DequantArgs:
    """Load-time preparation of the dequant path, on CPU. Raises BackendError when the kernels can't."""
    k = in_features
    n = t.out_features
    if spec.bits not in (4, 8):
        raise BackendError(f"{spec.bits}-bit weights: the dequant kernels take int8 and int4 only")
    if t.scales.dtype not in NPU_DTYPES:
        raise BackendError(f"scales are {t.scales.dtype}: the dequant kernels take float16/bfloat16 scales")
    tiling.plan_tiling(k, n, spec.bits, spec.group_size)   # raises TilingError with the reason
    cpu = cpu_tensors(t)
    perm = kernel_order(cpu, spec, k)
    qweight = cpu.qweight
    if perm is not None:
        qweight = fmt.pack(fmt.unpack_weight_codes(cpu, spec, k)[perm], spec.bits, 0)
    zeros = fmt.unpack_zeros(cpu.qzeros, spec, n).to(cpu.scales.dtype)
    return DequantArgs(qweight=qweight.contiguous(), zeros=zeros.contiguous(), scales=cpu.scales.contiguous(),
                       group_size=spec.effective_group_size(k), perm=perm, bits=spec.bits)


def pack_dequant(args: DequantArgs, spec: fmt.QuantSpec, k: int, n: int, device: torch.device,
                 backend_name: str = "npu") -> PackedWeight:
    """Move the dequant-path arguments to the device."""
    assert args.group_size == spec.effective_group_size(k)
    return PackedWeight(backend_name, spec, k, n,
                        {"qweight": args.qweight.to(device), "zeros": args.zeros.to(device),
                         "scales": args.scales.to(device)},
                        perm=None if args.perm is None else args.perm.to(device))


# --------------------------------------------------------------------------------------------------
# The AscendC op library (csrc/ascend, built only with CANN)
# --------------------------------------------------------------------------------------------------

_lib_lock = threading.Lock()
_lib_state: tuple[bool, str] | None = None


def ascendc_library_path() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "lib" / LIB_NAME


def library_build_record() -> dict | None:
    """What setup.py's Ascend build recorded (lib/ascendc_build.json), or None when it never ran."""
    import json

    path = ascendc_library_path().with_name("ascendc_build.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def library_build_failure() -> str:
    """The recorded reason the AscendC library failed to build under CANN, or ""."""
    rec = library_build_record()
    if rec and not rec.get("built"):
        return (f"the AscendC op library failed to build for {rec.get('soc')} with CANN at {rec.get('cann')}: "
                f"{rec.get('error')} (the fused op and the Triton kernel need no custom library)")
    return ""


def ascendc_status() -> tuple[bool, str]:
    """Load csrc/ascend's op library once; (True, "") when torch.ops.gptq_ascend.ascend_dequant exists."""
    global _lib_state
    with _lib_lock:
        if _lib_state is not None:
            return _lib_state
        path = ascendc_library_path()
        torch_npu, why = device.import_torch_npu()
        if torch_npu is None:
            _lib_state = (False, why)
        elif not path.exists():
            _lib_state = (False, library_build_failure() or
                          f"the AscendC op library was not built ({path} is missing; build with "
                          "ASCEND_HOME_PATH set, see docs/ascend.md)")
        else:
            try:
                torch.ops.load_library(str(path))
                _register_fakes()
                _lib_state = (True, "")
            except Exception as e:
                _lib_state = (False, f"loading {path} failed ({type(e).__name__}: {e})")
        return _lib_state


def _register_fakes() -> None:
    """Meta/fake kernels so torch.compile can trace the ops (the library defines only PrivateUse1)."""

    @torch.library.register_fake("gptq_ascend::ascend_dequant")
    def _dequant_fake(qweight, zeros, scales, bits, group_size, in_features, dtype):
        return qweight.new_empty((in_features, qweight.shape[1]), dtype=dtype)

    @torch.library.register_fake("gptq_ascend::ascend_gemm")
    def _gemm_fake(x, qweight, zeros, scales, perm, bias, bits, group_size, in_features):
        return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def impl_status(impl: str) -> tuple[bool, str]:
    """Whether the ``impl`` dequant kernel ("ascendc" or "triton") can run on this machine."""
    if impl == "ascendc":
        return ascendc_status()
    if impl == "triton":
        return device.npu_triton_status()
    raise BackendError(f"dequant kernel {impl!r}; expected one of {', '.join(IMPLS)}")


def preferred_impl() -> str:
    """The AscendC kernel when its library is loaded, else the Triton kernel."""
    return "ascendc" if ascendc_status()[0] else "triton"


_triton_ub_cache: dict[str, int] = {}


def _triton_ub(dev: torch.device) -> int:
    """The Triton kernel's UB budget on ``dev``'s SoC, asked once per device (not per call)."""
    key = str(dev)
    if key not in _triton_ub_cache:
        soc = device.soc_name(dev)
        ub = tiling.triton_ub_bytes(soc)
        if not ub:
            raise BackendError(f"Triton dequant: the Unified Buffer of {soc} is not known (the kernels cover "
                               "Atlas A2/A3 only)")
        _triton_ub_cache[key] = ub
    return _triton_ub_cache[key]


def dequant_kernel_order(packed: PackedWeight, dtype: torch.dtype, impl: str) -> torch.Tensor:
    """W in kernel (permuted) row order, in ``dtype``, written by the ``impl`` kernel."""
    p = packed.tensors
    k = packed.in_features
    gs = packed.spec.effective_group_size(k)
    if impl == "ascendc":
        return torch.ops.gptq_ascend.ascend_dequant(p["qweight"], p["zeros"], p["scales"], packed.spec.bits,
                                                    gs, k, dtype)
    from . import triton_dequant

    on_npu = p["qweight"].device.type == "npu"
    cores = device.vector_cores() if on_npu else tiling.VECTOR_CORES_910B3
    ub = _triton_ub(p["qweight"].device) if on_npu else tiling.TRITON_UB_BYTES
    return triton_dequant.dequant_triton(p["qweight"], p["zeros"], p["scales"], packed.spec.bits, gs, k,
                                         dtype, core_num=cores, ub_bytes=ub)


def dequant_gemm(x2: torch.Tensor, packed: PackedWeight, impl: str) -> torch.Tensor:
    """One dequant-path call on the 2-D (already gathered) activation."""
    if impl == "ascendc":
        p = packed.tensors
        return torch.ops.gptq_ascend.ascend_gemm(x2, p["qweight"], p["zeros"], p["scales"], None, None,
                                                 packed.spec.bits,
                                                 packed.spec.effective_group_size(packed.in_features),
                                                 packed.in_features)
    return torch.matmul(x2, dequant_kernel_order(packed, x2.dtype, impl))
