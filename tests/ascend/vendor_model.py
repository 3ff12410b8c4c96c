"""Independent models used by the Ascend contract tests (written from documentation, not from our code).

* :func:`wqbmm_model`: torch_npu.npu_weight_quant_batchmatmul as documented:
  ``y = x @ ((weight + antiquant_offset) * antiquant_scale)``, with its documented argument rules checked
  (so an argument the real op would reject fails here too).
* :func:`int4_unpack_documented`: the nibble order of npu_convert_weight_to_int4pack as documented /
  implemented in op-plugin (8 int4 per int32 along the last dim, element j in bits [4j, 4j+4)).
* :func:`random_layer`: a random GPTQ layer with its ground truth ``W = (q - z[g_idx]) * s[g_idx]``
  computed from the generating codes (not by unpacking), in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gptq_ascend import format as fmt


def int4_unpack_documented(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] -> int64 [R, C] with values in [-8, 7]; loops over the 8 nibbles explicitly."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(packed.shape[0], packed.shape[1] * 8, dtype=torch.int64)
    for j in range(8):
        nib = (words >> (4 * j)) & 0xF
        out[:, j::8] = nib - 16 * (nib >= 8).to(torch.int64)
    return out


def antiquant_weight_model(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                           group_size: int, k: int) -> torch.Tensor:
    """``(weight + offset) * scale`` as float64 [K, N], with the documented shapes of every argument."""
    n = scale.shape[-1]
    if weight.dtype == torch.int8:
        assert tuple(weight.shape) == (k, n), f"int8 weight must be (K, N)=({k}, {n}), got {tuple(weight.shape)}"
        w = weight.to(torch.float64)
    elif weight.dtype == torch.int32:   # int4 carried in int32 (npu_convert_weight_to_int4pack)
        if tuple(weight.shape) == (k, n // 8) and n % 8 == 0:
            w = int4_unpack_documented(weight.contiguous()).to(torch.float64)
        elif tuple(weight.shape) == (k // 8, n) and k % 8 == 0 and not weight.is_contiguous():
            # the transposed form: a (K/8, N) view of an (N, K/8) packed buffer
            w = int4_unpack_documented(weight.t().contiguous()).t().to(torch.float64)
        else:
            raise AssertionError(f"int4 weight must be (K, N/8) or a transposed (K/8, N) view, got "
                                 f"{tuple(weight.shape)} contiguous={weight.is_contiguous()}")
    else:
        raise AssertionError(f"weight dtype {weight.dtype}: the op takes int8 or int32 (int4 pack)")
    if group_size:
        assert group_size % 32 == 0 and 32 <= group_size <= k - 1, f"antiquant_group_size {group_size}"
        groups = math.ceil(k / group_size)
        assert tuple(scale.shape) == (groups, n), f"per-group scale must be ({groups}, {n}), got {tuple(scale.shape)}"
        idx = torch.arange(k) // group_size
        sc = scale.to(torch.float64)[idx]
        off = offset.to(torch.float64)[idx] if offset is not None else 0.0
    else:
        assert tuple(scale.shape) in ((n,), (1, n)), \
            f"per-channel scale must be (N,) or (1, N), got {tuple(scale.shape)}"
        sc = scale.to(torch.float64).reshape(1, n)
        off = offset.to(torch.float64).reshape(1, n) if offset is not None else 0.0
    if offset is not None:
        assert offset.shape == scale.shape and offset.dtype == scale.dtype, "offset must match scale"
    return (w + off) * sc


def wqbmm_model(x: torch.Tensor, weight: torch.Tensor, antiquant_scale: torch.Tensor,
                antiquant_offset: torch.Tensor | None = None, quant_scale=None, quant_offset=None,
                bias: torch.Tensor | None = None, antiquant_group_size: int = 0,
                inner_precise: int = 0) -> torch.Tensor:
    """npu_weight_quant_batchmatmul, per its documentation (A2/A3), evaluated in float64."""
    assert quant_scale is None and quant_offset is None, "output quantization is not used"
    assert x.dim() == 2, f"x must be 2-D (M, K), got {tuple(x.shape)}"
    assert x.dtype in (torch.float16, torch.bfloat16), f"x dtype {x.dtype}"
    assert antiquant_scale.dtype == x.dtype, f"antiquant_scale {antiquant_scale.dtype} must equal x's {x.dtype}"
    k = x.shape[1]
    n = antiquant_scale.shape[-1]
    assert 1 <= k <= 65535 and 1 <= n <= 65535, f"K={k}, N={n} out of [1, 65535]"
    w = antiquant_weight_model(weight, antiquant_scale, antiquant_offset, antiquant_group_size, k)
    y = x.to(torch.float64) @ w
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


@dataclass
class Layer:
    spec: fmt.QuantSpec
    tensors: fmt.GPTQTensors
    k: int
    n: int
    truth: torch.Tensor       # float64 [K, N], original K order


def random_layer(bits: int, k: int, n: int, group_size: int, sym: bool, checkpoint_format: str,
                 act_order: bool, seed: int, scale_dtype: torch.dtype = torch.float16) -> Layer:
    gen = torch.Generator().manual_seed(seed)
    spec = fmt.QuantSpec(bits=bits, group_size=group_size, sym=sym, desc_act=act_order,
                         checkpoint_format=checkpoint_format)
    g = spec.effective_group_size(k)
    groups = math.ceil(k / g)
    top = (1 << bits) - 1
    q = torch.randint(0, top + 1, (k, n), generator=gen)
    q[0, 0], q[-1, -1] = 0, top                      # the extremes, always
    if sym:
        z = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int64)
    else:
        z = torch.randint(0, top + 1, (groups, n), generator=gen)
        z[0, 0], z[-1, -1] = 0, top
    s = (torch.rand((groups, n), generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    if act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[perm] = torch.arange(k) // g           # GPTQ: the i-th quantized column is in group i // g
    else:
        g_idx = torch.arange(k) // g
    truth = (q - z[g_idx]).to(torch.float64) * s.to(torch.float64)[g_idx]
    t = fmt.GPTQTensors(fmt.pack(q, bits, 0), fmt.pack_zeros(z, spec), s, g_idx.to(torch.int32))
    return Layer(spec, t, k, n, truth)
