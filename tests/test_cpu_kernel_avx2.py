"""The AVX2 kernels (csrc/cpu/kernel_avx2.cpp on the shared driver csrc/cpu/driver.inc) against
independent float64 math, on every CPU that has AVX2 + FMA + F16C (forced with
``kernel_config("avx2")``, so an AVX-512 machine runs them too).

The expected products are built here from the raw codes, zero points and scales the test draws
(``tests/test_cpu_kernel.make_layer``: ``W = (q - z) * s`` in float64), never by running a kernel. The
shapes and M values are chosen to reach every code path of the AVX2 kernels: direct tiles (M below
the decode-once threshold: 12 rows for 8-bit, 7 for <= 4-bit), decode-once tiles, row tiles of 1..6
rows (the driver splits M into even tiles of <= 6), every strip width, chunks of 64 / 32 k-pairs (K
up to 600 with group -1 spans several), N not a multiple of 8 or 64 (the tail store), the opt-in
W8A8 kernel, and the switch-over to the large-M path.
"""

from __future__ import annotations

import pytest
import torch

from gptq_ascend import format as fmt

from .conftest import gptq_fixture_dirs
from .test_cpu_kernel import BACKEND, REL_TOL, make_layer, rel_err, w8a8_emulated, x_for

cpu_mod = pytest.importorskip("gptq_ascend.backends.cpu")
_OK, _WHY = BACKEND.available()


def _avx2_reason() -> str | None:
    """None when this CPU runs the AVX2 kernels, else the kernel's own reason."""
    if not _OK:
        return f"CPU backend unavailable: {_WHY}"
    try:
        cpu_mod.kernel_config("avx2")
    except RuntimeError as e:
        return str(e).splitlines()[0]
    finally:
        cpu_mod.kernel_config("reset")
    return None


_WHY_NOT = _avx2_reason()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def avx2():
    """The AVX2 tier for the test's duration, exact (int8 activations off even if GPTQ_ASCEND_CPU_W8A8 is
    set in the environment: the opt-in tests switch them on themselves); the start-up settings after."""
    desc = cpu_mod.kernel_config("avx2", w8a8=False)
    assert "isa=avx2" in desc, desc
    yield cpu_mod.kernel_config
    cpu_mod.kernel_config("reset")


def gemm_out(x: torch.Tensor, packed, bias=None) -> torch.Tensor:
    """The op's out= variant into a NaN-poisoned buffer: every output element must be written."""
    p = packed.tensors
    y = torch.full((*x.shape[:-1], packed.out_features), float("nan"), dtype=x.dtype)
    torch.ops.gptq_ascend.cpu_gemm.out(x, p["codes"], p["scales"], p.get("zeros"), p["row_map"], p["group_ptr"],
                                       bias, packed.spec.bits, float(packed.spec.sym_zero), packed.in_features,
                                       packed.out_features, out=y)
    assert not torch.isnan(y).any(), "output elements left unwritten"
    return y


def small_m_max_f32() -> int:
    return int(cpu_mod.kernel_settings()["small_m_max_f32"])


# Every M through 40 covers direct tiles of 1..6 rows, both decode-once thresholds and tile splits up
# to 7 tiles; 63/64/65 and the switch-over (and one above it: the large-M path) the rest.
M_VALUES = [*range(1, 41), 63, 64, 65]


@pytest.mark.parametrize("bits", (8, 4, 3, 2))
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("act", (False, True), ids=("seq", "act"))
@pytest.mark.parametrize("gs", (32, -1))
def test_avx2_matches_float64(bits, sym, act, gs, avx2):
    # K odd (3-bit needs multiples of 32); N = 136: two full blocks and a tail of one whole vector of 8
    # columns, N = 75: a tail that is not a whole vector.
    k = 160 if bits == 3 else 151
    for n in ((136,) if act else (75,)):
        t, spec, w = make_layer(k, n, bits, gs, sym, act, "gptq", seed=bits * 10 + n + gs)
        packed = BACKEND.repack(t, spec, k)
        for dt in DTYPES:
            for m in M_VALUES:
                x = x_for(m, k, dt, seed=m)
                err = rel_err(gemm_out(x, packed), x.double() @ w)
                assert err <= REL_TOL[dt], f"int{bits} {dt} N={n} M={m}: relative error {err:.2e}"


