"""The CPU backend: GPTQ layers through the fused dequant-GEMM kernel of ``csrc/cpu`` (``gptq_ascend._C``).

``repack`` turns a checkpoint layer into the layout the kernel streams (described in full in
``csrc/cpu/kernel.h``); every GPTQ detail (bit order, the v1 zero-point offset, act-order) comes from
:mod:`gptq_ascend.format`. ``PackedWeight.tensors``:

=============  =========================================  ==================================================
name           dtype / shape                              meaning
=============  =========================================  ==================================================
``codes``      uint8 ``[nblk, Kp/2, 128]`` (8-bit) or     unsigned codes, N in blocks of 64 columns, K in
               ``[nblk, Kp/2, 64]`` (2/3/4-bit)           (k, k+1) pairs; 8-bit: bytes [column][k, k+1];
                                                          <=4-bit: byte = q(k) | q(k+1) << 4, columns in
                                                          the order the AVX-512 unpack wants
``scales``     float16 (checkpoint fp16) or float32       per stored group and column; N padded to 64
               ``[nblk, G', 64]``
``zeros``      uint8 ``[nblk, G', 64]``, only when the    the TRUE zero points z (v1 "+1" already applied by
               zero points are not all 2**(bits-1)        ``format.unpack_zeros``)
``row_map``    int32 ``[Kp]``                             checkpoint row feeding each padded row; -1 = pad
``group_ptr``  int32 ``[G' + 1]``                         padded row where each stored group starts
=============  =========================================  ==================================================

``Kp`` is K after the act-order permutation and padding each group to a multiple of 4 rows; ``G'``
counts the groups that own at least one row. ``gemm`` takes ``x`` in checkpoint order: the kernel
gathers it through ``row_map`` while converting it, so ``PackedWeight.perm`` stays None.

Ops (``torch.ops.gptq_ascend``; fake implementations below so torch.compile can trace them):
``cpu_gemm``, ``cpu_gemm.out``, ``cpu_dequant``, ``cpu_kernel_config``, and ``cpu_dense_gemm`` (a dense
BF16-weight GEMV / small-M GEMM, csrc/cpu/dense_bf16.cpp: the dense lm_head, see :func:`dense_gemm`).
"""

from __future__ import annotations

import mmap
import os
import re

import torch

from .. import format as fmt
from ..errors import BackendError
from ..ops import Backend, PackedWeight, check_gemm_args, register_backend

BLOCK_N = 64
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:  # importing the extension registers torch.ops.gptq_ascend.cpu_*
    from .. import _C  # noqa: F401

    _IMPORT_ERROR: str | None = None
except ImportError as e:  # not built: the backend registers anyway and says why it is unavailable
    _IMPORT_ERROR = str(e)


def _register_fakes() -> None:
    """Meta/fake implementations: output shapes and dtypes only, for torch.compile and FakeTensor."""
    lib = "gptq_ascend"

    @torch.library.register_fake(f"{lib}::cpu_gemm")
    def _gemm_fake(x, codes, scales, zeros, row_map, group_ptr, bias, bits, sym_zero, in_features,
                   out_features):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake(f"{lib}::cpu_gemm.out")
    def _gemm_out_fake(x, codes, scales, zeros, row_map, group_ptr, bias, bits, sym_zero, in_features,
                       out_features, *, out):
        return out

    @torch.library.register_fake(f"{lib}::cpu_dequant")
    def _dequant_fake(codes, scales, zeros, row_map, group_ptr, bits, sym_zero, in_features,
                      out_features, dtype):
        return codes.new_empty((in_features, out_features), dtype=dtype)

    if hasattr(torch.ops.gptq_ascend, "cpu_dense_gemm"):  # absent from an extension built before it existed
        @torch.library.register_fake(f"{lib}::cpu_dense_gemm")
        def _dense_fake(x, weight, bias=None):
            return x.new_empty((*x.shape[:-1], weight.shape[0]))

        @torch.library.register_fake(f"{lib}::cpu_dense_gemm.out")
        def _dense_out_fake(x, weight, bias=None, *, out):
            return out


if _IMPORT_ERROR is None:
    _register_fakes()


