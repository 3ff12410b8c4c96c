"""The CPU kernel (``csrc/cpu``, ``gptq_ascend.backends.cpu``) against independent float64 math.

Every layer here is built from random codes, zero points and scales drawn in the test; the expected
weight ``W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]`` is computed in float64 from those
values directly (not by ``format.dequantize``), and only the GPTQ tensors handed to the backend go
through ``format.pack`` / ``format.pack_zeros``. Each configuration runs on every kernel ISA this CPU
can execute (AVX-512, AVX2, portable), for M on both sides of the fused/GEMM switch-over.

Error bounds (relative Frobenius norm of y - x @ W against x @ W, both in float64 from the same
rounded x): the op accumulates in fp32 and rounds once to x's dtype, so the bound is the output
rounding plus fp32 accumulation:
* float32: 5e-6  (fp32 accumulation over K <= 200 terms; worst measured 6.4e-7)
* float16: 1e-3  (one fp16 rounding of the output, <= 2**-11 relative; worst measured 2.7e-4)
* bfloat16: 1e-2 (one bf16 rounding of the output, <= 2**-8 relative; the GEMM path also rounds W
  to bf16, as dense BF16 does; worst measured 2.2e-3 fused, 3.3e-3 GEMM path)
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from gptq_ascend import format as fmt
from gptq_ascend.errors import BackendError

from .conftest import fixture_info, gptq_fixture_dirs

cpu_mod = pytest.importorskip("gptq_ascend.backends.cpu")
BACKEND = cpu_mod.CPUBackend()
_OK, _WHY = BACKEND.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"CPU backend unavailable: {_WHY}")

REL_TOL = {torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


TIERS = ("avx512vbmi", "avx512bf16", "avx512", "avx2", "generic")  # best first, as the kernel ranks them


def cpu_flags() -> set[str]:
    """This CPU's feature flags as the kernel reports them to Linux (/proc/cpuinfo), read here
    independently of the kernel's own detection."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


FLAGS = cpu_flags()
# The features the kernel names when it refuses a tier (its labels), in /proc/cpuinfo's names, and what
# each tier needs.
FEATURE_FLAGS = {"AVX512-F/BW/VL/DQ": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
                 "AVX512-BF16": {"avx512_bf16"}, "AVX512-VBMI": {"avx512vbmi"},
                 "AVX2/FMA/F16C": {"avx2", "fma", "f16c"}}
TIER_FEATURES = {"avx512vbmi": ("AVX512-F/BW/VL/DQ", "AVX512-BF16", "AVX512-VBMI"),
                 "avx512bf16": ("AVX512-F/BW/VL/DQ", "AVX512-BF16"), "avx512": ("AVX512-F/BW/VL/DQ",),
                 "avx2": ("AVX2/FMA/F16C",), "generic": ()}
# Whether this CPU has what each tier needs.
TIER_NEEDS = {t: all(FEATURE_FLAGS[f] <= FLAGS for f in feats) for t, feats in TIER_FEATURES.items()}
# GPTQ_ASCEND_CPU_ISA caps the process at a tier (CI runs this module under each lower tier).
CAP = os.environ.get("GPTQ_ASCEND_CPU_ISA", "") or "auto"


def expected_tiers() -> list[str]:
    """The tiers this process should be able to select, from /proc/cpuinfo and the cap alone."""
    tiers = [t for t in TIERS if TIER_NEEDS[t]] if FLAGS else ["generic"]
    return tiers[tiers.index(CAP):] if CAP in tiers else tiers


def _isas() -> list[str]:
    if not _OK:
        return []
    out = []
    for isa in TIERS:
        try:
            cpu_mod.kernel_config(isa)
            out.append(isa)
        except RuntimeError:
            pass
    cpu_mod.kernel_config("auto")
    return out


ISAS = _isas()


_DEFAULTS = cpu_mod.kernel_settings() if _OK else {"small_m_max_bf16": "0", "small_m_max_f32": "0"}


def switch_for(dt: torch.dtype) -> int:
    """The largest M the fused kernel takes for activations of this dtype (default settings)."""
    return int(_DEFAULTS["small_m_max_bf16" if dt == torch.bfloat16 else "small_m_max_f32"])


@pytest.fixture
def isa_config():
    """Restore the kernel's ISA and switch-over after a test changes them."""
    yield cpu_mod.kernel_config
    cpu_mod.kernel_config("reset")