@pytest.mark.parametrize("bits", (8, 4))
def test_avx2_long_k_several_chunks_and_bias(bits, avx2):
    """group -1 with K = 600 (300 k-pairs: several 128 / 64 / 32 k-pair chunks in one group, accumulators
    carried across chunks), fp32 scales, a bias, batch dims, and M at and above the switch-over."""
    k, n = 600, 200
    t, spec, w = make_layer(k, n, bits, -1, False, True, "gptq_v2", seed=7, scale_dtype=torch.float32)
    packed = BACKEND.repack(t, spec, k)
    assert packed.tensors["scales"].dtype == torch.float32
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    s = small_m_max_f32()
    for dt in DTYPES:
        for m in (1, 3, 6, 12, 13, s, s + 1):
            x = x_for(m, k, dt, seed=m)
            ref = x.double() @ w + bias.to(dt).double()
            err = rel_err(gemm_out(x, packed, bias.to(dt)), ref)
            assert err <= REL_TOL[dt], f"int{bits} {dt} M={m}: {err:.2e}"
        x3 = x_for(1, k, dt, seed=5, shape=(2, 3))
        err = rel_err(BACKEND.gemm(x3, packed), x3.double() @ w)
        assert err <= REL_TOL[dt], f"int{bits} {dt} batch dims: {err:.2e}"


