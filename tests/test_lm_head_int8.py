"""The opt-in int8 lm_head's arithmetic (vllm_plugin/lm_head.py) against float64 math built here."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
cpu_mod = pytest.importorskip("gptq_ascend.backends.cpu")

from gptq_ascend import format as fmt  # noqa: E402
from gptq_ascend.vllm_plugin.lm_head import quantize_rows_int8  # noqa: E402

BACKEND = cpu_mod.CPUBackend()
needs_kernel = pytest.mark.skipif(not BACKEND.available()[0], reason=BACKEND.available()[1])


def test_quantize_rows_int8_is_round_to_nearest_per_row():
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 96, generator=gen) * torch.rand(300, 1, generator=gen)).to(torch.bfloat16)
    w[7] = 0  # an all-zero row
    codes, scales = quantize_rows_int8(w)
    wd = w.double()
    s = wd.abs().amax(dim=1) / 127
    assert torch.allclose(scales.double()[s > 0], s[s > 0], rtol=1e-6)
    q = codes.to(torch.int64) - 128
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert torch.equal(q[7], torch.zeros(96, dtype=torch.int64))
    err = (wd - q.double() * scales.double()[:, None]).abs()
    assert bool((err <= scales.double()[:, None] / 2 * (1 + 1e-5)).all())  # nearest code (fp32 scale), per row


@needs_kernel
@pytest.mark.parametrize("dt", (torch.float32, torch.bfloat16))
def test_int8_lm_head_through_the_kernel(dt):
    v, h = 1000, 128  # V not a multiple of 64
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(v, h, generator=gen).to(torch.bfloat16)
    codes, scales = quantize_rows_int8(w)
    packed = BACKEND.pack_codes(codes.t(), torch.full((1, v), 128, dtype=torch.int32),
                                torch.zeros(h, dtype=torch.int64), scales[None, :],
                                fmt.QuantSpec(8, -1, True, False, "gptq_v2"))
    x = torch.randn(3, h, generator=gen).to(dt)
    y = BACKEND.gemm(x, packed).double()
    w_int8 = (codes.double() - 128) * scales.double()[:, None]   # [V, H], float64 from the codes
    ref = x.double() @ w_int8.t()
    tol = 5e-6 if dt == torch.float32 else 1e-2
    assert float((y - ref).norm() / ref.norm()) <= tol
    dense = x.double() @ w.double().t()
    assert float((y - dense).norm() / dense.norm()) <= 2e-2  # the int8 rounding itself: ~0.5% here