# ---------------------------------------------------------------------------------------------
# Independent layers
# ---------------------------------------------------------------------------------------------


def make_layer(k: int, n: int, bits: int, group_size: int, sym: bool, act_order: bool, ckpt_format: str,
               seed: int = 0, scale_dtype=torch.float16):
    """Random GPTQ layer: (GPTQTensors, spec, W float64 [K, N]) with W computed from the raw values."""
    gen = torch.Generator().manual_seed(seed)
    spec = fmt.QuantSpec(bits, group_size, sym, act_order, ckpt_format)
    gs = k if group_size == -1 else group_size
    groups = math.ceil(k / gs)
    q = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int64)
    if sym:
        z = torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int64)
    else:
        z = torch.randint(0, 2**bits, (groups, n), generator=gen, dtype=torch.int64)
        z[0, : min(n, 3)] = torch.tensor([0, 2**bits - 1, 1])[: min(n, 3)]  # extremes, incl. the v1 borrow case
    s = (torch.rand(groups, n, generator=gen, dtype=torch.float64) * 0.05 + 1e-3).to(scale_dtype)
    g_idx = torch.arange(k) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    w = (q - z[g_idx]).double() * s.double()[g_idx]
    t = fmt.GPTQTensors(fmt.pack(q, bits, 0), fmt.pack_zeros(z, spec), s, g_idx.to(torch.int32))
    return t, spec, w


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def x_for(m: int, k: int, dtype, seed: int = 1, shape=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*(shape or (m,)), k, generator=gen).to(dtype)


# K not a multiple of any vector width (odd where the format allows: 3-bit needs multiples of 32),
# N not a multiple of 16 or 64; group sizes leave a short last group.
def shape_for(bits: int) -> tuple[int, int]:
    return (160, 72) if bits == 3 else (151, 72)


CONFIGS = list(itertools.product((8, 4, 3, 2), (32, 64, 128, -1), (True, False), (False, True),
                                 ("gptq", "gptq_v2")))


def cfg_id(c) -> str:
    bits, gs, sym, act, f = c
    return f"b{bits}-g{gs}-{'sym' if sym else 'asym'}-{'act' if act else 'seq'}-{f}"


# ---------------------------------------------------------------------------------------------
# Numerics: every bits / group / sym / act-order / v1-v2, every dtype, every ISA, M across the switch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_gemm_and_dequant_match_float64(cfg, isa_config):
    bits, gs, sym, act, f = cfg
    k, n = shape_for(bits)
    t, spec, w = make_layer(k, n, bits, gs, sym, act, f, seed=CONFIGS.index(cfg))
    packed = BACKEND.repack(t, spec, k)
    assert packed.backend == "cpu" and packed.in_features == k and packed.out_features == n
    assert ("zeros" in packed.tensors) == (not sym)
    for isa in ISAS:
        isa_config(isa)
        # dequant: exact in fp32 ((q - z) * s has <= 20 significant bits), one rounding otherwise.
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            got = BACKEND.dequant(packed, dt)
            assert got.dtype == dt and got.shape == (k, n)
            assert torch.equal(got, w.to(dt)), f"{isa} dequant {dt}"
        # Fused kernel (M = 1 and 3: direct; 9: decode-once tiles for bf16), then the dequant + GEMM path.
        for small_m_max, ms in ((None, (1, 3, 9)), (0, (5,))):
            if small_m_max is not None:
                isa_config(isa, small_m_max)
            for dt in DTYPES:
                for m in ms:
                    x = x_for(m, k, dt, seed=m)
                    y = BACKEND.gemm(x, packed)
                    assert y.dtype == dt and y.shape == (m, n)
                    err = rel_err(y, x.double() @ w)
                    assert err <= REL_TOL[dt], \
                        f"{isa} {dt} M={m} small_m_max={small_m_max}: relative error {err:.2e} > {REL_TOL[dt]:.0e}"
        isa_config("reset")


