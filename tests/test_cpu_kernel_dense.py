"""The dense BF16 / FP16-weight GEMV / small-M GEMM (``cpu_dense_gemm``, csrc/cpu/dense_bf16*.cpp: the
dense lm_head) against float64 math, for both weight dtypes, on every kernel tier this process can select
(``make test-tiers`` runs this module again under each lower GPTQ_ASCEND_CPU_ISA cap, with MKL/oneDNN
capped alike).

References are built here from the drawn weights and activations (``x.double() @ w.double().T``), never
by running a kernel. Shapes reach every code path: M = 1..17 (row tiles of 1..4 rows on AVX-512, 1..2 on
AVX2, the even split of M), N not a multiple of the 4-row tile or of the 64-row thread unit, K not a
multiple of 8 / 16 / 32 (the masked and scalar tails), K = 1, a row stride larger than K, and outputs
written into NaN-poisoned buffers.
"""

from __future__ import annotations

import pytest
import torch

from .test_cpu_kernel import ISAS, expected_tiers

cpu_mod = pytest.importorskip("gptq_ascend.backends.cpu")
_OK, _WHY = cpu_mod.dense_gemm_available()
pytestmark = pytest.mark.skipif(not _OK, reason=str(_WHY))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WDTYPES = (torch.bfloat16, torch.float16)  # the weight: BF16 (shift) or FP16 (F16C) bits
U24 = 2.0**-24  # fp32 unit roundoff
ROUND = {torch.float32: U24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # one rounding at the store
# (N, K): odd N (tails of the 4-row tile and of the 64-row thread unit), K tails of every vector width.
SHAPES = ((1000, 128), (1001, 131), (67, 33), (5, 1), (130, 2048 + 7), (4, 47), (259, 64))


@pytest.fixture(params=ISAS)
def tier(request):
    """Each tier this process can select, then the start-up settings."""
    desc = cpu_mod.kernel_config(request.param)
    assert f"isa={request.param}" in desc, desc
    yield request.param
    cpu_mod.kernel_config("reset")


def test_tiers_are_what_this_cpu_allows():
    """The tiers run here are exactly those /proc/cpuinfo and the cap allow (so no tier is skipped
    silently on a CPU that has it)."""
    assert ISAS == expected_tiers()


def dense_out(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op's out= variant into a NaN-poisoned buffer: every output element must be written."""
    y = torch.full((*x.shape[:-1], w.shape[0]), float("nan"), dtype=x.dtype)
    r = torch.ops.gptq_ascend.cpu_dense_gemm.out(x, w, bias, out=y)
    assert r.data_ptr() == y.data_ptr()
    assert not torch.isnan(y).any(), "output elements left unwritten"
    return y


def check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """|y - x @ w.T| within one rounding of the output plus the fp32 summation bound K u sum|x||w|."""
    xd, wd = x.double().reshape(-1, x.shape[-1]), w.double()
    ref = xd @ wd.t()
    mag = xd.abs() @ wd.abs().t()
    if bias is not None:
        ref = ref + bias.double()
        mag = mag + bias.double().abs()
    k = x.shape[-1]
    bound = ROUND[y.dtype] * ref.abs() + (k + 2) * U24 * mag * (1 + ROUND[y.dtype]) + 1e-30
    err = (y.double().reshape(ref.shape) - ref).abs()
    worst = float((err / bound).max())
    assert worst <= 1.0, f"error {worst:.3g}x the bound (max |err| {float(err.max()):.3g})"


def _wid(d: torch.dtype) -> str:
    return "w" + str(d).split(".")[1]


@pytest.mark.parametrize("wdt", WDTYPES, ids=_wid)
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}K{s[1]}")
def test_dense_matches_float64(tier, dt, shape, wdt):
    n, k = shape
    gen = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=gen).to(wdt)
    for m in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17):
        x = torch.randn(m, k, generator=gen).to(dt)
        check_close(dense_out(x, w), x, w)


@pytest.mark.parametrize("wdt", WDTYPES, ids=_wid)
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_dense_one_rounding_exact(tier, dt, wdt):
    """Small-integer data: every product and partial sum is exact in fp32, so the output must be the exact
    sum rounded once to the output dtype, bit for bit (a dropped, doubled or misplaced element, or a
    second rounding, shows)."""
    gen = torch.Generator().manual_seed(11)
    n, k = 203, 2048 + 37
    w = torch.randint(-8, 9, (n, k), generator=gen).to(wdt)
    for m in (1, 3, 4, 6, 13):
        x = (torch.randint(-8, 9, (m, k), generator=gen) * 1.0).to(dt)
        ref = x.double() @ w.double().t()
        assert float(ref.abs().max()) < 2**24
        y = dense_out(x, w)
        assert torch.equal(y, ref.to(dt)), f"M={m}: not the exact sum rounded once"


@pytest.mark.parametrize("wdt", WDTYPES, ids=_wid)
def test_dense_bias_strides_batch_dims(tier, wdt):
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(300, 200, generator=gen).to(wdt)
    w = big[:257, 5:5 + 150]  # row stride 200 > K = 150: used in place
    assert w.stride() == (200, 1)
    bias = torch.randn(257, generator=gen).to(torch.bfloat16)
    x = torch.randn(2, 3, 300, generator=gen)[..., 10:160].to(torch.bfloat16)  # batch dims, not contiguous
    y = torch.ops.gptq_ascend.cpu_dense_gemm(x, w, bias)
    assert y.shape == (2, 3, 257) and y.dtype == torch.bfloat16
    check_close(y, x, w, bias)
    y32 = dense_out(x.float().contiguous(), w, bias.float())
    check_close(y32, x.float(), w, bias.float())


