"""The vendor-op contract: every torch_npu op gptq-ascend calls, its documented limits, and its arguments.

The fused path runs ``torch_npu.npu_weight_quant_batchmatmul``, documented as
``y = x @ ((weight + antiquant_offset) * antiquant_scale)`` -- the offset is ADDED. GPTQ gives
``W = (q - z) * s`` with unsigned codes q, so the arguments prepared once here are
``weight = q - 2**(bits-1)`` (signed int8, ``(K, N)``; int4 packed by ``npu_convert_weight_to_int4pack``),
``antiquant_scale = scales`` and ``antiquant_offset = 2**(bits-1) - z`` (z the TRUE zero point, v1 "+1"
applied by ``format.unpack_zeros``). Act-order: K is permuted once (``format.act_order_perm``) and the
activation columns are gathered per call.

The two functions that call torch_npu (:func:`npu_fused_matmul`, :func:`npu_int4pack`) are the only
torch_npu op calls in the package; tests/ascend/test_vendor_contract.py checks them against the schema,
meta function and docs shipped in the torch_npu wheel (tests/ascend/vendor/). Everything else here is
plain torch and runs without torch_npu, so the exact arguments are checked on any machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ... import format as fmt
from ...errors import BackendError
from ...ops import PackedWeight
from .device import soc_family

# Documented limits of npu_weight_quant_batchmatmul (torch_npu docs, _op_plugin_docs.py).
FUSED_MAX_DIM = 65535
FUSED_GROUP_MULTIPLE = 32
INT4_PER_INT32 = 8
FUSED_KEYS = ("weight", "scale", "offset")       # PackedWeight.tensors of a fused-path layer


def npu_fused_matmul(x: torch.Tensor, weight: torch.Tensor, antiquant_scale: torch.Tensor,
                     antiquant_offset: torch.Tensor, antiquant_group_size: int) -> torch.Tensor:
    """The fused op. Positional names are the schema's (the vendor-contract test checks them)."""
    import torch_npu

    return torch_npu.npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset,
                                                  antiquant_group_size=antiquant_group_size)


def npu_int4pack(weight: torch.Tensor) -> torch.Tensor:
    """int32 codes in [-8, 7], ``[R, C]`` -> ``[R, C / 8]`` int32 (see :func:`int4pack_reference`)."""
    import torch_npu

    return torch_npu.npu_convert_weight_to_int4pack(weight)


def int4_transposed_layout(k: int, n: int) -> bool:
    """Per-channel int4 goes to the op as a transposed ``(K/8, N)`` view of an ``(N, K/8)`` buffer when
    K % 8 == 0 -- except when that view is contiguous in torch's sense (K == 8 or N == 1): the shipped
    meta function then reads it as ``(K, N/8)``-packed and infers N*8 outputs (the docs list the
    ``(1, 8)`` transposed int4 weight as unsupported)."""
    return k % INT4_PER_INT32 == 0 and k > INT4_PER_INT32 and n > 1


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
        if not per_group and n % INT4_PER_INT32 and not int4_transposed_layout(k, n):
            return False, f"int4 with K={k}, N={n}: npu_convert_weight_to_int4pack needs K or N % 8 == 0 " \
                          "(K % 8 with K > 8 for the transposed per-channel layout)"
    return True, ""


def kernel_order(t: fmt.GPTQTensors, spec: fmt.QuantSpec, k: int) -> torch.Tensor | None:
    """The act-order permutation (or None), after checking that the permuted groups are contiguous runs
    of ``group_size`` rows -- what every per-group kernel (the vendor op and the dequant kernels) assumes."""
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


def cpu_tensors(t: fmt.GPTQTensors) -> fmt.GPTQTensors:
    return fmt.GPTQTensors(t.qweight.cpu(), t.qzeros.cpu(), t.scales.cpu(),
                           None if t.g_idx is None else t.g_idx.cpu())


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


def fused_group_size(spec: fmt.QuantSpec, in_features: int) -> int:
    """antiquant_group_size: the group size, or 0 (per-channel) for a single group."""
    return 0 if spec.num_groups(in_features) == 1 else spec.effective_group_size(in_features)


def prepare_fused_args(t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int) -> FusedArgs:
    """Load-time preparation of the fused path, on CPU, from the checkpoint tensors."""
    k = in_features
    n = t.out_features
    cpu = cpu_tensors(t)
    perm = kernel_order(cpu, spec, k)
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


def pack_fused(args: FusedArgs, spec: fmt.QuantSpec, k: int, n: int, device: torch.device,
               backend_name: str = "npu",
               convert_int4: Callable[[torch.Tensor], torch.Tensor] = npu_int4pack) -> PackedWeight:
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
        if per_channel and int4_transposed_layout(k, n):   # (N, K) -> (N, K/8), passed as a (K/8, N) view
            weight = convert_int4(w32.t().contiguous().to(device)).t()
        else:                                              # (K, N) -> (K, N/8)
            weight = convert_int4(w32.contiguous().to(device))
    return PackedWeight(backend_name, spec, k, n,
                        {"weight": weight, "scale": args.scale.to(device), "offset": args.offset.to(device)},
                        perm=None if args.perm is None else args.perm.to(device))


def fused_weight_model(packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """W in kernel row order rebuilt from the op's own arguments with the op's documented formula
    (the fused path has no dequant kernel; ``dequant`` of the op contract uses this)."""
    p = packed.tensors
    k = packed.in_features
    w = p["weight"]
    if packed.spec.bits == 4:
        if w.shape == (k, packed.out_features // INT4_PER_INT32) and w.is_contiguous():
            w = int4unpack_reference(w)
        else:   # transposed per-channel layout: a view of an (N, K/8) buffer
            w = int4unpack_reference(w.t().contiguous()).t()
    scale, offset = p["scale"].float(), p["offset"].float()
    group = fused_group_size(packed.spec, k)
    if group:
        idx = torch.arange(k, device=w.device) // group
        scale, offset = scale[idx], offset[idx]
    return ((w.float() + offset) * scale).to(dtype)


def fused_gemm(x2: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """One fused-path call on the 2-D (already gathered) activation."""
    p = packed.tensors
    # The op wants scale/offset in x's dtype: a no-op for fp16 models with fp16 checkpoint scales.
    return npu_fused_matmul(x2, p["weight"], p["scale"].to(x2.dtype), p["offset"].to(x2.dtype),
                            fused_group_size(packed.spec, packed.in_features))
