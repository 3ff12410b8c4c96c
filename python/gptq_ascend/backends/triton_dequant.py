"""GPTQ int8/int4 dequantization as a Triton kernel, and the tiling it shares with the AscendC kernel.

This module is the *executable specification* of ``csrc/ascend/kernels/gptq_dequant.cpp``:

* :func:`plan_tiling` is a line-for-line twin of ``ComputeTiling`` in ``csrc/ascend/tiling.cpp``
  (tests/ascend/test_tiling_host.py compares the two field by field on many shapes).
* :func:`dequant_triton` launches one program per vector core (``plan.used_cores``), and each program
  walks its contiguous range of tiles exactly as the AscendC kernel does: load a tile of packed words
  ``[rows, cols]`` plus one scale row and one zero row (a tile never crosses a group), then for each of
  the ``32 / bits`` lanes shift out the codes, ``(code - z) * s`` in float32, round once to the output
  dtype, and store rows ``pf * word + lane``.

It runs three ways: on an Ascend NPU through triton-ascend; on CPU tensors through Triton's interpreter
(what ``TRITON_INTERPRET=1`` does; :func:`dequant_triton` picks it for CPU tensors, and that is how it
is tested without hardware); and, for the Ascend compile check, through triton-ascend's
compiler up to the last stage. It imports cleanly without triton (``TRITON_IMPORT_ERROR`` says why).

Input layout (the checkpoint's, untouched): ``qweight`` int32 ``[ceil(K*bits/32), N]`` (rows permuted
at load time for act-order, see ``npu.prepare_dequant_args``); ``zeros`` ``[G, N]`` holding the TRUE zero
points (``format.unpack_zeros``: the v1 "+1" is already applied there) in the scales' dtype; ``scales``
``[G, N]`` float16/bfloat16. Groups are contiguous runs of ``group_size`` rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import BackendError

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: str | None = None
except Exception as e:  # ImportError, or a broken install raising something else
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"

# The constants of csrc/ascend/tiling.h.
UB_BYTES_A2 = 192 * 1024
ALIGN_BYTES = 32
COL_ALIGN = 16
MAX_TILE_COLS = 512
MAX_TILE_ROWS = 64
MAX_VECTOR_ELEMS = 255 * 64
MAX_CORES = 65535
VECTOR_CORES_910B3 = 40
# The Triton kernel is planned with a smaller UB budget than the AscendC kernel: triton-ascend's compiler
# adds its own local buffers. Measured with triton-ascend 3.2.0 / ascendnpu-ir 1.2.0 for Ascend910B3: the
# 16 x 512 tile of the 192 KB plan overflows the UB with bf16 output (1902848 bits needed, 1572864
# available) and loses auto multi-buffering with fp16 output; the 8 x 512 tile of a 128 KB plan compiles
# with multi-buffering on (tests/ascend/test_triton_compile.py keeps checking this).
TRITON_UB_BYTES = 128 * 1024

_STATUS_MESSAGES = {
    1: "bits must be 4 or 8",
    2: "in_features and out_features must be positive",
    3: "group_size must be a multiple of 32/bits when the layer has several groups",
    4: "core count must be in [1, 65535]",
    5: "the Unified Buffer cannot hold a 1 x 16 tile",
    6: "output dtype must be float16 or bfloat16",
}


class TilingError(BackendError):
    """The dequant kernel cannot take this layer; ``status`` is ComputeTiling's TilingStatus."""

    def __init__(self, status: int):
        super().__init__(f"dequant kernel tiling: {_STATUS_MESSAGES[status]}")
        self.status = status


@dataclass(frozen=True)
class DequantPlan:
    """``DequantTiling`` of tiling.h (the UB breakdown is folded into ``ub_bytes``)."""

    k: int
    n: int
    bits: int
    pack_factor: int
    group_size: int
    num_groups: int
    packed_rows: int
    group_words: int
    out_bytes: int
    tile_rows: int
    tile_cols: int
    col_tiles: int
    last_cols: int
    row_tiles_per_group: int
    row_tiles: int
    total_tiles: int
    used_cores: int
    tiles_per_core: int
    extra_tiles: int
    ub_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def _align_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