@pytest.mark.parametrize("m", (1, 2, 3, 4, 5, 6, 7, 12, 16))
def test_avx2_every_int8_code_exact(m, avx2):
    """All 256 codes in every row and column, unit scales, z = 128, one-hot fp32 rows: y[r] = q[k_r] -
    128 exactly, so a wrong lane, slot or pair reduction shows as an inequality, not as noise."""
    k, n = 256, 256
    q = (torch.arange(k)[:, None] + torch.arange(n)[None, :]) % 256
    spec = fmt.QuantSpec(8, 128, True, False, "gptq")
    z = torch.full((2, n), 128, dtype=torch.int64)
    t = fmt.GPTQTensors(fmt.pack(q, 8, 0), fmt.pack_zeros(z, spec), torch.ones(2, n, dtype=torch.float16),
                        (torch.arange(k) // 128).to(torch.int32))
    packed = BACKEND.repack(t, spec, k)
    rows = torch.randperm(k, generator=torch.Generator().manual_seed(m))
    for dt in DTYPES:
        for r0 in range(0, k, m):
            ks = rows[r0:r0 + m]
            x = torch.zeros(len(ks), k, dtype=dt)
            x[torch.arange(len(ks)), ks] = 1
            assert torch.equal(gemm_out(x, packed), (q[ks] - 128).to(dt)), f"{dt} M={len(ks)} rows {ks.tolist()}"


@pytest.mark.parametrize("bits", (4, 3, 2))
@pytest.mark.parametrize("m", (1, 2, 3, 4, 5, 6, 7, 8, 16))
def test_avx2_every_nibble_exact(bits, m, avx2):
    """Every code of the nibble layout in both halves of a byte (even and odd k) and every column
    position of the layout's byte permutation, asymmetric with z = 0: y[r] = q[k_r] exactly."""
    k, n = 128, 128
    q = (torch.arange(k)[:, None] * 3 + torch.arange(n)[None, :]) % 2**bits
    spec = fmt.QuantSpec(bits, 128, False, False, "gptq_v2")
    z = torch.zeros((1, n), dtype=torch.int64)
    t = fmt.GPTQTensors(fmt.pack(q, bits, 0), fmt.pack_zeros(z, spec), torch.ones(1, n, dtype=torch.float16),
                        torch.zeros(k, dtype=torch.int32))
    packed = BACKEND.repack(t, spec, k)
    assert "zeros" in packed.tensors
    rows = torch.randperm(k, generator=torch.Generator().manual_seed(m + bits))
    # every dtype: at M = 1 bf16 / fp16 take the +128 decode (I4Bias128), fp32 the exact tables (I4Lut);
    # M = 4 and 6 the tables for every dtype (I4LutRows), M = 2, 3, 5 the conversion decode (I4F32)
    for dt in DTYPES:
        for r0 in range(0, k, m):
            ks = rows[r0:r0 + m]
            x = torch.zeros(len(ks), k, dtype=dt)
            x[torch.arange(len(ks)), ks] = 1
            assert torch.equal(gemm_out(x, packed), q[ks].to(dt)), f"int{bits} {dt} M={len(ks)} rows {ks.tolist()}"


@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("act", (False, True), ids=("seq", "act"))
def test_avx2_w8a8_opt_in(sym, act, avx2):
    """The opt-in int8-activation mode on AVX2 (vpmaddwd): the float64 emulation of the quantized x
    (the same quantization as the AVX-512 VNNI kernel) up to fp32 accumulation and output rounding, and
    within 2% of the exact product; below M = 5 the exact kernel runs (4-bit layers: test_avx2_w4a8_opt_in)."""
    k, n = 256, 136
    t, spec, w = make_layer(k, n, 8, 64, sym, act, "gptq", seed=11)
    packed = BACKEND.repack(t, spec, k)
    avx2("", w8a8=True)  # the emulation check below fails on the exact kernel (x rounding is ~1e-2)
    for dt in DTYPES:
        for m in (1, 4, 5, 7, 13, 16, 33):
            x = x_for(m, k, dt, seed=m)
            y = gemm_out(x, packed).double()
            exact = x.double() @ w
            if m < 5:
                assert rel_err(y, exact) <= REL_TOL[dt], f"{dt} M={m}"
                continue
            assert rel_err(y, w8a8_emulated(x, w, t.g_idx.long())) <= REL_TOL[dt], f"{dt} M={m}"
            assert rel_err(y, exact) <= 2e-2, f"{dt} M={m}"



@pytest.mark.parametrize("bits", (4, 3, 2))
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("act", (False, True), ids=("seq", "act"))
@pytest.mark.parametrize("gs", (64, -1))
def test_avx2_w4a8_opt_in(bits, sym, act, gs, avx2):
    """The opt-in int8-activation mode on <=4-bit layers (vpmaddubsw, every M of the fused path, row
    tiles of <= 4 rows: M = 5 runs 3 + 2, 13 runs 4 + 3 + 3 + 3): the float64 emulation of the quantized
    x up to fp32 accumulation and output rounding, within 2% of the exact product; above the fused
    path's switch-over the exact large-M path runs, flag or not. K = 608 with one group spans several
    128-pair chunks; groups of 64 leave a short last group (a tail of the 8-pair int16 runs); N = 200
    ends in a partial vector. The fp32 / fp16 checks fail on the exact kernel (x rounding is ~6e-3)."""
    k, n = (608, 200) if bits == 3 else (601, 200)
    t, spec, w = make_layer(k, n, bits, gs, sym, act, "gptq", seed=bits * 4 + sym * 2 + act)
    packed = BACKEND.repack(t, spec, k)
    avx2("", w8a8=True)
    for dt in DTYPES:
        large = small_m_max_f32() + 1 if dt == torch.float32 else None
        for m in (1, 2, 3, 4, 5, 8, 13, large):
            if m is None:
                continue
            x = x_for(m, k, dt, seed=m + 20)
            y = gemm_out(x, packed).double()
            exact = x.double() @ w
            if m == large:
                assert rel_err(y, exact) <= REL_TOL[dt], f"int{bits} {dt} M={m}"
                continue
            assert rel_err(y, w8a8_emulated(x, w, t.g_idx.long())) <= REL_TOL[dt], f"int{bits} {dt} M={m}"
            assert rel_err(y, exact) <= 2e-2, f"int{bits} {dt} M={m}"


@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
def test_avx2_w4a8_int16_range(sym, avx2):
    """Largest codes times the largest int8 activations, one group of 2048 rows: with x of one sign every
    int16 run of 8 k-pairs of a q = 15 column reaches 8 * 2 * 15 * 127 = 30480 (one more pair, or a
    saturating pair sum, wraps it), and the group's int32 sum 2048 * 15 * 127 stays exact; a mixed-sign
    x checks the signed sums. x = +-1 quantizes exactly (xq = +-127), so the result is the exact product
    up to fp32 rounding, element-wise."""
    k, n = 2048, 128
    q = torch.full((k, n), 15, dtype=torch.int64)
    q[:, ::3] = torch.arange(k)[:, None].expand(k, n)[:, ::3] % 16  # some columns not constant
    spec = fmt.QuantSpec(4, -1, sym, False, "gptq_v2")
    z = torch.full((1, n), 8 if sym else 3, dtype=torch.int64)
    s = torch.full((1, n), 0.5, dtype=torch.float16)
    t = fmt.GPTQTensors(fmt.pack(q, 4, 0), fmt.pack_zeros(z, spec), s, torch.zeros(k, dtype=torch.int32))
    packed = BACKEND.repack(t, spec, k)
    w = (q - z).double() * 0.5
    avx2("", w8a8=True)
    for sign in (1.0, -1.0):
        for mixed in (False, True):
            x = torch.full((1, k), sign)
            if mixed:
                x[0, 1::7] = -sign  # mixed signs within the pairs too
            y = gemm_out(x, packed).double()
            ref = x.double() @ w
            assert torch.allclose(y, ref, rtol=1e-6, atol=1e-3), (
                f"sign {sign} mixed {mixed}: max err {(y - ref).abs().max()}")


@pytest.mark.parametrize("bits", (8, 4, 2))
def test_avx2_int8_activations_same_bits_on_1_and_2_threads(bits, avx2):
    """The int8 x is gathered once per call (gather.cpp), whatever the block ranges the threads take:
    the output is bit-identical on 1 and 2 threads (16 blocks: with 2 threads parallel_blocks hands
    out ranges of one block), for M = 1, 5, 16, and it is the float64 emulation of int8 x wherever the
    kernel says it takes int8 activations (8-bit M = 1 is the exact kernel)."""
    k, n = 512, 1024
    t, spec, w = make_layer(k, n, bits, 128, False, True, "gptq", seed=23 + bits)
    packed = BACKEND.repack(t, spec, k)
    avx2("", w8a8=True, small_m_max=16)  # M = 16 fused whatever the tuning table or the environment say
    threads = torch.get_num_threads()
    try:
        for dt in (torch.float32, torch.bfloat16):
            for m in (1, 5, 16):
                x = x_for(m, k, dt, seed=m + 31)
                torch.set_num_threads(1)
                y1 = gemm_out(x, packed)
                torch.set_num_threads(2)
                y2 = gemm_out(x, packed)
                assert torch.equal(y1, y2), f"int{bits} {dt} M={m}: 1 and 2 threads differ"
                int8 = cpu_mod.int8_activations(bits, m, dt)
                assert int8 == (bits != 8 or m >= 5), f"int{bits} {dt} M={m}"
                ref = w8a8_emulated(x, w, t.g_idx.long()) if int8 else x.double() @ w
                assert rel_err(y1, ref) <= REL_TOL[dt], f"int{bits} {dt} M={m}"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bits", (8, 4))
def test_avx2_int8_activations_propagate_nan(bits, avx2):
    """A NaN activation makes its row's outputs NaN under the opt-in int8 activations too (as the exact
    kernels do), and leaves the other rows finite: the per-group quantization must not turn it into a
    finite code."""
    k, n = 256, 72
    t, spec, w = make_layer(k, n, bits, 64, False, False, "gptq", seed=17)
    packed = BACKEND.repack(t, spec, k)
    avx2("", w8a8=True)
    m = 5 if bits == 8 else 1  # the AVX2 W8A8 kernel runs from M = 5, W4A8 from M = 1
    x = x_for(m, k, torch.float32, seed=2)
    x[0, 100] = float("nan")
    y = BACKEND.gemm(x, packed)  # not gemm_out: NaN is the expected value here
    assert torch.isnan(y[0]).all(), "a NaN activation was quantized to a finite code"
    if m > 1:
        assert torch.isfinite(y[1:]).all()


def test_avx2_w4a8_default_off(avx2):
    """Without the opt-in, <=4-bit M = 1 is the exact kernel (fp32: 5e-6, which int8 x cannot meet)."""
    import os

    if os.environ.get("GPTQ_ASCEND_CPU_W8A8"):
        pytest.skip("GPTQ_ASCEND_CPU_W8A8 is set in this environment: the default is not observable")
    cpu_mod.kernel_config("reset")  # the start-up settings (the fixture turned int8 activations off)
    assert "w8a8=0" in avx2("avx2"), "int8 activations must be opt-in"
    t, spec, w = make_layer(601, 200, 4, 64, False, True, "gptq", seed=5)
    packed = BACKEND.repack(t, spec, 601)
    for dt in DTYPES:
        x = x_for(1, 601, dt, seed=3)
        assert rel_err(gemm_out(x, packed), x.double() @ w) <= REL_TOL[dt], f"{dt}"


FIXTURES = gptq_fixture_dirs()


@pytest.mark.skipif(not FIXTURES, reason="tests/fixtures has no GPTQModel-written checkpoints "
                    "(generate them with tools/make_fixtures.py)")
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_avx2_gptqmodel_fixtures(fixture, avx2):
    """GPTQModel-written checkpoints: y = x @ GPTQModel's dequantized weight within one fp16 ulp per
    weight (GPTQModel rounds W to the scales' dtype) plus fp32 accumulation, element-wise, for the
    direct and the decode-once kernels."""
    from safetensors.torch import load_file

    from gptq_ascend.checkpoint import Checkpoint

    config = fmt.GPTQConfig.load(fixture)
    ckpt = Checkpoint.open(fixture)
    expected = load_file(str(fixture / "expected" / "dequantized.safetensors"))
    layers = ckpt.quantized_layers()
    assert layers, fixture.name
    for prefix in layers:
        spec = config.spec_for(prefix)
        w_gm = expected[f"{prefix}.weight"].double()
        k = w_gm.shape[0]
        packed = BACKEND.repack(ckpt.layer_tensors(prefix), spec, k)
        for m in (1, 3, 16):
            x = x_for(m, k, torch.float32, seed=k + m)
            y = gemm_out(x, packed).double()
            ref = x.double() @ w_gm
            bound = (x.double().abs() @ w_gm.abs()) * (2.0**-10 + 1e-6) + 1e-6
            assert bool(((y - ref).abs() <= bound).all()), \
                f"{fixture.name}:{prefix} M={m}: max |y - x@W_gptqmodel| = {float((y - ref).abs().max()):.3g}"
            xb = x.to(torch.bfloat16)
            err = rel_err(gemm_out(xb, packed), xb.double() @ w_gm)
            assert err <= REL_TOL[torch.bfloat16], f"{fixture.name}:{prefix} bf16 M={m}: {err:.2e}"



@pytest.mark.skipif(not FIXTURES, reason="tests/fixtures has no GPTQModel-written checkpoints "
                    "(generate them with tools/make_fixtures.py)")
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_avx2_w4a8_gptqmodel_fixtures(fixture, avx2):
    """The opt-in W4A8 kernel on GPTQModel-written <=4-bit checkpoints: the int8-x emulation applied to
    GPTQModel's own dequantized weight (its W is rounded to the scales' dtype: 1e-3 covers that), and
    within 2% of x @ W."""
    from safetensors.torch import load_file

    from gptq_ascend.checkpoint import Checkpoint

    config = fmt.GPTQConfig.load(fixture)
    ckpt = Checkpoint.open(fixture)
    layers = [p for p in ckpt.quantized_layers() if config.spec_for(p).bits <= 4]
    if not layers:
        pytest.skip(f"{fixture.name} has no <=4-bit layer")
    expected = load_file(str(fixture / "expected" / "dequantized.safetensors"))
    avx2("", w8a8=True)
    for prefix in layers:
        t = ckpt.layer_tensors(prefix)
        w_gm = expected[f"{prefix}.weight"].double()
        k = w_gm.shape[0]
        packed = BACKEND.repack(t, config.spec_for(prefix), k)
        for m in (1, 3, 16):
            x = x_for(m, k, torch.float32, seed=k + m)
            y = gemm_out(x, packed).double()
            err = rel_err(y, w8a8_emulated(x, w_gm, t.g_idx.long()))
            assert err <= 1e-3, f"{fixture.name}:{prefix} M={m}: {err:.2e} from the int8-x emulation"
            assert rel_err(y, x.double() @ w_gm) <= 2e-2, f"{fixture.name}:{prefix} M={m}"

@pytest.mark.parametrize("bits", (8, 4, 3, 2))
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
def test_avx2_dequant_exact(bits, sym, avx2):
    """The AVX2 dequantization (the large-M path's tiles, the dequant op): fp32 bit-exact ((q - z) * s
    has <= 20 significant bits), bf16 / fp16 exactly one rounding of it; act-order, short last group."""
    k = 160 if bits == 3 else 151
    t, spec, w = make_layer(k, 136, bits, 64, sym, True, "gptq", seed=bits + 40)
    packed = BACKEND.repack(t, spec, k)
    assert torch.equal(BACKEND.dequant(packed, torch.float32), w.float())
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(BACKEND.dequant(packed, dt), w.float().to(dt)), dt


def _nibble_layer(bits: int, sym: bool, k: int = 128, n: int = 128, seed: int = 0):
    """One group of k rows, unit scales, every code in every column and both nibbles of a byte (even and
    odd k), every byte position of two blocks; symmetric (z = 2^(bits-1)) or random per-column z."""
    q = (torch.arange(k)[:, None] * 3 + torch.arange(n)[None, :]) % 2**bits
    if sym:
        spec = fmt.QuantSpec(bits, k, True, False, "gptq")
        z = torch.full((1, n), 2 ** (bits - 1), dtype=torch.int64)
    else:
        spec = fmt.QuantSpec(bits, k, False, False, "gptq_v2")
        z = torch.randint(0, 2**bits, (1, n), generator=torch.Generator().manual_seed(seed))
    t = fmt.GPTQTensors(fmt.pack(q, bits, 0), fmt.pack_zeros(z, spec), torch.ones(1, n, dtype=torch.float16),
                        torch.zeros(k, dtype=torch.int32))
    return BACKEND.repack(t, spec, k), q, z[0]


@pytest.mark.parametrize("bits", (4, 3, 2))
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
def test_avx2_m1_fp32_two_hot_exact(bits, sym, avx2):
    """M = 1, fp32 x (the exact table decode, I4Lut): x = 1 at row a and 2^-19 at row b of the same
    group, so y = (q[a] - z) + 2^-19 (q[b] - z) exactly (<= 23 significant bits). A decode that adds a
    constant c0 to the codes (I4Bias128's 128) sums c0 + q[a] + 2^-19 (c0 + q[b]) first, which needs
    27 bits at c0 = 128 and rounds: the cancellation this tier's fp32 path must not have. Every row is
    a once and b once (both k parities), every code in every column (N = 128: two blocks)."""
    packed, q, z = _nibble_layer(bits, sym, seed=bits)
    k = q.shape[0]
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(bits + 10 * sym))
    tiny = 2.0**-19
    for i in range(k):
        a, b = int(perm[i]), int(perm[(i + 1) % k])
        x = torch.zeros(1, k, dtype=torch.float32)
        x[0, a], x[0, b] = 1.0, tiny
        want = (q[a] - z).double() + tiny * (q[b] - z).double()
        assert torch.equal(want.float().double(), want), "the expected value must be exact in fp32"
        y = gemm_out(x, packed)[0].double()
        bad = (y != want).nonzero().flatten()
        assert bad.numel() == 0, (f"int{bits} rows a={a} b={b}: columns {bad[:8].tolist()} got "
                                  f"{y[bad[:4]].tolist()} want {want[bad[:4]].tolist()}")


@pytest.mark.parametrize("bits", (4, 3, 2))
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("act", (False, True), ids=("seq", "act"))
def test_avx2_m1_fp32_accuracy(bits, sym, act, avx2):
    """M = 1, fp32 x, long K (48 groups of 128): relative error against float64 at most 1e-6, 4x what
    the exact table decode measures (2.1-2.4e-7) and above the fp32 conversion decode (I4F32, 2.7-3.6e-7),
    where a +128 decode measures 4.7e-6 .. 2.4e-5 (kernel_avx2.cpp, I4Lut)."""
    k, n = 6144, 200
    t, spec, w = make_layer(k, n, bits, 128, sym, act, "gptq", seed=bits + 2 * sym + 4 * act)
    packed = BACKEND.repack(t, spec, k)
    for seed in range(3):
        x = x_for(1, k, torch.float32, seed=seed)
        err = rel_err(gemm_out(x, packed), x.double() @ w)
        assert err <= 1e-6, f"int{bits} sym={sym} act={act} seed={seed}: relative error {err:.2e}"


@pytest.mark.parametrize("bits", (4, 3, 2))
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("m", (2, 3, 4, 5, 6))
def test_avx2_small_m_fp32_two_hot_exact(bits, sym, m, avx2):
    """M = 2..6 (one row tile: I4LutRows at 4 and 6, I4F32 at 2, 3, 5), fp32 x: as the M = 1 two-hot
    test, each row of the tile with its own pair (a, b) of one group, x = 1 at a and 2^-19 at b, so
    y[r] = (q[a_r] - z) + 2^-19 (q[b_r] - z) exactly: a decode that adds a constant rounds, and a row
    fed another row's x or a column another column's weights shows as an inequality."""
    packed, q, z = _nibble_layer(bits, sym, seed=bits + m)
    k = q.shape[0]
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(bits + 10 * sym + 100 * m))
    tiny = 2.0**-19
    for i0 in range(0, k, m):
        x = torch.zeros(m, k, dtype=torch.float32)
        want = torch.empty(m, q.shape[1], dtype=torch.float64)
        for r in range(m):
            a, b = int(perm[(i0 + r) % k]), int(perm[(i0 + r + 1) % k])
            x[r, a], x[r, b] = 1.0, tiny
            want[r] = (q[a] - z).double() + tiny * (q[b] - z).double()
        assert torch.equal(want.float().double(), want), "the expected values must be exact in fp32"
        y = gemm_out(x, packed).double()
        bad = (y != want).nonzero()
        assert bad.numel() == 0, f"int{bits} M={m} from {i0}: (row, column) {bad[:6].tolist()} differ"


