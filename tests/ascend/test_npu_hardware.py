"""Parity on a real Ascend NPU: ``pytest -m npu tests/ascend`` on a machine with torch_npu and a 910B.

Without an NPU every test here SKIPS and says what is missing -- a skip is not a pass. On a hardware
machine set ``GPTQ_ASCEND_REQUIRE_NPU=1`` so that anything missing (torch_npu, the device, the AscendC
library, triton-ascend) FAILS instead of skipping.

What it checks (all against ground truth computed on CPU from the generating codes):
* torch_npu's own ops do what their documentation says (the premise of tests/ascend/test_fused_contract.py):
  npu_convert_weight_to_int4pack's bit layout, and npu_weight_quant_batchmatmul's ADDED offset;
* every NPU path -- fused, AscendC dequant + matmul, Triton dequant + matmul, dense -- on int8/int4,
  sym/asym, v1/v2 and act-order layers: dequant is bit-exact (except the fused rebuild, one rounding),
  gemm within fp16/bf16 tolerance.
"""

from __future__ import annotations

import pytest
import torch

from gptq_ascend import ops
from gptq_ascend.backends import npu
from gptq_ascend.backends.ascend import dequant, fused
from gptq_ascend.backends.ascend import device as npu_device

from .require import need
from .vendor_model import random_layer, wqbmm_model

pytestmark = pytest.mark.npu




@pytest.fixture(scope="module")
def device():
    ok, why = npu_device.npu_status()
    need(ok, f"no NPU here: {why}")
    return torch.device("npu", torch.npu.current_device())


def test_soc_is_documented_for_the_fused_op(device):
    name = npu_device.soc_name(device)
    assert npu_device.soc_family(name) in ("a2a3", "310p"), name


def test_int4pack_matches_documented_layout(device):
    import torch_npu

    w = torch.randint(-8, 8, (64, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    got = torch_npu.npu_convert_weight_to_int4pack(w.to(device)).cpu()
    assert torch.equal(got, fused.int4pack_reference(w))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("group", (0, 64))
def test_fused_op_adds_the_offset(device, dtype, group):
    """npu_weight_quant_batchmatmul == x @ ((weight + offset) * scale) with random int8 arguments."""
    import torch_npu

    gen = torch.Generator().manual_seed(1)
    k, n, m = 256, 128, 5
    w = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
    rows = (k // group,) if group else ()
    scale = (torch.rand((*rows, n), generator=gen) * 0.01 + 0.001).to(dtype)
    offset = torch.randint(-20, 20, (*rows, n), generator=gen).to(dtype)
    x = torch.randn((m, k), generator=gen).to(dtype)
    got = torch_npu.npu_weight_quant_batchmatmul(x.to(device), w.to(device), scale.to(device), offset.to(device),
                                                 antiquant_group_size=group).cpu()
    ref = wqbmm_model(x, w, scale, offset, antiquant_group_size=group)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


CASES = [
    # bits, K, N, group, sym, format, act_order
    (8, 2048, 512, 128, True, "gptq", False),
    (8, 2048, 512, 128, False, "gptq_v2", False),
    (8, 1024, 256, 128, False, "gptq", True),
    (4, 2048, 512, 128, True, "gptq", False),
    (4, 1024, 256, 128, False, "gptq_v2", True),
    (8, 1024, 200, -1, False, "gptq", False),     # per-channel, N tail
    (4, 1000, 96, 32, False, "gptq", False),      # ragged last group
]
MODES = ("fused", "ascendc", "triton", "dense")


def _mode_available(mode: str) -> tuple[bool, str]:
    if mode == "ascendc":
        return dequant.ascendc_status()
    if mode == "triton":
        return npu_device.npu_triton_status()
    return True, ""


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"int{c[0]}-{c[1]}x{c[2]}-g{c[3]}-{'sym' if c[4] else 'asym'}"
                                                      f"-{c[5]}{'-act' if c[6] else ''}")
def test_npu_paths_match_ground_truth(device, case, mode, dtype):
    need(*_mode_available(mode))
    bits, k, n, group, sym, f, act = case
    layer = random_layer(bits, k, n, group, sym, f, act, seed=k + n + bits)
    if mode == "fused":
        ok, why = fused.fused_limits(layer.spec, k, n, npu_device.soc_name(device))
        if not ok:
            pytest.skip(f"the fused op does not take this layer: {why}")
    packed = npu.repack_npu(layer.tensors, layer.spec, k, mode=mode, device=device)
    assert npu.packed_path(packed) == {"ascendc": "dequant", "triton": "dequant"}.get(mode, mode)
    impl = mode if mode in ("ascendc", "triton") else None
    w = npu.dequant_packed(packed, dtype, impl).cpu()
    assert torch.equal(w, layer.truth.to(dtype)), f"{mode}: dequant differs from the ground truth"
    x = torch.randn((7, k), generator=torch.Generator().manual_seed(3)).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(4)).to(dtype)
    npu.NpuBackend().gemm(x.to(device), packed, bias.to(device))   # the backend entry point runs
    y = npu.gemm_packed(x.to(device), packed, bias.to(device), impl).cpu()
    ref = x.to(torch.float64) @ layer.truth + bias.to(torch.float64)
    bound = x.to(torch.float64).abs() @ layer.truth.abs() + bias.to(torch.float64).abs()
    rtol = 2.0**-9 if dtype == torch.float16 else 2.0**-6
    err = (y.to(torch.float64) - ref).abs()
    assert bool((err <= rtol * bound + 1e-3).all()), f"{mode}: max relative error {float((err / bound).max())}"


def test_npu_backend_is_chosen_on_npu(device):
    from gptq_ascend import format as fmt

    backend, reason = ops.choose_backend("npu", fmt.QuantSpec(bits=8, group_size=128), 2048, 2048)
    assert backend.name == "npu", reason