@pytest.mark.parametrize("m", (1, 2, 4, 9))
def test_every_int8_code_decodes_exactly(m, isa_config):
    """Each small-M decoder (fp32 conversion, VBMI byte tables, tiles) on all 256 codes, exactly: unit
    scales, z = 128 and one-hot BF16 rows make y[r] = q[k_r] - 128, an integer BF16 holds exactly, so
    a single wrong table entry or lane shows up as an inequality, not as noise inside a tolerance."""
    k, n = 256, 256
    q = (torch.arange(k)[:, None] + torch.arange(n)[None, :]) % 256  # every code in every row and column
    spec = fmt.QuantSpec(8, 128, True, False, "gptq")
    z = torch.full((2, n), 128, dtype=torch.int64)
    t = fmt.GPTQTensors(fmt.pack(q, 8, 0), fmt.pack_zeros(z, spec), torch.ones(2, n, dtype=torch.float16),
                        (torch.arange(k) // 128).to(torch.int32))
    p = BACKEND.repack(t, spec, k).tensors
    rows = torch.randperm(k, generator=torch.Generator().manual_seed(m))
    for isa in ISAS:
        isa_config(isa)
        for r0 in range(0, k, m):
            ks = rows[r0:r0 + m]
            x = torch.zeros(len(ks), k, dtype=torch.bfloat16)
            x[torch.arange(len(ks)), ks] = 1
            y = torch.full((len(ks), n), float("nan"), dtype=torch.bfloat16)
            torch.ops.gptq_ascend.cpu_gemm.out(x, p["codes"], p["scales"], p.get("zeros"), p["row_map"],
                                               p["group_ptr"], None, 8, float(spec.sym_zero), k, n, out=y)
            assert torch.equal(y, (q[ks] - 128).to(torch.bfloat16)), f"{isa} M={len(ks)} rows {ks.tolist()}"
    isa_config("reset")


@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_every_m_from_1_to_beyond_switch(bits, dt, isa_config):
    """Every row-tile split of the fused kernels (tiles of <= 6 rows, direct below 5 rows for bf16,
    decode-once tiles from 5), and both sides of this dtype's default switch-over to the GEMM path."""
    k, n = 200, 136
    t, spec, w = make_layer(k, n, bits, 64, False, True, "gptq", seed=bits)
    packed = BACKEND.repack(t, spec, k)
    s = switch_for(dt)
    for isa in ISAS[:2]:
        isa_config(isa)
        for m in [*range(1, 41), s, s + 1]:
            x = x_for(m, k, dt, seed=m)
            err = rel_err(BACKEND.gemm(x, packed), x.double() @ w)
            assert err <= REL_TOL[dt], f"{isa} M={m}: {err:.2e}"


@pytest.mark.parametrize("small_m_max", (0, 64))
def test_both_paths_agree(small_m_max, isa_config):
    """The same M through the fused kernel (small_m_max=64) and the dequant+GEMM path (0)."""
    k, n = 256, 192
    t, spec, w = make_layer(k, n, 8, 128, False, False, "gptq", seed=7)
    packed = BACKEND.repack(t, spec, k)
    isa_config("auto", small_m_max)
    x = x_for(24, k, torch.float32)
    assert rel_err(BACKEND.gemm(x, packed), x.double() @ w) <= 1e-6


LARGE_M_CONFIGS = [(8, -1, False, False), (8, 128, True, True), (4, 32, False, True), (4, -1, True, False),
                   (3, 128, False, True), (2, 64, True, False)]


@pytest.mark.parametrize("brgemm", (True, False), ids=("brgemm", "gemm-tiles"))
@pytest.mark.parametrize("cfg", LARGE_M_CONFIGS, ids=lambda c: f"b{c[0]}-g{c[1]}-{'sym' if c[2] else 'asym'}-"
                         f"{'act' if c[3] else 'seq'}")
def test_large_m_paths_match_float64(cfg, brgemm, isa_config):
    """The large-M paths on layers deeper than one dequantized tile (K chunks of 1024 padded rows, groups
    straddling them, act-order), N not a multiple of 64, M not a power of two (brgemm splits rows into
    power-of-two calls) and with a bias; bf16 goes through oneDNN's brgemm (or ATen's GEMM on dequantized
    tiles), fp32 / fp16 through the fp32 GEMM."""
    bits, gs, sym, act = cfg
    k, n = (2336, 136) if bits == 3 else (2339, 136)
    t, spec, w = make_layer(k, n, bits, gs, sym, act, "gptq", seed=11 + bits)
    packed = BACKEND.repack(t, spec, k)
    isa_config("auto", 0, 0, brgemm=brgemm)
    if brgemm:
        # brgemm needs native BF16 dot products: the active tier must be avx512bf16 or better.
        settings = cpu_mod.kernel_settings()
        if ISAS[0] not in ("avx512vbmi", "avx512bf16"):
            assert settings["brgemm"] == "1(no-bf16:off)", settings
            pytest.skip(f"tier {ISAS[0]} has no native BF16 (kernel: brgemm={settings['brgemm']}): the "
                        "gemm-tiles case covers this tier's large-M path")
        assert settings["brgemm"] == "1", f"oneDNN's brgemm ukernel is unusable on this machine: {settings}"
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for dt in DTYPES:
        for m in (1, 7, 300):
            x = x_for(m, k, dt, seed=m)
            out = torch.full((m, n), float("nan"), dtype=dt)
            p = packed.tensors
            torch.ops.gptq_ascend.cpu_gemm.out(x, p["codes"], p["scales"], p.get("zeros"), p["row_map"],
                                               p["group_ptr"], bias, bits, float(spec.sym_zero), k, n, out=out)
            err = rel_err(out, x.double() @ w + bias.double())
            assert err <= REL_TOL[dt], f"{dt} M={m} brgemm={brgemm}: relative error {err:.2e} > {REL_TOL[dt]:.0e}"


@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_no_cliff_at_the_switch_overs(dt):
    """No path switch makes a row much dearer: on the active tier, the per-row time just above each
    switch-over (the fused kernel's direct -> tiled step at 5 rows, and fused -> large-M at this dtype's
    small_m_max) stays within 3x of the per-row time just below it. Issue 10's cliff was 26x (bf16 at
    M = 257 on a CPU without native BF16 took a BF16 GEMM ATen can only emulate). A generous bound on a
    ratio taken in one process: one thread and its CPU time (a descheduled second thread on a shared
    machine would stall a two-thread call for a whole time slice), minimum of interleaved calls."""
    import time

    k, n = 2048, 1024
    t, spec, _ = make_layer(k, n, 8, 128, True, False, "gptq", seed=21)
    packed = BACKEND.repack(t, spec, k)
    s = switch_for(dt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for below in (4, s):
            xs = {m: x_for(m, k, dt, seed=m) for m in (below, below + 1)}
            best = {m: float("inf") for m in xs}
            for _ in range(5):
                for m, x in xs.items():
                    t0 = time.thread_time()
                    BACKEND.gemm(x, packed)
                    best[m] = min(best[m], time.thread_time() - t0)
            per_row = {m: best[m] / m for m in xs}
            assert per_row[below + 1] <= 3 * per_row[below], (
                f"{ISAS[0]} {dt}: M={below + 1} costs {per_row[below + 1] * 1e3:.3f} ms/row, M={below} "
                f"{per_row[below] * 1e3:.3f} ms/row ({cpu_mod.kernel_config()})")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("m,small_m_max", ((1, None), (5, None), (70, None), (70, 0)))
def test_bias_batch_dims_and_out_variant(bits, dt, m, small_m_max, isa_config):
    if small_m_max is not None:
        isa_config("auto", small_m_max)
    k, n = 96, 80
    t, spec, w = make_layer(k, n, bits, 32, True, False, "gptq_v2", seed=3)
    packed = BACKEND.repack(t, spec, k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    x = x_for(m, k, dt, shape=(2, m))  # [2, m, K]: M = 2m rows (fused kernel; GEMM path tested below)
    y = BACKEND.gemm(x, packed, bias)
    assert y.shape == (2, m, n) and y.dtype == dt
    ref = x.double() @ w + bias.double()
    assert rel_err(y, ref) <= REL_TOL[dt]
    # out= variant: a poisoned buffer must be overwritten entirely, with the functional result.
    p = packed.tensors
    out = torch.full((2, m, n), float("nan"), dtype=dt)
    ret = torch.ops.gptq_ascend.cpu_gemm.out(x, p["codes"], p["scales"], p.get("zeros"), p["row_map"],
                                             p["group_ptr"], bias, bits, float(spec.sym_zero), k, n, out=out)
    assert ret.data_ptr() == out.data_ptr()
    assert not bool(out.isnan().any())
    assert torch.equal(out, y)


def test_scales_in_float32_and_bfloat16():
    """Non-fp16 scales are kept in fp32 (exactly), not squeezed into fp16."""
    k, n = 128, 64
    for sdt in (torch.float32, torch.bfloat16):
        t, spec, w = make_layer(k, n, 4, 32, False, False, "gptq", seed=11, scale_dtype=sdt)
        packed = BACKEND.repack(t, spec, k)
        assert packed.tensors["scales"].dtype == torch.float32
        assert torch.equal(BACKEND.dequant(packed, torch.float32), w.float())


def test_empty_batch():
    k, n = 64, 64
    t, spec, _ = make_layer(k, n, 8, 32, True, False, "gptq")
    y = BACKEND.gemm(torch.empty(0, k), BACKEND.repack(t, spec, k))
    assert y.shape == (0, n)


# ---------------------------------------------------------------------------------------------
# Opt-in int8 activations (W8A8, 8-bit layers, AVX512-VNNI)
# ---------------------------------------------------------------------------------------------


def w8a8_emulated(x: torch.Tensor, w: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """What the W8A8 kernel computes, in float64: per row and group, scale = max|x| / 127 and
    xq = round(x * (127 / max|x|)) in float32 (round half to even, as std::nearbyint), clamped to 127."""
    xf = x.float()
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    for j in torch.unique(g_idx).tolist():
        rows = (g_idx == j).nonzero().flatten()
        xg = xf[:, rows]
        amax = xg.abs().amax(dim=1, keepdim=True)
        inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
        xq = torch.round(xg * inv).clamp(-127, 127)
        y += (amax / 127).double() * (xq.double() @ w[rows])
    return y


W8A8_OK = _OK and "w8a8" in _DEFAULTS and "avx512" in ISAS


@pytest.mark.skipif(not W8A8_OK, reason="needs the AVX-512 kernels")
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] == 8], ids=cfg_id)
def test_w8a8_opt_in(cfg, isa_config):
    bits, gs, sym, act, f = cfg
    k, n = shape_for(bits)
    t, spec, w = make_layer(k, n, bits, gs, sym, act, f, seed=CONFIGS.index(cfg))
    packed = BACKEND.repack(t, spec, k)
    if not os.environ.get("GPTQ_ASCEND_CPU_W8A8"):
        assert _DEFAULTS["w8a8"] == "0", "int8 activations must be opt-in"
    desc = isa_config("avx512", w8a8=True)
    if "no-vnni" in desc:
        pytest.skip("this CPU has no AVX512-VNNI: the opt-in falls back to the exact kernel")
    try:
        for dt in DTYPES:
            for m in (1, 4, 5, 7, 13, 16, 33):  # tiles of 5; 4+3; 5+4+4; 6+5+5; 6x3+5x3
                x = x_for(m, k, dt, seed=m)
                y = BACKEND.gemm(x, packed).double()
                exact = x.double() @ w
                if m < 5:  # below the tiled range the exact kernel runs, flag or not
                    assert rel_err(y, exact) <= REL_TOL[dt]
                    continue
                # the kernel is exactly the emulation up to fp32 accumulation and the output rounding ...
                assert rel_err(y, w8a8_emulated(x, w, t.g_idx.long())) <= REL_TOL[dt], f"{dt} M={m}"
                # ... and rounding x to 8 bits per group costs < 2% (measured <= 0.9% on Gaussian x)
                assert rel_err(y, exact) <= 2e-2, f"{dt} M={m}"
    finally:
        isa_config("auto", w8a8=False)


@pytest.mark.skipif(not W8A8_OK, reason="needs the AVX-512 kernels")
def test_w8a8_leaves_4bit_exact(isa_config):
    t, spec, w = make_layer(128, 64, 4, 32, False, False, "gptq")
    packed = BACKEND.repack(t, spec, 128)
    isa_config("avx512", w8a8=True)
    try:
        x = x_for(16, 128, torch.float32)
        assert rel_err(BACKEND.gemm(x, packed), x.double() @ w) <= REL_TOL[torch.float32]
    finally:
        isa_config("auto", w8a8=False)


@pytest.mark.parametrize("bits", (8, 4, 3, 2))
def test_int8_activations_says_what_the_kernel_does(bits, isa_config):
    """``int8_activations`` (the kernel dispatch's own rule, which benchmarks.dequant asks) against what
    the op computes, on every tier this CPU runs, with the opt-in off and on, on both sides of the
    fused/large-M switch (the tier's own and one lowered to M = 8): where it says int8, the output is
    the float64 emulation of int8 x and clearly farther from the exact product; where it says exact,
    the reverse. One group of K = 256 and x with one entry of 40 per row, so the int8 step is coarse:
    rounding x to int8 then costs ~3e-2 relative against the outputs' own rounding (~1e-3 for bf16, far
    less for fp16 / fp32), and the two references are well apart (Gaussian x alone gave bf16 margins of
    only 0.42)."""
    k, n = 256, 136
    t, spec, w = make_layer(k, n, bits, -1, False, True, "gptq", seed=40 + bits)
    packed = BACKEND.repack(t, spec, k)
    g_idx = t.g_idx.long()
    seen = set()
    for isa in ISAS:
        for w8a8, small_m_max in ((False, None), (True, None), (True, 8)):
            isa_config("reset")
            desc = isa_config(isa, small_m_max, w8a8=w8a8)
            for dt in DTYPES:
                switch = int(cpu_mod.kernel_settings()["small_m_max_bf16" if dt == torch.bfloat16
                                                       else "small_m_max_f32"])
                for m in sorted({1, 4, 5, 16, switch + 1}):
                    x = x_for(m, k, dt, seed=m + bits)
                    x[:, 3] = 40
                    said = cpu_mod.int8_activations(bits, m, dt)
                    y = BACKEND.gemm(x, packed).double()
                    exact, emulated = x.double() @ w, w8a8_emulated(x, w, g_idx)
                    near, far = (emulated, exact) if said else (exact, emulated)
                    d_near, d_far = rel_err(y, near), rel_err(y, far)
                    where = f"{desc.split()[0]} w8a8={w8a8} small_m_max={small_m_max} {dt} M={m} said={said}"
                    assert d_near <= REL_TOL[dt] and d_near < 0.5 * d_far, f"{where}: {d_near:.2e} vs {d_far:.2e}"
                    assert not said or (w8a8 and m <= switch), where  # opt-in, fused path only
                    seen.add((isa, said))
    isa_config("reset")
    # What this CPU should report: the AVX2 tier takes int8 x for every width, an AVX-512 tier with
    # VNNI for 8-bit layers only (from M = 5), the portable tier never.
    if "avx2" in ISAS:
        assert ("avx2", True) in seen, "the AVX2 tier never took int8 activations"
    if "avx512" in ISAS and "avx512_vnni" in FLAGS:
        assert (("avx512", True) in seen) == (bits == 8), "AVX-512 VNNI takes int8 x for 8-bit layers only"
    assert ("generic", True) not in seen


# ---------------------------------------------------------------------------------------------
# torch.compile / fake tensors
# ---------------------------------------------------------------------------------------------


def test_opcheck_and_compile():
    k, n = 128, 96
    t, spec, w = make_layer(k, n, 4, 64, False, True, "gptq", seed=2)
    packed = BACKEND.repack(t, spec, k)
    p = packed.tensors
    x = x_for(3, k, torch.bfloat16)
    args = (x, p["codes"], p["scales"], p.get("zeros"), p["row_map"], p["group_ptr"], None, 4,
            float(spec.sym_zero), k, n)
    torch.library.opcheck(torch.ops.gptq_ascend.cpu_gemm.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.gptq_ascend.cpu_dequant.default,
                          args[1:6] + (4, float(spec.sym_zero), k, n, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))

    def f(x):
        return BACKEND.gemm(x, packed) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for m in (3, 9):
        xm = x_for(m, k, torch.bfloat16, seed=m)
        assert torch.equal(compiled(xm), f(xm))


# ---------------------------------------------------------------------------------------------
# Bad calls say what was expected
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_packed():
    t, spec, _ = make_layer(64, 64, 8, 32, False, False, "gptq")
    return BACKEND.repack(t, spec, 64)


def _op_args(packed, x0, **over):
    p = dict(packed.tensors)
    a = dict(x=x0, codes=p["codes"], scales=p["scales"], zeros=p.get("zeros"), row_map=p["row_map"],
             group_ptr=p["group_ptr"], bias=None, bits=packed.spec.bits, sym_zero=float(packed.spec.sym_zero),
             in_features=packed.in_features, out_features=packed.out_features)
    a.update(over)
    return a


def test_backend_rejects_bad_x(small_packed):
    with pytest.raises(BackendError, match="expected one of"):
        BACKEND.gemm(torch.zeros(2, 64, dtype=torch.float64), small_packed)
    with pytest.raises(BackendError, match=r"expected \[\.\.\., 64\]"):
        BACKEND.gemm(torch.zeros(2, 63), small_packed)
    with pytest.raises(BackendError, match="expected a cpu tensor"):
        BACKEND.gemm(torch.zeros(2, 64, device="meta"), small_packed)
    with pytest.raises(BackendError, match=r"bias has shape \(3,\); expected \(64,\)"):
        BACKEND.gemm(torch.zeros(2, 64), small_packed, torch.zeros(3))


@pytest.mark.parametrize("change,message", [
    (lambda p: {"x": torch.zeros(2, 64, dtype=torch.int32)}, "x must be float32, bfloat16 or float16"),
    (lambda p: {"x": torch.zeros(2, 65)}, r"x must have shape \[\.\.\., 64\]"),
    (lambda p: {"bits": 5}, "bits must be 2, 3, 4 or 8"),
    (lambda p: {"codes": p["codes"].flatten()[:-1]}, "codes must hold 1 blocks"),
    (lambda p: {"codes": p["codes"].view(torch.int8)}, "codes must be uint8"),
    (lambda p: {"scales": p["scales"].to(torch.bfloat16)}, "scales must be float16 or float32"),
    (lambda p: {"scales": p["scales"][:, :1]}, r"scales must have shape \[1, 2, 64\]"),
    (lambda p: {"zeros": p["zeros"].int()}, "zeros must be a contiguous uint8"),
    (lambda p: {"row_map": p["row_map"].long()}, "row_map must be a 1-D int32"),
    (lambda p: {"group_ptr": p["group_ptr"] + 2}, "group_ptr must run from 0"),
    (lambda p: {"bias": torch.zeros(63)}, r"bias must have shape \[64\]"),
    (lambda p: {"out_features": 65}, "codes must hold 2 blocks"),
])
def test_op_errors_say_what_was_expected(small_packed, change, message):
    a = _op_args(small_packed, torch.zeros(2, 64), **change(small_packed.tensors))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.gptq_ascend.cpu_gemm(**a)


def test_out_variant_errors(small_packed):
    a = _op_args(small_packed, torch.zeros(2, 64))
    with pytest.raises(RuntimeError, match="out must have x's dtype"):
        torch.ops.gptq_ascend.cpu_gemm.out(**a, out=torch.empty(2, 64, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"out must have shape \[2, 64\]"):
        torch.ops.gptq_ascend.cpu_gemm.out(**a, out=torch.empty(2, 65))
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        torch.ops.gptq_ascend.cpu_gemm.out(**a, out=torch.empty(64, 2).t())


def test_tiers_are_what_this_cpu_and_cap_allow(isa_config):
    """The kernel selects exactly the tiers /proc/cpuinfo (read here) and GPTQ_ASCEND_CPU_ISA allow,
    "auto" is the best of them, and each refusal names what is missing."""
    assert ISAS == expected_tiers(), (ISAS, FLAGS & {"avx2", "avx512f", "avx512_bf16", "avx512vbmi"}, CAP)
    s = cpu_mod.kernel_settings()
    assert s["isa"] == ISAS[0]
    assert s["bf16_dot"] == ("1" if ISAS[0] in ("avx512vbmi", "avx512bf16") else "0")
    assert s["large_m_bf16"] == ("brgemm" if s["bf16_dot"] == "1" else "fp32")
    assert s["cap"] == ("none" if CAP == "auto" else CAP)
    for tier in TIERS:
        if tier in ISAS:
            continue
        why = "caps this process" if TIER_NEEDS[tier] else "this CPU lacks"
        with pytest.raises(RuntimeError, match=f"isa '{tier}' requested but .*{why}"):
            cpu_mod.kernel_config(tier)


def test_why_is_what_this_cpu_and_cap_imply(isa_config):
    """The settings' why= field and the log sentence give the reason /proc/cpuinfo (read here) and
    GPTQ_ASCEND_CPU_ISA imply for the tier "auto" chose, and say so when a lower tier was asked for."""
    s = cpu_mod.kernel_settings()
    above = TIERS[:TIERS.index(s["isa"])]
    if not above:
        assert s["why"] == "best", s
        assert "(the best tier)" in BACKEND.describe()
    elif CAP != "auto":
        assert s["why"] == "cap", s
        assert f"(capped by GPTQ_ASCEND_CPU_ISA={CAP})" in BACKEND.describe()
    else:
        lacks = {f for t in above for f in TIER_FEATURES[t] if not FEATURE_FLAGS[f] <= FLAGS}
        assert s["why"].startswith("lacks:") and set(s["why"].removeprefix("lacks:").split(",")) == lacks, s
        assert f"(this CPU has no {s['why'].removeprefix('lacks:').replace(',', ', ')})" in BACKEND.describe()
    if len(ISAS) > 1:
        isa_config(ISAS[-1])
        assert cpu_mod.kernel_settings()["why"] == "requested"
        assert "(set by kernel_config below a tier this CPU runs)" in BACKEND.describe()


def test_config_errors():
    with pytest.raises(RuntimeError,
                       match="unknown isa 'sse9'; expected one of auto, avx512vbmi, avx512bf16, avx512, avx2, generic"):
        cpu_mod.kernel_config("sse9")
    with pytest.raises(RuntimeError, match="dtype must be float32, bfloat16, float16 or float64"):
        t, spec, _ = make_layer(64, 64, 8, 32, True, False, "gptq")
        p = BACKEND.repack(t, spec, 64).tensors
        torch.ops.gptq_ascend.cpu_dequant(p["codes"], p["scales"], None, p["row_map"], p["group_ptr"], 8, 128.0,
                                          64, 64, torch.int8)


def test_backend_registered_and_chosen():
    from gptq_ascend import ops

    assert ops.get_backend("cpu") is not None
    backend, reason = ops.choose_backend("cpu", fmt.QuantSpec(8, 128), 2048, 2048)
    assert backend.name == "cpu", reason


# ---------------------------------------------------------------------------------------------
# Against GPTQModel-written checkpoints (tests/fixtures, made by tools/make_fixtures.py)
# ---------------------------------------------------------------------------------------------

FIXTURES = gptq_fixture_dirs()


@pytest.mark.skipif(not FIXTURES, reason="tests/fixtures has no GPTQModel-written checkpoints "
                    "(generate them with tools/make_fixtures.py)")
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_gemm_equals_x_times_gptqmodel_dequantized_weight(fixture):
    from safetensors.torch import load_file

    from gptq_ascend.checkpoint import Checkpoint

    info = fixture_info(fixture)
    config = fmt.GPTQConfig.load(fixture)
    ckpt = Checkpoint.open(fixture)
    expected = load_file(str(fixture / "expected" / "dequantized.safetensors"))
    layers = ckpt.quantized_layers()
    assert layers, info.get("name")
    for prefix in layers:
        spec = config.spec_for(prefix)
        t = ckpt.layer_tensors(prefix)
        w_gm = expected[f"{prefix}.weight"].double()  # GPTQModel's dequantize_weight(): [in, out]
        k = w_gm.shape[0]
        packed = BACKEND.repack(t, spec, k)
        x = x_for(5, k, torch.float32, seed=k)
        y = BACKEND.gemm(x, packed).double()
        ref = x.double() @ w_gm
        # GPTQModel rounds each weight to its scales' dtype (fp16): at most one fp16 ulp per weight
        # (relative 2**-10), plus our fp32 accumulation. Element-wise:
        bound = (x.double().abs() @ w_gm.abs()) * (2.0**-10 + 1e-6) + 1e-6
        assert bool(((y - ref).abs() <= bound).all()), \
            f"{fixture.name}:{prefix}: max |y - x@W_gptqmodel| = {float((y - ref).abs().max()):.3g}"
        # bf16 activations, fused kernel and dequant + GEMM path: within the bf16 bound of the module doc
        for m in (5, switch_for(torch.bfloat16) + 1):
            xb = x_for(m, k, torch.bfloat16, seed=k + m)
            err = rel_err(BACKEND.gemm(xb, packed), xb.double() @ w_gm)
            assert err <= REL_TOL[torch.bfloat16], f"{fixture.name}:{prefix} bf16 M={m}: {err:.2e}"
        # and the weights themselves: ours (fp32, exact) rounds to GPTQModel's fp16 values
        if expected[f"{prefix}.weight"].dtype == torch.float16:
            assert torch.equal(BACKEND.dequant(packed, torch.float16), expected[f"{prefix}.weight"]), prefix


# ---------------------------------------------------------------------------------------------
# The benchmark's smoke mode
# ---------------------------------------------------------------------------------------------


def test_benchmark_quick_smoke(tmp_path):
    """`python -m benchmarks.dequant --quick` runs, writes every figure, and every method it times
    computes the same product as ours (it checks that before timing)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.dequant", "--quick", "--json", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["points"] and data["bandwidth_gbs_before"]
    for p in data["points"]:
        assert p["ms"]["ours"] > 0
        for name, rel in p["agreement"].items():
            assert rel < 2e-2, (p["shape"], p["bits"], name, rel)