_HUGE_PAGE = 2 << 20
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``); "" where it has none."""
    try:
        with open(_THP_ENABLED) as f:
            m = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return ""
    return m.group(1) if m else ""


def hugepages_wanted() -> bool:
    """Whether packed codes go into huge pages: THP ``madvise`` or ``always``, unless GPTQ_ASCEND_HUGEPAGES=0."""
    return os.environ.get("GPTQ_ASCEND_HUGEPAGES", "1") != "0" and thp_mode() in ("madvise", "always")


def _in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of contiguous ``t`` in its own anonymous mapping whose 2 MiB-aligned whole pages are advised
    MADV_HUGEPAGE before the first touch; ``t`` itself when huge pages are off or ``t`` is under 2 MiB.

    Why: every decoded token streams every code byte once; in 4 KiB pages that is a TLB miss (a page walk,
    two-dimensional under KVM) every 4 KiB. Backed by 2 MiB pages the 1-thread GEMV ran 1.00-1.055x faster
    (median ~1.04 over nine shapes/runs, docs/notes/issue-11-e2e-peer.md "Session 6 (huge pages)").
    torch's allocator only does this under THP_MEM_ALLOC_ENABLE=1, read once at its first allocation,
    which a plugin cannot set in time. The tail past the last whole huge page stays in 4 KiB pages, so no
    huge page is only partly used. The tensor keeps the mapping alive (torch.frombuffer holds it).
    """
    nbytes = t.numel() * t.element_size()
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or not hugepages_wanted():
        return t
    return advised_copy(t, mmap.MADV_HUGEPAGE)