def ub_bytes_for(tile_rows: int, tile_cols: int, out_bytes: int) -> int:
    """UbLayout of tiling.h: the Unified Buffer one core needs for a tile shape."""
    words = _align_up(tile_rows * tile_cols * 4, ALIGN_BYTES)
    param = _align_up(tile_cols * 2, ALIGN_BYTES)
    out = _align_up(tile_rows * tile_cols * out_bytes, ALIGN_BYTES)
    calc = _align_up(tile_rows * tile_cols * 4, ALIGN_BYTES)
    param_calc = _align_up(tile_cols * 4, ALIGN_BYTES)
    return 2 * words + 2 * 2 * param + 2 * out + 2 * calc + 2 * param_calc


def _choose_rows(group_words: int, tile_cols: int, out_bytes: int, ub_bytes: int) -> int:
    limit = min(group_words, MAX_TILE_ROWS)
    while limit > 0:
        if ub_bytes_for(limit, tile_cols, out_bytes) <= ub_bytes and limit * tile_cols <= MAX_VECTOR_ELEMS:
            break
        limit -= 1
    if limit == 0:
        return 0
    best = next(r for r in range(limit, 0, -1) if group_words % r == 0)
    return best if 2 * best >= limit else limit


def plan_tiling(k: int, n: int, bits: int, group_size: int, out_bytes: int = 2,
                core_num: int = VECTOR_CORES_910B3, ub_bytes: int = UB_BYTES_A2) -> DequantPlan:
    """ComputeTiling of tiling.cpp. ``group_size <= 0`` (GPTQ's -1) means one group over all K."""
    if bits not in (4, 8):
        raise TilingError(1)
    if k <= 0 or n <= 0:
        raise TilingError(2)
    if out_bytes != 2:
        raise TilingError(6)
    if core_num <= 0 or core_num > MAX_CORES:
        raise TilingError(4)
    pf = 32 // bits
    packed_rows = _ceil_div(k, pf)
    gs = k if group_size <= 0 or group_size >= k else group_size
    num_groups = _ceil_div(k, gs)
    if num_groups == 1:
        group_words = packed_rows
    elif gs % pf:
        raise TilingError(3)
    else:
        group_words = gs // pf
    cols = min(_align_up(n, COL_ALIGN), MAX_TILE_COLS)
    rows = 0
    while cols >= COL_ALIGN:
        rows = _choose_rows(group_words, cols, out_bytes, ub_bytes)
        if rows:
            break
        cols -= COL_ALIGN
    if not rows:
        raise TilingError(5)
    col_tiles = _ceil_div(n, cols)
    row_tiles_per_group = _ceil_div(group_words, rows)
    last_group_words = packed_rows - (num_groups - 1) * group_words
    row_tiles = (num_groups - 1) * row_tiles_per_group + _ceil_div(last_group_words, rows)
    total = row_tiles * col_tiles
    used = min(core_num, total)
    return DequantPlan(
        k=k, n=n, bits=bits, pack_factor=pf, group_size=gs, num_groups=num_groups,
        packed_rows=packed_rows, group_words=group_words, out_bytes=out_bytes, tile_rows=rows,
        tile_cols=cols, col_tiles=col_tiles, last_cols=n - (col_tiles - 1) * cols,
        row_tiles_per_group=row_tiles_per_group, row_tiles=row_tiles, total_tiles=total,
        used_cores=used, tiles_per_core=total // used, extra_tiles=total % used,
        ub_bytes=ub_bytes_for(rows, cols, out_bytes),
    )


def tile_at(plan: DequantPlan, t: int) -> tuple[int, int, int, int, int]:
    """TileAt of tiling.h: (first_word, rows, group, first_col, cols) of tile ``t``."""
    row_tile, col_tile = divmod(t, plan.col_tiles)
    group, in_group = divmod(row_tile, plan.row_tiles_per_group)
    first_word = group * plan.group_words + in_group * plan.tile_rows
    group_end = min((group + 1) * plan.group_words, plan.packed_rows)
    rows = min(group_end - first_word, plan.tile_rows)
    cols = plan.last_cols if col_tile + 1 == plan.col_tiles else plan.tile_cols
    return first_word, rows, group, col_tile * plan.tile_cols, cols


def core_range(plan: DequantPlan, core: int) -> tuple[int, int]:
    """CoreRange of tiling.h: (first tile, tile count) of vector core ``core``."""
    if core >= plan.used_cores:
        return plan.total_tiles, 0
    return (core * plan.tiles_per_core + min(core, plan.extra_tiles),
            plan.tiles_per_core + (1 if core < plan.extra_tiles else 0))


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