@pytest.mark.parametrize("wdt", WDTYPES, ids=_wid)
def test_dense_empty_m_and_nan_propagation(tier, wdt):
    w = torch.randn(70, 40).to(wdt)
    assert torch.ops.gptq_ascend.cpu_dense_gemm(torch.empty(0, 40), w).shape == (0, 70)
    x = torch.randn(3, 40)
    x[1, 17] = float("nan")
    y = torch.ops.gptq_ascend.cpu_dense_gemm(x.to(torch.bfloat16), w)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()
    # A NaN / inf weight poisons its output column only (the widening keeps them).
    w2 = w.clone()
    w2[5, 3], w2[9, 30] = float("nan"), float("inf")
    y = torch.ops.gptq_ascend.cpu_dense_gemm(torch.ones(2, 40), w2)
    assert torch.isnan(y[:, 5]).all() and torch.isposinf(y[:, 9]).all()
    assert torch.isfinite(y[:, [c for c in range(70) if c not in (5, 9)]]).all()


@pytest.mark.parametrize("wdt", WDTYPES, ids=_wid)
def test_dense_large_k_many_threads(tier, wdt):
    """A Qwen3-sized row (K = 2048) and enough rows for every thread to take several 64-row units."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64 * 41 + 3, 2048, generator=gen).to(wdt)
    for dt in DTYPES:
        x = torch.randn(1, 2048, generator=gen).to(dt)
        check_close(dense_out(x, w), x, w)


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_dense_fp16_weight_extremes_exact(tier, dt):
    """FP16 weights across the whole format: subnormals (2^-24 .. 2^-14), the largest normal (65504),
    signed zeros, and every exponent in between, each weight row against a one-hot x (x[m] selects
    column k_m, scaled by a power of two), so each output is one weight times a power of two: exact in
    fp32, so every output must equal the float64 value rounded once (a wrong widening, e.g. the bits
    read as bf16, or a subnormal flushed to zero, shows)."""
    gen = torch.Generator().manual_seed(21)
    n, k = 131, 77
    bits = torch.randint(0, 0x7C00, (n, k), generator=gen, dtype=torch.int32)  # every finite magnitude
    bits[:, :8] = torch.tensor([0x0001, 0x03FF, 0x0200, 0x7BFF, 0x0400, 0x0000, 0x3C00, 0x0155])
    sign = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int32) << 15
    w = (bits | sign).to(torch.int16).view(torch.float16)
    cols = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 40, 76])
    x = torch.zeros(len(cols), k)
    x[torch.arange(len(cols)), cols] = 2.0 ** torch.arange(-3, len(cols) - 3).float()
    x = x.to(dt)
    ref = x.double() @ w.double().t()
    y = dense_out(x, w)
    assert torch.equal(y, ref.to(dt)), "an fp16 weight was not widened exactly"


@pytest.mark.parametrize("bad", ("wdtype", "wdim", "k", "xdtype", "wstride", "bias", "outshape", "outdtype"))
def test_dense_bad_arguments(bad):
    w = torch.randn(10, 8).to(torch.bfloat16)
    x = torch.randn(2, 8).to(torch.bfloat16)
    bias, out = None, None
    expect = {"wdtype": "weight must be a 2-D bfloat16", "wdim": "weight must be a 2-D bfloat16",
              "k": "x must have shape [..., 8]", "xdtype": "x must be float32, bfloat16 or float16",
              "wstride": "unit stride", "bias": "bias must be a 1-D", "outshape": "out must have shape",
              "outdtype": "out must be a contiguous CPU tensor of x's dtype"}[bad]
    if bad == "wdtype":
        w = w.float()
    elif bad == "wdim":
        w = w[None]
    elif bad == "k":
        x = torch.randn(2, 9).to(torch.bfloat16)
    elif bad == "xdtype":
        x = x.double()
    elif bad == "wstride":
        w = torch.randn(8, 10).to(torch.bfloat16).t()
    elif bad == "bias":
        bias = torch.zeros(11)
    elif bad == "outshape":
        out = torch.empty(2, 11, dtype=torch.bfloat16)
    elif bad == "outdtype":
        out = torch.empty(2, 10)
    with pytest.raises(RuntimeError, match=expect.replace("[", r"\[").replace(".", r"\.")):
        if out is None:
            torch.ops.gptq_ascend.cpu_dense_gemm(x, w, bias)
        else:
            torch.ops.gptq_ascend.cpu_dense_gemm.out(x, w, bias, out=out)


def test_dense_op_registration_opcheck():
    """The op's schema, fake (meta) implementation and autograd registration agree (torch.compile traces
    it: vLLM may compile the lm_head call). Not the .out variant: functionalization refuses custom ops
    with aliased outputs (cpu_gemm.out is not opchecked for the same reason)."""
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(100, 72, generator=gen).to(torch.bfloat16)
    for dt in DTYPES:
        x = torch.randn(2, 3, 72, generator=gen).to(dt)
        torch.library.opcheck(torch.ops.gptq_ascend.cpu_dense_gemm.default, (x, w, None))
    compiled = torch.compile(lambda a: torch.ops.gptq_ascend.cpu_dense_gemm(a, w, None), fullgraph=True,
                             dynamic=True)
    x = torch.randn(5, 72, generator=gen).to(torch.bfloat16)
    assert torch.equal(compiled(x), torch.ops.gptq_ascend.cpu_dense_gemm(x, w, None))
