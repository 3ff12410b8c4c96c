"""GPTQ int8/int4 dequantization as a Triton kernel: the executable specification of the AscendC kernel.

:func:`dequant_triton` launches one program per vector core (``plan.used_cores`` of
:func:`.tiling.plan_tiling`, the plan the AscendC kernel ``csrc/ascend/kernels/gptq_dequant.cpp`` also
follows), and each program walks its contiguous range of tiles exactly as the AscendC kernel does: load
a tile of packed words ``[rows, cols]`` plus one scale row and one zero row (a tile never crosses a
group), then for each of the ``32 / bits`` lanes shift out the codes, ``(code - z) * s`` in float32,
round once to the output dtype, and store rows ``pf * word + lane``.

It runs three ways: on an Ascend NPU through triton-ascend; on CPU tensors through Triton's interpreter
(what ``TRITON_INTERPRET=1`` does; :func:`dequant_triton` picks it for CPU tensors, and that is how it
is tested without hardware); and, for the Ascend compile check, through triton-ascend's compiler up to
the last stage. It imports cleanly without triton (``TRITON_IMPORT_ERROR`` says why).

Input layout (the checkpoint's, untouched): ``qweight`` int32 ``[ceil(K*bits/32), N]`` (rows permuted
at load time for act-order, see ``dequant.prepare_dequant_args``); ``zeros`` ``[G, N]`` holding the TRUE
zero points (``format.unpack_zeros``: the v1 "+1" is already applied there) in the scales' dtype;
``scales`` ``[G, N]`` float16/bfloat16. Groups are contiguous runs of ``group_size`` rows.
"""

from __future__ import annotations

import math

import torch

from ...errors import BackendError
from .tiling import TRITON_UB_BYTES, VECTOR_CORES_910B3, DequantPlan, plan_tiling

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: str | None = None
except Exception as e:  # ImportError, or a broken install raising something else
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"


def available() -> tuple[bool, str]:
    """Whether the Triton kernel can be launched at all (any device; see npu_triton for the NPU)."""
    if triton is None:
        return False, TRITON_IMPORT_ERROR or "triton is not installed"
    return True, ""


if triton is not None:

    @triton.jit
    def _gptq_dequant_kernel(qweight_ptr, zeros_ptr, scales_ptr, out_ptr,
                             K, N, packed_rows, group_words, tile_rows, tile_cols,
                             row_tiles_per_group, col_tiles, tiles_per_core, extra_tiles,
                             BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                             OUT_BF16: tl.constexpr):
        PF: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        core = tl.program_id(0)
        first = core * tiles_per_core + tl.minimum(core, extra_tiles)
        count = tiles_per_core + (core < extra_tiles).to(tl.int32)
        r = tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        for t in range(first, first + count):
            # TileAt
            row_tile = t // col_tiles
            col_tile = t % col_tiles
            group = row_tile // row_tiles_per_group
            first_word = group * group_words + (row_tile % row_tiles_per_group) * tile_rows
            group_end = tl.minimum((group + 1) * group_words, packed_rows)
            words_idx = first_word + r
            rmask = (r < tile_rows) & (words_idx < group_end)
            cols = col_tile * tile_cols + c
            cmask = (c < tile_cols) & (cols < N)
            # CopyIn: the words of the tile, one scale row and one zero row.
            words = tl.load(qweight_ptr + words_idx[:, None] * N + cols[None, :],
                            mask=rmask[:, None] & cmask[None, :], other=0)
            z = tl.load(zeros_ptr + group * N + cols, mask=cmask, other=0).to(tl.float32)
            s = tl.load(scales_ptr + group * N + cols, mask=cmask, other=0).to(tl.float32)
            for lane in tl.static_range(PF):
                # Compute: lane's code of every word; (q - z) * s in float32, one rounding.
                code = (words >> (BITS * lane)) & MASK
                w = (code.to(tl.float32) - z[None, :]) * s[None, :]
                if OUT_BF16:
                    # Round to nearest even explicitly, so the final cast is exact whatever rounding
                    # the target's fp32 -> bf16 conversion uses (Triton's interpreter truncates).
                    b = w.to(tl.int32, bitcast=True)
                    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
                    w = b.to(tl.float32, bitcast=True)
                rows = words_idx * PF + lane
                # CopyOut: rows pf*word + lane (the last word may hold fewer than PF codes).
                tl.store(out_ptr + rows[:, None] * N + cols[None, :], w.to(out_ptr.dtype.element_ty),
                         mask=(rmask & (rows < K))[:, None] & cmask[None, :])


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def kernel_launch_args(plan: DequantPlan, dtype: torch.dtype) -> tuple[tuple, dict]:
    """The runtime and constexpr arguments of ``_gptq_dequant_kernel`` for a plan (pointers excluded)."""
    runtime = (plan.k, plan.n, plan.packed_rows, plan.group_words, plan.tile_rows, plan.tile_cols,
               plan.row_tiles_per_group, plan.col_tiles, plan.tiles_per_core, plan.extra_tiles)
    const = dict(BITS=plan.bits, BLOCK_R=_next_pow2(plan.tile_rows), BLOCK_C=_next_pow2(plan.tile_cols),
                 OUT_BF16=dtype == torch.bfloat16)
    return runtime, const