def advised_copy(t: torch.Tensor, advice: int) -> torch.Tensor:
    """A copy of contiguous ``t`` in its own 2 MiB-aligned anonymous mapping whose whole 2 MiB pages are
    given ``advice`` (``mmap.MADV_HUGEPAGE`` / ``MADV_NOHUGEPAGE``) before the copy first touches them.
    The tensor keeps the mapping alive (torch.frombuffer holds it)."""
    nbytes = t.numel() * t.element_size()
    mm = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    off = -whole.data_ptr() % _HUGE_PAGE
    if advice == getattr(mmap, "MADV_NOHUGEPAGE", None):
        mm.madvise(advice)  # the whole mapping: under THP "always" no part of it may become a huge page
    elif nbytes >= _HUGE_PAGE:
        mm.madvise(advice, off, nbytes // _HUGE_PAGE * _HUGE_PAGE)  # only whole huge pages: no partly used one
    out = whole[off:off + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def _nibble_byte_of_column() -> torch.Tensor:
    """For a 64-column block: the byte that holds column n in the <=4-bit layout (see kernel.h)."""
    n = torch.arange(BLOCK_N)
    return ((n >> 2) & 3) * 16 + (n >> 4) * 4 + (n & 3)


class CPUBackend(Backend):
    """Fused dequant-GEMM on x86 CPUs (AVX-512 / AVX2 / portable, picked at run time)."""

    name = "cpu"
    compile_safe = True  # gemm is one registered op with a fake impl: torch.compile may trace it

    def available(self) -> tuple[bool, str]:
        if _IMPORT_ERROR is not None:
            return False, (f"the C++ extension gptq_ascend._C is not built ({_IMPORT_ERROR}); build it with "
                           "`make env` or `python setup.py build_ext --inplace`")
        return True, ""

    def describe(self) -> str:
        if _IMPORT_ERROR is not None:
            return ""
        return describe_tier(kernel_settings())

    def can_implement(self, spec: fmt.QuantSpec, in_features: int, out_features: int) -> tuple[bool, str]:
        if spec.bits not in (2, 3, 4, 8):
            return False, f"{spec.bits}-bit weights are not supported (2, 3, 4, 8 are)"
        if in_features <= 0 or out_features <= 0:
            return False, f"empty layer ({in_features} -> {out_features})"
        if 2 * in_features >= 2**31:
            return False, f"in_features {in_features} does not fit the int32 row map"
        return True, ""

    # ---- load time -------------------------------------------------------------------------------

    def repack(self, t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int) -> PackedWeight:
        k = fmt.validate_layer("layer", t, spec, in_features)
        n = t.out_features
        q = fmt.unpack_weight_codes(t, spec, k)                 # [K, N] int32, unsigned codes
        z = fmt.unpack_zeros(t.qzeros.cpu(), spec, n)           # [G, N] int32, true zero points
        g_idx = (t.g_idx if t.g_idx is not None else fmt.default_g_idx(k, spec.group_size)).to(torch.int64).cpu()
        return self.pack_codes(q, z, g_idx, t.scales.cpu(), spec)

    def pack_codes(self, q: torch.Tensor, z: torch.Tensor, g_idx: torch.Tensor, scales_src: torch.Tensor,
                   spec: fmt.QuantSpec) -> PackedWeight:
        """The kernel layout from unpacked values: unsigned codes ``q`` [K, N] (any integer dtype, any
        strides), true zero points ``z`` [G, N], ``g_idx`` [K] and ``scales_src`` [G, N]. ``repack`` feeds it
        a checkpoint layer; the opt-in int8 lm_head feeds it codes it computed itself."""
        k, n = q.shape
        perm = fmt.act_order_perm(g_idx)
        order = perm if perm is not None else torch.arange(k)
        sorted_groups = g_idx[order]

        # Stored groups: the runs of equal group id in kernel order, each padded to a multiple of 4 rows
        # (the kernels need (k, k+1) pairs; the opt-in int8-activation path needs k-quads).
        ids, counts = torch.unique_consecutive(sorted_groups, return_counts=True)
        padded = (counts + 3) // 4 * 4
        group_ptr = torch.zeros(len(ids) + 1, dtype=torch.int64)
        group_ptr[1:] = torch.cumsum(padded, 0)
        kp = int(group_ptr[-1])
        # Row i of `order` lands at padded row i + (pads of the groups before its own).
        run = torch.repeat_interleave(torch.arange(len(ids)), counts)
        pads_before = group_ptr[:-1] - (torch.cumsum(counts, 0) - counts)
        dest = torch.arange(k) + pads_before[run]
        row_map = torch.full((kp,), -1, dtype=torch.int32)
        row_map[dest] = order.to(torch.int32)

        nblk = -(-n // BLOCK_N)
        npad = nblk * BLOCK_N
        codes = torch.zeros(kp, npad, dtype=torch.uint8)
        codes[dest, :n] = (q[order] if perm is not None else q).to(torch.uint8)
        if spec.bits == 8:
            # [Kp/2, 2, nblk, 64] -> [nblk, Kp/2, 64, 2]
            packed = codes.view(kp // 2, 2, nblk, BLOCK_N).permute(2, 0, 3, 1).contiguous()
            packed = packed.view(nblk, kp // 2, 2 * BLOCK_N)
        else:
            pairs = codes[0::2] | (codes[1::2] << 4)             # [Kp/2, npad]: q(k) | q(k+1) << 4
            pairs = pairs.view(kp // 2, nblk, BLOCK_N)
            # byte j of a block row holds column col(j); place column n at byte byte_of[n]
            blocked = torch.empty_like(pairs)
            blocked[:, :, _nibble_byte_of_column()] = pairs
            packed = blocked.permute(1, 0, 2).contiguous()

        s_dtype = torch.float16 if scales_src.dtype == torch.float16 else torch.float32
        scales = torch.zeros(len(ids), npad, dtype=s_dtype)
        scales[:, :n] = scales_src[ids].to(s_dtype)
        scales = scales.view(len(ids), nblk, BLOCK_N).permute(1, 0, 2).contiguous()
        tensors = {"codes": _in_huge_pages(packed), "scales": scales}
        zsel = z[ids]
        if not bool((zsel == spec.sym_zero).all()):
            zeros = torch.zeros(len(ids), npad, dtype=torch.uint8)
            zeros[:, :n] = zsel.to(torch.uint8)
            tensors["zeros"] = zeros.view(len(ids), nblk, BLOCK_N).permute(1, 0, 2).contiguous()
        tensors["row_map"] = row_map
        tensors["group_ptr"] = group_ptr.to(torch.int32)
        return PackedWeight(self.name, spec, k, n, tensors)

    # ---- run time --------------------------------------------------------------------------------

    @staticmethod
    def _args(packed: PackedWeight) -> tuple:
        p = packed.tensors
        return (p["codes"], p["scales"], p.get("zeros"), p["row_map"], p["group_ptr"])

    def gemm(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        check_gemm_args(x, packed, bias, _DTYPES, "cpu")
        if _IMPORT_ERROR is not None:
            raise BackendError(self.available()[1])
        return torch.ops.gptq_ascend.cpu_gemm(x, *self._args(packed), bias, packed.spec.bits,
                                              float(packed.spec.sym_zero), packed.in_features,
                                              packed.out_features)

    def dequant(self, packed: PackedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        if _IMPORT_ERROR is not None:
            raise BackendError(self.available()[1])
        return torch.ops.gptq_ascend.cpu_dequant(*self._args(packed), packed.spec.bits,
                                                 float(packed.spec.sym_zero), packed.in_features,
                                                 packed.out_features, dtype)


def dense_gemm_available() -> tuple[bool, str]:
    """(True, "") when the extension has the dense op, else (False, why)."""
    if _IMPORT_ERROR is not None:
        return CPUBackend().available()
    if not hasattr(torch.ops.gptq_ascend, "cpu_dense_gemm"):
        return False, "the C++ extension gptq_ascend._C predates cpu_dense_gemm; rebuild it (`make env`)"
    return True, ""


def dense_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a BF16 ``weight`` [N, K] (unit stride along K, used in place) and
    x [..., K] in fp32 / bf16 / fp16, on the kernel tier of :func:`kernel_config`: exact products, fp32
    sums, one rounding to x's dtype. Streams the weight once per call; meant for M <= ~16 rows."""
    ok, why = dense_gemm_available()
    if not ok:
        raise BackendError(why)
    return torch.ops.gptq_ascend.cpu_dense_gemm(x, weight, bias)


def kernel_config(isa: str = "", small_m_max: int | None = None, small_m_max_f32: int | None = None,
                  w8a8: bool | None = None, brgemm: bool | None = None) -> str:
    """Read (and optionally set) the kernel's tier (``isa``: "auto" = the best of "avx512vbmi",
    "avx512bf16", "avx512", "avx2", "generic" this CPU runs, up to the GPTQ_ASCEND_CPU_ISA cap; "reset"
    restores every setting to its start-up value, environment included, before the other arguments
    apply; a tier this CPU cannot run raises RuntimeError naming what it lacks), the largest M the fused
    path takes (``small_m_max`` for both paths; ``small_m_max_f32`` then overrides the one for fp32/fp16
    activations), the opt-in int8-activation mode (``w8a8``; which calls it takes: :func:`int8_activations`;
    changes the numerics, see docs/cpu-kernel.md) and whether large-M bf16 calls go through oneDNN's brgemm micro-kernel
    (``brgemm``, default on; off = dequantized tiles into ATen's GEMM). Returns the settings as
    space-separated ``key=value`` fields, e.g. ``isa=avx512vbmi bf16_dot=1 small_m_max_bf16=48
    small_m_max_f32=256 w8a8=0 brgemm=1 large_m_bf16=brgemm threads=2 cap=none why=best cpu=... l2=2048K
    l3=107520K`` (the bf16 switch-over defaults to 48 with brgemm and 192 without). ``why`` says why this
    tier and not a higher one: ``best``, ``cap`` (GPTQ_ASCEND_CPU_ISA), ``requested`` (set here below a
    tier this CPU runs) or ``lacks:<features>`` (comma-separated, e.g. ``lacks:AVX512-BF16,AVX512-VBMI``).
    Environment: ``GPTQ_ASCEND_CPU_ISA``, ``GPTQ_ASCEND_CPU_SMALL_M_MAX``, ``GPTQ_ASCEND_CPU_W8A8``,
    ``GPTQ_ASCEND_CPU_BRGEMM``.
    """
    if _IMPORT_ERROR is not None:
        raise BackendError(CPUBackend().available()[1])
    return torch.ops.gptq_ascend.cpu_kernel_config(isa, -1 if small_m_max is None else small_m_max,
                                                   -1 if small_m_max_f32 is None else small_m_max_f32,
                                                   -1 if w8a8 is None else int(w8a8),
                                                   -1 if brgemm is None else int(brgemm))


def int8_activations(bits: int, m: int, dtype: torch.dtype) -> bool:
    """Whether ``cpu_gemm`` rounds x to int8 (the opt-in W8A8 / W4A8 kernels) for ``m`` rows of x of
    ``dtype`` on a ``bits``-bit layer packed by :meth:`CPUBackend.repack`, under the settings now in force
    (:func:`kernel_config`). The answer is the kernel dispatch's own rule (csrc/cpu/ops.cpp,
    ``int8_activations``), so callers ask here instead of repeating it."""
    if _IMPORT_ERROR is not None:
        raise BackendError(CPUBackend().available()[1])
    if not hasattr(torch.ops.gptq_ascend, "cpu_int8_activations"):
        raise BackendError("the C++ extension gptq_ascend._C predates cpu_int8_activations; rebuild it (`make env`)")
    return bool(torch.ops.gptq_ascend.cpu_int8_activations(bits, m, dtype))


def kernel_settings() -> dict[str, str]:
    """:func:`kernel_config` as a dict."""
    return dict(item.split("=", 1) for item in kernel_config().split())


def describe_tier(s: dict[str, str]) -> str:
    """One sentence for the log from :func:`kernel_settings`: the tier, why it and not the one above it,
    the switch-overs and what large batches run on. The reason is the kernel's own ``why=`` field (the
    C++ side, csrc/cpu/config.cpp, owns what each tier needs); this only words it."""
    why = s.get("why", "")
    if why.startswith("lacks:"):
        why = "this CPU has no " + why.removeprefix("lacks:").replace(",", ", ")
    else:
        why = {"best": "the best tier", "cap": f"capped by GPTQ_ASCEND_CPU_ISA={s.get('cap')}",
               "requested": "set by kernel_config below a tier this CPU runs"}.get(why, f"reason '{why}'")
    large = {"brgemm": "oneDNN's brgemm on dequantized BF16 tiles", "bf16": "BF16 GEMM on dequantized tiles",
             "fp32": "fp32 GEMM on dequantized tiles (bf16 activations widened: no native BF16)"}
    return (f"CPU kernel tier {s['isa']} ({why}); fused up to M={s['small_m_max_bf16']} (bf16) / "
            f"{s['small_m_max_f32']} (fp32, fp16), larger M: {large.get(s.get('large_m_bf16', ''), '?')}; "
            f"L2 {s.get('l2', '?')}, L3 {s.get('l3', '?')}, {s['threads']} threads")


register_backend(CPUBackend())
