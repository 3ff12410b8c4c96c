"""The Ascend NPU backend ("npu"): torch_npu's fused weight-quant matmul, with a custom-op path beside it.

Paths, chosen per layer at load time (``repack``), with a log line whenever a layer leaves the fused path:

* ``fused``: ``torch_npu.npu_weight_quant_batchmatmul``, documented as
  ``y = x @ ((weight + antiquant_offset) * antiquant_scale)`` -- the offset is ADDED. GPTQ gives
  ``W = (q - z) * s`` with unsigned codes q, so the arguments prepared once here are
  ``weight = q - 2**(bits-1)`` (signed int8, ``(K, N)``; int4 packed by ``npu_convert_weight_to_int4pack``),
  ``antiquant_scale = scales`` and ``antiquant_offset = 2**(bits-1) - z`` (z the TRUE zero point, v1 "+1"
  applied by ``format.unpack_zeros``). Act-order: K is permuted once (``format.act_order_perm``) and the
  activation columns are gathered per call. The op's documented limits are checked in
  :func:`fused_limits`.
* ``dequant``: the AscendC kernel (``torch.ops.gptq_ascend.ascend_dequant``, csrc/ascend) or, when that
  library was not built, the Triton kernel (``triton_dequant``), writes W in fp16/bf16 straight from the
  checkpoint layout; then the NPU matmul. For layers the fused op refuses.
* ``dense``: W dequantized once at load time and kept in the activation dtype; the last resort (2/3-bit
  layers, or g_idx patterns no kernel takes), logged as a warning because it gives up the memory saving.

Everything that decides *what* is passed to the device is plain torch and runs without torch_npu
(:func:`fused_limits`, :func:`prepare_fused_args`, :func:`fused_activation`, :func:`prepare_dequant_args`,
:func:`int4pack_reference`, :func:`int4unpack_reference`), so tests/ascend checks the exact arguments on
any machine. Nothing in this module has run on an NPU unless ``pytest -m npu`` was run on one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import format as fmt
from ..errors import BackendError
from ..ops import Backend, PackedWeight, check_gemm_args, register_backend
from . import triton_dequant

logger = logging.getLogger(__name__)

# Documented limits of npu_weight_quant_batchmatmul (torch_npu 2.x, CANN 8.x).
FUSED_MAX_DIM = 65535
FUSED_GROUP_MULTIPLE = 32
INT4_PER_INT32 = 8
NPU_DTYPES = (torch.float16, torch.bfloat16)
# Force a path for every layer (debugging and benchmarks): auto | fused | ascendc | triton | dense.
MODE_ENV = "GPTQ_ASCEND_NPU_MODE"
_LIB_NAME = "libgptq_ascend_npu.so"


# --------------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------------


def _torch_npu():
    try:
        import torch_npu  # noqa: F401

        return torch_npu, ""
    except Exception as e:  # ImportError, or a torch_npu built for another torch
        return None, f"torch_npu is not importable ({type(e).__name__}: {e})"


def npu_status() -> tuple[bool, str]:
    """(True, "") when torch_npu imports and an NPU is visible, else (False, what is missing)."""
    torch_npu, why = _torch_npu()
    if torch_npu is None:
        return False, why
    try:
        if not torch.npu.is_available():
            return False, "torch_npu is installed but no NPU device is visible (driver, ASCEND_RT_VISIBLE_DEVICES?)"
    except Exception as e:
        return False, f"torch.npu.is_available() failed ({type(e).__name__}: {e})"
    return True, ""


def soc_name(device: torch.device | int | None = None) -> str | None:
    """The SoC name torch_npu reports (e.g. "Ascend910B3"), or None without an NPU."""
    ok, _ = npu_status()
    if not ok:
        return None
    try:
        return str(torch.npu.get_device_name(device))
    except Exception:
        return None


def soc_family(name: str | None) -> str:
    """"a2a3" (910B/910C: per-group and int4), "310p" (per-channel int8 only), "unknown" (no NPU
    name: limits checked as for A2/A3) or "other" (op not documented)."""
    if not name:
        return "unknown"
    n = name.lower().replace(" ", "").replace("_", "")
    if "910b" in n or "91093" in n or "910c" in n:
        return "a2a3"
    if "310p" in n:
        return "310p"
    return "other"


# --------------------------------------------------------------------------------------------------
# The fused path: arguments of npu_weight_quant_batchmatmul (plain torch)
# --------------------------------------------------------------------------------------------------


def fused_limits(spec: fmt.QuantSpec, in_features: int, out_features: int,
                 soc: str | None = None) -> tuple[bool, str]:
    """Whether npu_weight_quant_batchmatmul takes this layer, per its documented limits; else why not."""
    k, n, bits = in_features, out_features, spec.bits
    if bits not in (4, 8):
        return False, f"{bits}-bit weights: the fused op takes int8 or int4 only"
    if not (1 <= k <= FUSED_MAX_DIM and 1 <= n <= FUSED_MAX_DIM):
        return False, f"K={k}, N={n}: the fused op needs K and N in [1, {FUSED_MAX_DIM}]"
    per_group = spec.num_groups(k) > 1
    family = soc_family(soc)
    if family == "other":
        return False, f"{soc}: npu_weight_quant_batchmatmul is documented for Atlas A2/A3 and 310P only"
    if family == "310p" and (per_group or bits == 4):
        return False, f"{soc}: Atlas inference cards take per-channel int8 only (this layer is " \
                      f"{'per-group' if per_group else 'per-channel'} {bits}-bit)"
    if per_group:
        g = spec.group_size
        if g % FUSED_GROUP_MULTIPLE or not (FUSED_GROUP_MULTIPLE <= g <= k - 1):
            return False, f"group_size {g}: the fused op needs a multiple of {FUSED_GROUP_MULTIPLE} in " \
                          f"[{FUSED_GROUP_MULTIPLE}, K-1={k - 1}]"
    if bits == 4:
        if per_group and n % INT4_PER_INT32:
            return False, f"int4 per-group with N={n}: npu_convert_weight_to_int4pack needs N % 8 == 0"
        if not per_group and n % INT4_PER_INT32 and k % INT4_PER_INT32:
            return False, f"int4 with K={k}, N={n}: npu_convert_weight_to_int4pack needs K or N % 8 == 0"
    return True, ""


def _kernel_order(t: fmt.GPTQTensors, spec: fmt.QuantSpec, k: int) -> torch.Tensor | None:
    """The act-order permutation (or None), after checking that the permuted groups are contiguous runs
    of ``group_size`` rows -- what per-group kernels (vendor and ours) assume."""
    if t.g_idx is None:
        return None
    g_idx = t.g_idx.to(torch.int64).cpu()
    perm = fmt.act_order_perm(g_idx)
    ordered = g_idx[perm] if perm is not None else g_idx
    expected = fmt.default_g_idx(k, spec.group_size).to(torch.int64)
    if not torch.equal(ordered, expected):
        raise BackendError(
            "g_idx: sorted, the groups are not contiguous runs of group_size "
            f"({spec.effective_group_size(k)}) rows; no per-group kernel takes this layer")
    return perm


@dataclass
class FusedArgs:
    """What the fused path hands to npu_weight_quant_batchmatmul (before moving to the device).

    ``y = x[:, perm] @ ((weight + offset) * scale)`` with scale/offset rows repeated ``group_size`` times
    along K (or broadcast over K when ``group_size`` is 0, per-channel).
    """

    weight: torch.Tensor          # int8 [K, N]: q - 2**(bits-1), rows in kernel (permuted) order
    scale: torch.Tensor           # [G, N] per-group, or [N] per-channel; the checkpoint's dtype
    offset: torch.Tensor          # like scale: 2**(bits-1) - z, ADDED to weight by the op
    group_size: int               # antiquant_group_size: 0 for per-channel
    perm: torch.Tensor | None     # int64 [K]; x[..., perm] feeds the op
    bits: int


def prepare_fused_args(t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int) -> FusedArgs:
    """Load-time preparation of the fused path, on CPU, from the checkpoint tensors."""
    k = in_features
    n = t.out_features
    cpu = fmt.GPTQTensors(t.qweight.cpu(), t.qzeros.cpu(), t.scales.cpu(),
                          None if t.g_idx is None else t.g_idx.cpu())
    perm = _kernel_order(cpu, spec, k)
    q = fmt.unpack_weight_codes(cpu, spec, k)                 # unsigned codes [K, N]
    z = fmt.unpack_zeros(cpu.qzeros, spec, n)                  # true zero points [G, N]
    if perm is not None:
        q = q[perm]
    half = 1 << (spec.bits - 1)
    weight = (q - half).to(torch.int8)
    offset = (half - z).to(cpu.scales.dtype)                   # |offset| <= 2**bits: exact in fp16/bf16
    scale = cpu.scales
    group_size = spec.effective_group_size(k)
    if spec.num_groups(k) == 1:
        scale, offset, group_size = scale[0], offset[0], 0
    return FusedArgs(weight=weight, scale=scale.contiguous(), offset=offset.contiguous(),
                     group_size=group_size, perm=perm, bits=spec.bits)


def fused_activation(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """The 2-D activation the fused op (and the dequant path's matmul) is called with."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2.index_select(1, perm) if perm is not None else x2


def int4pack_reference(weight: torch.Tensor) -> torch.Tensor:
    """``npu_convert_weight_to_int4pack``'s documented packing, in plain torch.

    int32 ``[R, C]`` with values in [-8, 7], C % 8 == 0 -> int32 ``[R, C // 8]``: element ``8*i + j`` of a
    row goes to bits ``[4*j, 4*j + 4)`` of word i, two's complement nibbles.
    """
    if weight.dim() != 2 or weight.shape[-1] % INT4_PER_INT32:
        raise BackendError(f"int4 pack: expected [R, C] with C % 8 == 0, got {tuple(weight.shape)}")
    w = weight.to(torch.int64)
    if w.numel() and (int(w.min()) < -8 or int(w.max()) > 7):
        raise BackendError("int4 pack: values must lie in [-8, 7]")
    nib = (w & 0xF).reshape(w.shape[0], -1, INT4_PER_INT32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=w.device)
    words = (nib << shifts).sum(-1)                            # disjoint bit fields: sum == or
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def int4unpack_reference(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`int4pack_reference`: int32 ``[R, C // 8]`` -> int32 ``[R, C]`` in [-8, 7]."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=w.device)
    nib = (w.unsqueeze(-1) >> shifts) & 0xF
    signed = torch.where(nib >= 8, nib - 16, nib)
    return signed.reshape(packed.shape[0], -1).to(torch.int32)


# --------------------------------------------------------------------------------------------------
# The dequant path: arguments of the AscendC / Triton dequant kernel (plain torch)
# --------------------------------------------------------------------------------------------------


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
    triton_dequant.plan_tiling(k, n, spec.bits, spec.group_size)   # raises TilingError with the reason
    cpu = fmt.GPTQTensors(t.qweight.cpu(), t.qzeros.cpu(), t.scales.cpu(),
                          None if t.g_idx is None else t.g_idx.cpu())
    perm = _kernel_order(cpu, spec, k)
    qweight = cpu.qweight
    if perm is not None:
        qweight = fmt.pack(fmt.unpack_weight_codes(cpu, spec, k)[perm], spec.bits, 0)
    zeros = fmt.unpack_zeros(cpu.qzeros, spec, n).to(cpu.scales.dtype)
    return DequantArgs(qweight=qweight.contiguous(), zeros=zeros.contiguous(), scales=cpu.scales.contiguous(),
                       group_size=spec.effective_group_size(k), perm=perm, bits=spec.bits)


# --------------------------------------------------------------------------------------------------
# The AscendC op library (csrc/ascend, built only with CANN)
# --------------------------------------------------------------------------------------------------

_lib_lock = threading.Lock()
_lib_state: tuple[bool, str] | None = None


def ascendc_library_path() -> Path:
    return Path(__file__).resolve().parent.parent / "lib" / _LIB_NAME


def ascendc_status() -> tuple[bool, str]:
    """Load csrc/ascend's op library once; (True, "") when torch.ops.gptq_ascend.ascend_dequant exists."""
    global _lib_state
    with _lib_lock:
        if _lib_state is not None:
            return _lib_state
        path = ascendc_library_path()
        torch_npu, why = _torch_npu()
        if torch_npu is None:
            _lib_state = (False, why)
        elif not path.exists():
            _lib_state = (False, f"the AscendC op library was not built ({path} is missing; build with "
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
    lib = "gptq_ascend::ascend_dequant"

    @torch.library.register_fake(lib)
    def _dequant_fake(qweight, zeros, scales, bits, group_size, in_features, dtype):
        return qweight.new_empty((in_features, qweight.shape[1]), dtype=dtype)

    @torch.library.register_fake("gptq_ascend::ascend_gemm")
    def _gemm_fake(x, qweight, zeros, scales, perm, bias, bits, group_size, in_features):
        return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def npu_triton_status() -> tuple[bool, str]:
    ok, why = triton_dequant.available()
    if not ok:
        return False, why
    try:
        from triton.backends import backends as triton_backends

        if "ascend" not in triton_backends:
            return False, f"triton has no ascend backend (triton-ascend is not installed; backends: " \
                          f"{', '.join(sorted(triton_backends)) or 'none'})"
    except Exception as e:
        return False, f"cannot list triton backends ({type(e).__name__}: {e})"
    return npu_status()


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------


# The state of a packed layer lives ONLY in PackedWeight.tensors / perm / spec: the vLLM plugin keeps the
# tensors as layer buffers and rebuilds a plain PackedWeight from them on every call. The path is told by
# the tensor names:
FUSED_KEYS = ("weight", "scale", "offset")       # npu_weight_quant_batchmatmul arguments
DEQUANT_KEYS = ("qweight", "zeros", "scales")    # dequant-kernel inputs (AscendC or Triton)
DENSE_KEYS = ("dense_weight",)


def packed_path(packed: PackedWeight) -> str:
    """"fused", "dequant" or "dense", from the tensor names."""
    names = set(packed.tensors)
    for path, keys in (("fused", FUSED_KEYS), ("dequant", DEQUANT_KEYS), ("dense", DENSE_KEYS)):
        if names == set(keys):
            return path
    raise BackendError(f"{packed.backend}: packed tensors {sorted(names)} match no NPU path")


def fused_group_size(spec: fmt.QuantSpec, in_features: int) -> int:
    """antiquant_group_size: the group size, or 0 (per-channel) for a single group."""
    return 0 if spec.num_groups(in_features) == 1 else spec.effective_group_size(in_features)


def dequant_impl(packed: PackedWeight) -> str:
    """"ascendc" or "triton" for a dequant-path layer: npu_triton always uses Triton; npu uses the AscendC
    op when its library is loaded (unless GPTQ_ASCEND_NPU_MODE=triton), else Triton."""
    if packed.backend == "npu_triton" or os.environ.get(MODE_ENV) == "triton":
        return "triton"
    return "ascendc" if ascendc_status()[0] else "triton"


def _default_device() -> torch.device:
    ok, why = npu_status()
    if not ok:
        raise BackendError(f"npu backend: {why}")
    return torch.device("npu", torch.npu.current_device())


def repack_npu(t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int, mode: str = "auto",
               device: torch.device | None = None, backend_name: str = "npu") -> PackedWeight:
    """Load-time preparation for the NPU. ``mode``: auto | fused | ascendc | triton | dense."""
    fmt.validate_layer("layer", t, spec, in_features)
    k, n = in_features, t.out_features
    if device is None:
        device = t.qweight.device if t.qweight.device.type == "npu" else _default_device()
    what = f"{k}->{n} {spec.bits}-bit group {spec.group_size}{' act-order' if t.g_idx is not None else ''}"
    reason = ""
    chosen = mode
    if mode in ("auto", "fused"):
        ok, reason = fused_limits(spec, k, n, soc_name(device))
        if ok:
            try:
                return pack_fused(prepare_fused_args(t, spec, k), spec, k, n, device, backend_name)
            except BackendError as e:
                reason = str(e)
        if mode == "fused":
            raise BackendError(f"npu fused path refuses layer {what}: {reason}")
        chosen = "ascendc" if ascendc_status()[0] else "triton"
    if chosen in ("ascendc", "triton"):
        status = ascendc_status() if chosen == "ascendc" else npu_triton_status()
        try:
            if not status[0]:
                raise BackendError(f"{chosen} dequant unavailable: {status[1]}")
            args = prepare_dequant_args(t, spec, k)
            if reason:
                logger.info("gptq_ascend npu: layer %s -> %s dequant + NPU matmul (fused op refused: %s)",
                            what, chosen, reason)
            return pack_dequant(args, spec, k, n, device, backend_name)
        except BackendError as e:
            if mode != "auto":
                raise
            reason = f"{reason}; {e}" if reason else str(e)
    # dense: the last resort
    cpu = fmt.GPTQTensors(t.qweight.cpu(), t.qzeros.cpu(), t.scales.cpu(),
                          None if t.g_idx is None else t.g_idx.cpu())
    w = fmt.dequantize(cpu, spec, k, torch.float32).to(t.scales.dtype if t.scales.dtype in NPU_DTYPES
                                                   else torch.float16)
    logger.warning("gptq_ascend npu: layer %s kept DENSE on the NPU (%.1f MB instead of ~%.1f MB): %s",
                   what, w.numel() * w.element_size() / 1e6, k * n * spec.bits / 8e6, reason or "forced")
    return PackedWeight(backend_name, spec, k, n, {"dense_weight": w.to(device)})


def _npu_int4pack(weight: torch.Tensor) -> torch.Tensor:
    import torch_npu

    return torch_npu.npu_convert_weight_to_int4pack(weight)


def pack_fused(args: FusedArgs, spec: fmt.QuantSpec, k: int, n: int, device: torch.device,
               backend_name: str = "npu",
               convert_int4: Callable[[torch.Tensor], torch.Tensor] = _npu_int4pack) -> PackedWeight:
    """Move the fused arguments to the device in the layouts the op is documented to prefer.

    ``convert_int4`` is torch_npu's ``npu_convert_weight_to_int4pack`` (tests pass
    :func:`int4pack_reference`, its documented behaviour, to run this on CPU).
    """
    assert args.group_size == fused_group_size(spec, k)
    per_channel = args.group_size == 0
    if args.bits == 8:
        if per_channel:   # the documented fast layout for per-channel: a transposed (N, K) buffer
            weight = args.weight.t().contiguous().to(device).t()
        else:
            weight = args.weight.contiguous().to(device)
    else:
        w32 = args.weight.to(torch.int32)
        if per_channel and k % INT4_PER_INT32 == 0:   # (N, K) -> (N, K/8), passed as a (K/8, N) view
            weight = convert_int4(w32.t().contiguous().to(device)).t()
        else:                                         # (K, N) -> (K, N/8)
            weight = convert_int4(w32.contiguous().to(device))
    return PackedWeight(backend_name, spec, k, n,
                        {"weight": weight, "scale": args.scale.to(device), "offset": args.offset.to(device)},
                        perm=None if args.perm is None else args.perm.to(device))


def pack_dequant(args: DequantArgs, spec: fmt.QuantSpec, k: int, n: int, device: torch.device,
                 backend_name: str = "npu") -> PackedWeight:
    """Move the dequant-path arguments to the device."""
    assert args.group_size == spec.effective_group_size(k)
    return PackedWeight(backend_name, spec, k, n,
                        {"qweight": args.qweight.to(device), "zeros": args.zeros.to(device),
                         "scales": args.scales.to(device)},
                        perm=None if args.perm is None else args.perm.to(device))


def _dequant_kernel_order(packed: PackedWeight, dtype: torch.dtype, impl: str | None = None) -> torch.Tensor:
    """W in kernel (permuted) row order, in ``dtype``, on the device."""
    p = packed.tensors
    k = packed.in_features
    path = packed_path(packed)
    if path == "dense":
        return p["dense_weight"].to(dtype)
    if path == "dequant":
        impl = impl or dequant_impl(packed)
        gs = packed.spec.effective_group_size(k)
        if impl == "ascendc":
            return torch.ops.gptq_ascend.ascend_dequant(p["qweight"], p["zeros"], p["scales"], packed.spec.bits,
                                                        gs, k, dtype)
        cores = _vector_cores() if p["qweight"].device.type == "npu" else triton_dequant.VECTOR_CORES_910B3
        return triton_dequant.dequant_triton(p["qweight"], p["zeros"], p["scales"], packed.spec.bits, gs, k,
                                             dtype, core_num=cores)
    # fused: rebuild W from the op's own arguments with the op's formula.
    w = p["weight"]
    if packed.spec.bits == 4:
        if w.shape == (k, packed.out_features // INT4_PER_INT32):
            w = int4unpack_reference(w)
        else:   # transposed per-channel layout: a view of an (N, K/8) buffer
            w = int4unpack_reference(w.t().contiguous()).t()
    scale, offset = p["scale"].float(), p["offset"].float()
    group = fused_group_size(packed.spec, k)
    if group:
        idx = torch.arange(k, device=w.device) // group
        scale, offset = scale[idx], offset[idx]
    return ((w.float() + offset) * scale).to(dtype)


def _fused_op():
    import torch_npu

    return torch_npu.npu_weight_quant_batchmatmul


def gemm_packed(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                impl: str | None = None) -> torch.Tensor:
    """The per-call work of every path, device-agnostic (the argument checks are the caller's).
    ``impl`` forces "ascendc" or "triton" for a dequant-path layer (benchmarks)."""
    lead = x.shape[:-1]
    x2 = fused_activation(x, packed.perm)
    path = packed_path(packed)
    p = packed.tensors
    if path == "fused":
        # The op wants scale/offset in x's dtype: a no-op for fp16 models with fp16 checkpoint scales.
        y = _fused_op()(x2, p["weight"], p["scale"].to(x.dtype), p["offset"].to(x.dtype),
                        antiquant_group_size=fused_group_size(packed.spec, packed.in_features))
    elif path == "dequant" and (impl or dequant_impl(packed)) == "ascendc":
        y = torch.ops.gptq_ascend.ascend_gemm(x2, p["qweight"], p["zeros"], p["scales"], None, None,
                                              packed.spec.bits, packed.spec.effective_group_size(packed.in_features),
                                              packed.in_features)
    else:
        y = torch.matmul(x2, _dequant_kernel_order(packed, x.dtype, impl))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, packed.out_features)


_cores: int | None = None


def _vector_cores() -> int:
    global _cores
    if _cores is None:
        try:
            props = torch.npu.get_device_properties(torch.npu.current_device())
            _cores = int(getattr(props, "vector_core_num", 0)) or triton_dequant.VECTOR_CORES_910B3
        except Exception:
            _cores = triton_dequant.VECTOR_CORES_910B3
    return _cores


class NpuBackend(Backend):
    name = "npu"
    modes = ("auto", "fused", "ascendc", "triton", "dense")

    def available(self) -> tuple[bool, str]:
        return npu_status()

    def can_implement(self, spec: fmt.QuantSpec, in_features: int, out_features: int) -> tuple[bool, str]:
        # Every layer has a path here (dense at worst, with a warning in repack).
        return True, ""

    def _mode(self) -> str:
        mode = os.environ.get(MODE_ENV, "auto")
        if mode not in self.modes:
            raise BackendError(f"{MODE_ENV}={mode!r}; expected one of {', '.join(self.modes)}")
        return mode

    def repack(self, t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int) -> PackedWeight:
        return repack_npu(t, spec, in_features, self._mode(), backend_name=self.name)

    def gemm(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        check_gemm_args(x, packed, bias, NPU_DTYPES, "npu")
        return gemm_packed(x, packed, bias)

    def dequant(self, packed: PackedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return dequant_packed(packed, dtype)


def dequant_packed(packed: PackedWeight, dtype: torch.dtype = torch.float16, impl: str | None = None) -> torch.Tensor:
    """W [K, N] in the checkpoint's K order (the op contract's ``dequant``); ``impl`` as in gemm_packed."""
    if dtype not in NPU_DTYPES:
        raise BackendError(f"{packed.backend} dequant: dtype {dtype}; expected float16 or bfloat16")
    w = _dequant_kernel_order(packed, dtype, impl)
    if packed.perm is not None:   # back to the checkpoint's K order
        w = w.index_select(0, torch.argsort(packed.perm))
    return w


register_backend(NpuBackend())


# --------------------------------------------------------------------------------------------------
# For benchmarks/dequant.py --device npu
# --------------------------------------------------------------------------------------------------

QWEN3_1_7B_SHAPES = ((2048, 4096), (2048, 2048), (2048, 12288), (6144, 2048))


@dataclass
class NpuBenchCase:
    """One timed call. ``fn()`` runs it once (asynchronously: call :func:`npu_synchronize` to wait)."""

    impl: str                  # fp16_matmul | fused | ascendc | triton
    k: int
    n: int
    m: int
    bits: int
    fn: Callable[[], torch.Tensor]
    weight_bytes: int          # bytes of weight data the call must read


def npu_synchronize() -> None:
    torch.npu.synchronize()


def npu_benchmark_cases(shapes=QWEN3_1_7B_SHAPES, ms=(1, 4, 16, 64, 256, 1024), bits=(8, 4),
                        group_size: int = 128, dtype: torch.dtype = torch.float16,
                        seed: int = 0) -> list[NpuBenchCase]:
    """Cases for ``python -m benchmarks.dequant --device npu``: per shape, bits and M, the FP16
    ``torch.matmul`` baseline and every NPU path that is available here. Raises BackendError naming what
    is missing when there is no usable NPU."""
    ok, why = npu_status()
    if not ok:
        raise BackendError(f"--device npu: {why}")
    device = _default_device()
    gen = torch.Generator().manual_seed(seed)
    cases: list[NpuBenchCase] = []
    for k, n in shapes:
        for b in bits:
            spec = fmt.QuantSpec(bits=b, group_size=group_size, sym=True, checkpoint_format="gptq")
            g = spec.num_groups(k)
            codes = torch.randint(0, 1 << b, (k, n), generator=gen, dtype=torch.int64)
            zeros = torch.full((g, n), spec.sym_zero, dtype=torch.int64)
            scales = (torch.rand((g, n), generator=gen) * 0.01 + 0.001).to(torch.float16)
            t = fmt.GPTQTensors(fmt.pack(codes, b, 0), fmt.pack_zeros(zeros, spec), scales)
            dense = fmt.dequantize(t, spec, k, dtype).to(device)
            packs = {}
            for impl, mode in (("fused", "fused"), ("ascendc", "ascendc"), ("triton", "triton")):
                try:
                    packs[impl] = repack_npu(t, spec, k, mode=mode, device=device)
                except BackendError as e:
                    logger.info("benchmark: %s path unavailable for %dx%d %d-bit: %s", impl, k, n, b, e)
            qbytes = k * n * b // 8 + 2 * g * n * 2
            for m in ms:
                x = torch.randn((m, k), generator=gen).to(dtype).to(device)
                cases.append(NpuBenchCase("fp16_matmul", k, n, m, b,
                                          (lambda x=x, w=dense: torch.matmul(x, w)), k * n * 2))
                for impl, packed in packs.items():
                    forced = None if impl == "fused" else impl
                    cases.append(NpuBenchCase(impl, k, n, m, b,
                                              (lambda x=x, p=packed, i=forced: gemm_packed(x, p, None, i)), qbytes))
    return cases