@pytest.mark.parametrize("bits", (4, 3, 2))
def test_avx2_fp32_table_decode_runs_at_m_1_4_6(bits, avx2):
    """Which kernel M = 1, 4 and 6 reach with fp32 x: a symmetric layer whose every code is its zero point
    is the zero matrix, and the exact table decode (I4Lut, I4LutRows) sums v = c - 2^(bits-1) = 0 exactly,
    so y is exactly 0 for any x. The conversion decode (I4F32, M = 2, 3, 5) sums c x and subtracts z X,
    two roundings apart, and leaves a residue of ~1e-4 here: a dispatch that lost the table decode at
    these M fails this test, which the two-hot and accuracy tests (exact for both decodes) would not."""
    k, n = 2048, 128
    spec = fmt.QuantSpec(bits, 128, True, False, "gptq")
    q = torch.full((k, n), 2 ** (bits - 1), dtype=torch.int64)
    z = torch.full((k // 128, n), 2 ** (bits - 1), dtype=torch.int64)
    s = (torch.rand(k // 128, n, generator=torch.Generator().manual_seed(bits)) + 0.5).half()
    t = fmt.GPTQTensors(fmt.pack(q, bits, 0), fmt.pack_zeros(z, spec), s, torch.arange(k, dtype=torch.int32) // 128)
    packed = BACKEND.repack(t, spec, k)
    for m in (1, 4, 6):
        y = gemm_out(torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3, packed)
        assert torch.count_nonzero(y) == 0, f"int{bits} M={m}: {torch.count_nonzero(y)} non-zero outputs"


@pytest.mark.parametrize("bits", (4, 3, 2))
@pytest.mark.parametrize("sym", (True, False), ids=("sym", "asym"))
@pytest.mark.parametrize("act", (False, True), ids=("seq", "act"))
def test_avx2_small_m_fp32_accuracy(bits, sym, act, avx2):
    """M = 2..6, fp32 x, long K (48 groups of 128): relative error against float64 at most 1e-6 per row
    tile (the table decode measures ~2.1e-7 at M = 4 / 6, the conversion decode 3.9-4.8e-7 at 2, 3, 5;
    kernel_avx2.cpp, I4LutRows), with N = 200: three full blocks and a partial one."""
    k, n = 6144, 200
    t, spec, w = make_layer(k, n, bits, 128, sym, act, "gptq", seed=bits + 2 * sym + 4 * act + 50)
    packed = BACKEND.repack(t, spec, k)
    for m in (2, 3, 4, 5, 6):
        x = x_for(m, k, torch.float32, seed=m + 7)
        err = rel_err(gemm_out(x, packed), x.double() @ w)
        assert err <= 1e-6, f"int{bits} sym={sym} act={act} M={m}: relative error {err:.2e}"
