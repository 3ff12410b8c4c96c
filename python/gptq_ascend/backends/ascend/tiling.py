"""The tile plan of the GPTQ dequant kernels, shared by the AscendC kernel and the Triton kernel.

:func:`plan_tiling` is a line-for-line twin of ``ComputeTiling`` in ``csrc/ascend/tiling.cpp`` (the
AscendC launcher plans with the C++ one; the Triton kernel and the load-time checks of the dequant path
with this one). tests/ascend/test_tiling_host.py compares the two field by field on thousands of queries.
:func:`ub_bytes_for_soc` is the twin of ``UbBytesForSoc`` in tiling.h: the Unified Buffer per SoC.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...errors import BackendError

# The constants of csrc/ascend/tiling.h.
UB_BYTES_A2 = 192 * 1024        # Unified Buffer per AI core on Atlas A2/A3 (910B/910C)
UB_RESERVE_BYTES = 8 * 1024     # left to the runtime by the AscendC launcher's plan
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

# The SoCs the dequant kernels are written for, by name prefix, and their Unified Buffer per AI core.
# Only Atlas A2/A3: the AscendC kernel relies on DataCopyPad, which needs them, and triton-ascend
# targets them. UbBytesForSoc in tiling.h holds the same table (the host test compares the two).
UB_BYTES_BY_SOC_PREFIX = (
    ("Ascend910B", UB_BYTES_A2),      # Atlas A2: 910B1..910B4
    ("Ascend910_93", UB_BYTES_A2),    # Atlas A3: 910C (Ascend910_9391, _9392, ...)
)


def ub_bytes_for_soc(soc: str | None) -> int:
    """The Unified Buffer per AI core of ``soc`` (e.g. "Ascend910B3"), or 0 for a SoC the dequant kernels
    do not cover (then the dequant path is unavailable there and says so)."""
    for prefix, ub in UB_BYTES_BY_SOC_PREFIX:
        if soc and soc.startswith(prefix):
            return ub
    return 0


def triton_ub_bytes(soc: str | None) -> int:
    """The Triton kernel's UB budget on ``soc``: TRITON_UB_BYTES scaled to the SoC's UB (0: not covered)."""
    ub = ub_bytes_for_soc(soc)
    return ub * TRITON_UB_BYTES // UB_BYTES_A2

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
