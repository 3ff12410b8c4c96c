"""The Ascend NPU backend ("npu"): picks one path per layer at load time and runs it per call.

Paths (the pieces live in ``backends/ascend/``, see its ``__init__``), chosen in :func:`repack_npu` with
a log line whenever a layer leaves the fused path:

* ``fused``: ``torch_npu.npu_weight_quant_batchmatmul`` with arguments built once (``ascend.fused``);
* ``dequant``: the AscendC kernel (csrc/ascend) or, when that library was not built, the Triton kernel
  writes W in fp16/bf16 from the checkpoint layout, then the NPU matmul (``ascend.dequant``);
* ``dense``: W dequantized once at load time and kept in the activation dtype; the last resort (2/3-bit
  layers, or g_idx patterns no kernel takes), logged as a warning because it gives up the memory saving.

The state of a packed layer lives ONLY in ``PackedWeight.tensors`` / ``perm`` / ``spec`` (the vLLM plugin
keeps the tensors as layer buffers and rebuilds a plain PackedWeight on every call); the path is told by
the tensor names (:func:`packed_path`), the dequant kernel by the backend object
(:meth:`NpuBackend.dequant_impl`). Nothing here has run on an NPU unless a hardware report says so.
"""

from __future__ import annotations

import logging
import os

import torch

from .. import format as fmt
from ..errors import BackendError
from ..ops import Backend, PackedWeight, check_gemm_args, register_backend
from .ascend import dequant, fused
from .ascend import device as npu_device

logger = logging.getLogger(__name__)

NPU_DTYPES = dequant.NPU_DTYPES
# Force a path for every layer (debugging and benchmarks): auto | fused | ascendc | triton | dense.
MODE_ENV = "GPTQ_ASCEND_NPU_MODE"
MODES = ("auto", "fused", "ascendc", "triton", "dense")
DENSE_KEYS = ("dense_weight",)
PATH_KEYS = (("fused", fused.FUSED_KEYS), ("dequant", dequant.DEQUANT_KEYS), ("dense", DENSE_KEYS))


def packed_path(packed: PackedWeight) -> str:
    """"fused", "dequant" or "dense", from the tensor names."""
    names = set(packed.tensors)
    for path, keys in PATH_KEYS:
        if names == set(keys):
            return path
    raise BackendError(f"{packed.backend}: packed tensors {sorted(names)} match no NPU path")


def mode_from_env() -> str:
    mode = os.environ.get(MODE_ENV, "auto")
    if mode not in MODES:
        raise BackendError(f"{MODE_ENV}={mode!r}; expected one of {', '.join(MODES)}")
    return mode


def repack_npu(t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int, mode: str = "auto",
               device: torch.device | None = None, backend_name: str = "npu") -> PackedWeight:
    """Load-time preparation for the NPU. ``mode``: auto | fused | ascendc | triton | dense."""
    fmt.validate_layer("layer", t, spec, in_features)
    k, n = in_features, t.out_features
    if device is None:
        device = t.qweight.device if t.qweight.device.type == "npu" else npu_device.default_device()
    what = f"{k}->{n} {spec.bits}-bit group {spec.group_size}{' act-order' if t.g_idx is not None else ''}"
    reason = ""
    chosen = mode
    if mode in ("auto", "fused"):
        ok, reason = fused.fused_limits(spec, k, n, npu_device.soc_name(device))
        if ok:
            try:
                return fused.pack_fused(fused.prepare_fused_args(t, spec, k), spec, k, n, device, backend_name)
            except BackendError as e:
                reason = str(e)
        if mode == "fused":
            raise BackendError(f"npu fused path refuses layer {what}: {reason}")
        chosen = dequant.preferred_impl()
    if chosen in dequant.IMPLS:
        status = dequant.impl_status(chosen)
        try:
            if not status[0]:
                raise BackendError(f"{chosen} dequant unavailable: {status[1]}")
            args = dequant.prepare_dequant_args(t, spec, k)
            if reason:
                logger.info("gptq_ascend npu: layer %s -> %s dequant + NPU matmul (fused op refused: %s)",
                            what, chosen, reason)
            return dequant.pack_dequant(args, spec, k, n, device, backend_name)
        except BackendError as e:
            if mode != "auto":
                raise
            reason = f"{reason}; {e}" if reason else str(e)
    # dense: the last resort
    cpu = fused.cpu_tensors(t)
    w = fmt.dequantize(cpu, spec, k, torch.float32).to(t.scales.dtype if t.scales.dtype in NPU_DTYPES
                                                   else torch.float16)
    logger.warning("gptq_ascend npu: layer %s kept DENSE on the NPU (%.1f MB instead of ~%.1f MB): %s",
                   what, w.numel() * w.element_size() / 1e6, k * n * spec.bits / 8e6, reason or "forced")
    return PackedWeight(backend_name, spec, k, n, {"dense_weight": w.to(device)})


def gemm_packed(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                impl: str | None = None) -> torch.Tensor:
    """The per-call work of every path, device-agnostic (the argument checks are the caller's).
    ``impl`` is the dequant kernel of a dequant-path layer (default: the AscendC one when loaded)."""
    lead = x.shape[:-1]
    x2 = fused.fused_activation(x, packed.perm)
    path = packed_path(packed)
    if path == "fused":
        y = fused.fused_gemm(x2, packed)
    elif path == "dequant":
        y = dequant.dequant_gemm(x2, packed, impl or dequant.preferred_impl())
    else:
        y = torch.matmul(x2, packed.tensors["dense_weight"].to(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, packed.out_features)


def dequant_packed(packed: PackedWeight, dtype: torch.dtype = torch.float16, impl: str | None = None) -> torch.Tensor:
    """W [K, N] in the checkpoint's K order (the op contract's ``dequant``); ``impl`` as in gemm_packed."""
    if dtype not in NPU_DTYPES:
        raise BackendError(f"{packed.backend} dequant: dtype {dtype}; expected float16 or bfloat16")
    path = packed_path(packed)
    if path == "dense":
        w = packed.tensors["dense_weight"].to(dtype)
    elif path == "dequant":
        w = dequant.dequant_kernel_order(packed, dtype, impl or dequant.preferred_impl())
    else:
        w = fused.fused_weight_model(packed, dtype)
    if packed.perm is not None:   # back to the checkpoint's K order
        w = w.index_select(0, torch.argsort(packed.perm))
    return w


class NpuBackend(Backend):
    name = "npu"

    def available(self) -> tuple[bool, str]:
        return npu_device.npu_status()

    def can_implement(self, spec: fmt.QuantSpec, in_features: int, out_features: int) -> tuple[bool, str]:
        # Every layer has a path here (dense at worst, with a warning in repack).
        return True, ""

    def mode(self) -> str:
        """The path repack forces (GPTQ_ASCEND_NPU_MODE, default auto)."""
        return mode_from_env()

    def dequant_impl(self) -> str:
        """The dequant kernel for this backend's dequant-path layers: the AscendC one when its library is
        loaded, unless GPTQ_ASCEND_NPU_MODE=triton."""
        return "triton" if self.mode() == "triton" else dequant.preferred_impl()

    def repack(self, t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int) -> PackedWeight:
        return repack_npu(t, spec, in_features, self.mode(), backend_name=self.name)

    def gemm(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        check_gemm_args(x, packed, bias, NPU_DTYPES, self.name)
        return gemm_packed(x, packed, bias, self.dequant_impl())

    def dequant(self, packed: PackedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return dequant_packed(packed, dtype, self.dequant_impl())


register_backend(NpuBackend())