def dequant_triton(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int,
                   group_size: int, in_features: int, dtype: torch.dtype = torch.float16,
                   core_num: int = VECTOR_CORES_910B3, ub_bytes: int = TRITON_UB_BYTES,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """W ``[K, N]`` (rows in qweight's order) via the Triton kernel, on qweight's device.

    ``zeros`` are the true zero points (``format.unpack_zeros``), in any float dtype.
    """
    ok, why = available()
    if not ok:
        raise BackendError(f"Triton dequant: {why}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise BackendError(f"Triton dequant: dtype {dtype} is not supported (float16 or bfloat16)")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise BackendError(f"Triton dequant: qweight must be 2-D int32, got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[1]
    plan = plan_tiling(in_features, n, bits, group_size, 2, core_num, ub_bytes)
    if qweight.shape[0] != plan.packed_rows:
        raise BackendError(f"Triton dequant: qweight has {qweight.shape[0]} rows; {plan.packed_rows} expected "
                           f"for in_features={in_features} at {bits} bits")
    for name, tensor in (("zeros", zeros), ("scales", scales)):
        if tuple(tensor.shape) != (plan.num_groups, n):
            raise BackendError(f"Triton dequant: {name} has shape {tuple(tensor.shape)}; "
                               f"({plan.num_groups}, {n}) expected")
    if out is None:
        out = torch.empty((in_features, n), dtype=dtype, device=qweight.device)
    elif tuple(out.shape) != (in_features, n) or out.dtype != dtype or not out.is_contiguous():
        raise BackendError(f"Triton dequant: out must be a contiguous {dtype} ({in_features}, {n}) tensor")
    runtime, const = kernel_launch_args(plan, dtype)
    kernel = _interpreted_kernel() if qweight.device.type == "cpu" else _gptq_dequant_kernel
    kernel[(plan.used_cores,)](qweight.contiguous(), zeros.contiguous(), scales.contiguous(), out,
                               *runtime, **const)
    return out


_interpreted = None


def _interpreted_kernel():
    """The kernel under Triton's interpreter, for CPU tensors (what TRITON_INTERPRET=1 would give).

    For tests: once the interpreter has run, ``triton.language`` stays patched in this process and real
    compilation fails there (observed with triton-ascend 3.2.0), so do not mix both in one process.
    """
    global _interpreted
    if _interpreted is None:
        from triton.runtime.interpreter import InterpretedFunction

        kernel = _gptq_dequant_kernel
        _interpreted = kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
    return _interpreted
