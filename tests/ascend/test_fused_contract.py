"""Contract tests of the NPU fused path, run WITHOUT an NPU (plain torch).

The arguments ``gptq_ascend.backends.npu`` prepares for ``torch_npu.npu_weight_quant_batchmatmul`` are
evaluated with the op's documented formula (tests/ascend/vendor_model.py, written from the docs) and
compared with the ground truth of randomly generated GPTQ layers and with GPTQModel's own dequantized
weights (tests/fixtures). This proves the arguments are right *if the op does what its documentation
says*; whether it does is what ``pytest -m npu`` checks on hardware (test_npu_hardware.py).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptq_ascend import format as fmt
from gptq_ascend.backends import npu
from gptq_ascend.backends.ascend import fused
from gptq_ascend.checkpoint import Checkpoint

from ..conftest import fixture_info, gptq_fixture_dirs
from .vendor_model import antiquant_weight_model, int4_unpack_documented, random_layer, wqbmm_model

CASES = [
    # bits, K, N, group, sym, format, act_order
    *[(b, 256, 64, g, sym, f, act) for b, g, sym, f, act in itertools.product(
        (8, 4), (128, 32, -1), (True, False), ("gptq", "gptq_v2"), (False, True))],
    (8, 320, 48, 64, False, "gptq", True),       # K not a multiple of the group count's power of two
    (4, 200, 40, 64, False, "gptq_v2", False),   # ragged last group (200 = 3*64 + 8)
    (8, 2048, 96, 128, True, "gptq", False),     # Qwen-like sym int8 v1
    (4, 96, 24, -1, False, "gptq", False),       # per-channel int4, K % 8 == 0 -> transposed layout
    (4, 100, 16, -1, True, "gptq", False),       # per-channel int4, K % 8 != 0 -> (K, N/8) layout
    (8, 100, 30, -1, False, "gptq_v2", False),   # per-channel int8, odd sizes
]


def _seed(case) -> int:
    return zlib.crc32(_case_id(case).encode())


def _case_id(c):
    b, k, n, g, sym, f, act = c
    return f"int{b}-{k}x{n}-g{g}-{'sym' if sym else 'asym'}-{f}{'-act' if act else ''}"


def _packed_on_cpu(layer):
    """What repack_npu builds on the device, built on CPU with the documented int4 packing."""
    args = fused.prepare_fused_args(layer.tensors, layer.spec, layer.k)
    return fused.pack_fused(args, layer.spec, layer.k, layer.n, torch.device("cpu"),
                          convert_int4=fused.int4pack_reference)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fused_args_reproduce_gptq_weights_exactly(case):
    bits, k, n, group, sym, f, act = case
    layer = random_layer(bits, k, n, group, sym, f, act, seed=_seed(case))
    ok, why = fused.fused_limits(layer.spec, k, n, "Ascend910B3")
    assert ok, why
    args = fused.prepare_fused_args(layer.tensors, layer.spec, k)
    assert args.weight.dtype == torch.int8 and tuple(args.weight.shape) == (k, n)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert int(args.weight.min()) >= lo and int(args.weight.max()) <= hi
    assert (args.perm is not None) == (act and layer.spec.num_groups(k) > 1)
    assert args.scale.dtype == args.offset.dtype == layer.tensors.scales.dtype
    if sym:
        assert bool((args.offset == 0).all()), "symmetric checkpoints need no offset"
    # The documented formula on exactly these arguments == ground truth, bit for bit (float64 is exact).
    w = antiquant_weight_model(args.weight, args.scale, args.offset, args.group_size, k)
    truth = layer.truth[args.perm] if args.perm is not None else layer.truth
    assert torch.equal(w, truth)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fused_gemm_call_matches_reference(case, dtype, monkeypatch):
    """The per-call glue (reshape, act-order gather, scale/offset casts, bias) around the op model."""
    bits, k, n, group, sym, f, act = case
    layer = random_layer(bits, k, n, group, sym, f, act, seed=_seed(case) + 1)
    packed = _packed_on_cpu(layer)
    calls = []

    def op(x, weight, antiquant_scale, antiquant_offset, antiquant_group_size):
        # fused.npu_fused_matmul's signature; the torch_npu call inside it is checked against the
        # wheel's schema by test_vendor_contract.py.
        calls.append((x, weight))
        return wqbmm_model(x, weight, antiquant_scale, antiquant_offset, antiquant_group_size=antiquant_group_size)

    monkeypatch.setattr(fused, "npu_fused_matmul", op)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn((2, 3, k), generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    y = npu.gemm_packed(x, packed, bias)
    assert y.shape == (2, 3, n) and y.dtype == dtype and len(calls) == 1
    ref = x.to(torch.float64) @ layer.truth + bias.to(torch.float64)
    # fp16/bf16 output rounding, plus (bf16) the op's scales rounded to x's dtype.
    rtol = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    bound = x.to(torch.float64).abs() @ layer.truth.abs() + bias.to(torch.float64).abs()
    err = (y.to(torch.float64) - ref).abs()
    assert bool((err <= rtol * bound + 1e-6).all()), float((err / (bound + 1e-12)).max())


@pytest.mark.parametrize("case", CASES[:24:3], ids=_case_id)
def test_backend_dequant_returns_checkpoint_order(case):
    bits, k, n, group, sym, f, act = case
    layer = random_layer(bits, k, n, group, sym, f, act, seed=2)
    packed = _packed_on_cpu(layer)
    assert npu.packed_path(packed) == "fused"
    w = npu.NpuBackend().dequant(packed, torch.float16)
    assert torch.equal(w, layer.truth.to(torch.float16))


def test_public_integrations_offset_sign_is_wrong_for_asymmetric():
    """Passing ``+(z - 2**(bits-1))`` (sglang #15203, GPTQModel ascend_npu.py, vllm-ascend #6603) only
    works when it is zero; our ``2**(bits-1) - z`` is what the documented ADDED offset needs."""
    for sym in (True, False):
        layer = random_layer(8, 256, 32, 128, sym, "gptq", False, seed=3)
        args = fused.prepare_fused_args(layer.tensors, layer.spec, 256)
        wrong = antiquant_weight_model(args.weight, args.scale, -args.offset, args.group_size, 256)
        assert torch.equal(wrong, layer.truth) == sym


def test_raw_byte_reading_without_zero_point_is_caught():
    """The old converter's mistake (int8 view of the stored byte, no zero point) fails this contract."""
    layer = random_layer(8, 256, 32, 128, True, "gptq", False, seed=4)
    args = fused.prepare_fused_args(layer.tensors, layer.spec, 256)
    raw = fmt.unpack_weight_codes(layer.tensors, layer.spec, 256).to(torch.uint8).view(torch.int8)
    wrong = antiquant_weight_model(raw, args.scale, None, args.group_size, 256)
    rel = float((wrong - layer.truth).norm() / layer.truth.norm())
    assert rel > 1.0


def test_int4pack_reference_matches_documented_layout():
    row = torch.tensor([[1, -1, 2, -2, 3, -3, 7, -8]], dtype=torch.int32)
    # nibble j at bits [4j, 4j+4): 1, F, 2, E, 3, D, 7, 8 from the lowest -> 0x87D3E2F1
    assert fused.int4pack_reference(row).tolist() == [[0x87D3E2F1 - (1 << 32)]]
    gen = torch.Generator().manual_seed(5)
    w = torch.randint(-8, 8, (13, 40), generator=gen, dtype=torch.int32)
    packed = fused.int4pack_reference(w)
    assert packed.shape == (13, 5) and packed.dtype == torch.int32
    assert torch.equal(int4_unpack_documented(packed), w.to(torch.int64))
    assert torch.equal(fused.int4unpack_reference(packed), w)
    with pytest.raises(Exception, match="8"):
        fused.int4pack_reference(torch.zeros((2, 12), dtype=torch.int32))
    with pytest.raises(Exception, match=r"\[-8, 7\]"):
        fused.int4pack_reference(torch.full((1, 8), 8, dtype=torch.int32))


@pytest.mark.parametrize("soc,bits,k,n,group,ok,why", [
    ("Ascend910B3", 8, 2048, 2048, 128, True, ""),
    ("Ascend910B3", 4, 2048, 6144, 128, True, ""),
    ("Ascend910_9392", 8, 2048, 2048, 128, True, ""),          # A3
    (None, 8, 2048, 2048, 128, True, ""),                      # unknown: documented A2/A3 limits
    ("Ascend910B3", 8, 2048, 2048, 16, False, "multiple of 32"),
    ("Ascend910B3", 8, 2048, 2048, 48, False, "multiple of 32"),
    ("Ascend910B3", 8, 128, 64, 128, True, ""),                # one group -> per-channel
    ("Ascend910B3", 8, 70000, 64, 128, False, "65535"),
    ("Ascend910B3", 8, 64, 70000, -1, False, "65535"),
    ("Ascend910B3", 3, 2048, 64, 128, False, "int8 or int4"),
    ("Ascend910B3", 2, 2048, 64, 128, False, "int8 or int4"),
    ("Ascend910B3", 4, 2048, 60, 128, False, "N % 8"),
    ("Ascend910B3", 4, 100, 60, -1, False, "K or N % 8"),
    ("Ascend910B3", 4, 96, 60, -1, True, ""),                  # per-channel: transposed layout, K % 8
    ("Ascend310P3", 8, 2048, 2048, 128, False, "per-channel int8 only"),
    ("Ascend310P3", 4, 2048, 2048, -1, False, "per-channel int8 only"),
    ("Ascend310P3", 8, 2048, 2048, -1, True, ""),
    ("Ascend910ProB", 8, 2048, 2048, 128, False, "documented for Atlas A2/A3 and 310P only"),
])
def test_fused_limits(soc, bits, k, n, group, ok, why):
    spec = fmt.QuantSpec(bits=bits, group_size=group)
    got, reason = fused.fused_limits(spec, k, n, soc)
    assert got == ok, reason
    assert why in reason


def test_act_order_with_non_contiguous_groups_is_refused():
    layer = random_layer(8, 256, 32, 64, False, "gptq", True, seed=6)
    g_idx = layer.tensors.g_idx.clone()
    g_idx[:3] = torch.tensor([0, 0, 0], dtype=torch.int32)   # group 0 now has more than 64 rows
    bad = fmt.GPTQTensors(layer.tensors.qweight, layer.tensors.qzeros, layer.tensors.scales, g_idx)
    with pytest.raises(Exception, match="contiguous"):
        fused.prepare_fused_args(bad, layer.spec, 256)


FIXTURES = gptq_fixture_dirs()
ROOT = Path(__file__).resolve().parents[2]


def _check_checkpoint(folder: Path, expected: dict[str, torch.Tensor] | None) -> int:
    """Every quantized layer of a checkpoint, read as the plugin reads it, through the fused arguments
    and the documented formula; compared with ``expected`` ([K, N] weights) or the reference dequant."""
    config = fmt.GPTQConfig.load(folder)
    ckpt = Checkpoint.open(folder)
    checked = 0
    for prefix in ckpt.quantized_layers():
        spec = config.spec_for(prefix)
        t = ckpt.layer_tensors(prefix)
        k = t.in_features(spec)
        ok, why = fused.fused_limits(spec, k, t.out_features, "Ascend910B3")
        if not ok:
            assert spec.bits not in (4, 8) or "group_size" in why, why
            continue
        args = fused.prepare_fused_args(t, spec, k)
        w = antiquant_weight_model(args.weight, args.scale, args.offset, args.group_size, k)
        if args.perm is not None:
            w = w[torch.argsort(args.perm)]
        if expected is None:
            assert torch.equal(w, fmt.dequantize(t, spec, k, torch.float64)), f"{folder.name}:{prefix}"
        else:
            ref = expected[f"{prefix}.weight"].to(torch.float64)
            # GPTQModel rounds in fp16; the formula is exact: one fp16 ulp of the value, as tests/test_format.
            tol = ref.abs() * 2.0**-10 + 2.0**-24
            assert bool(((w - ref).abs() <= tol).all()), f"{folder.name}:{prefix}"
        checked += 1
    return checked


@pytest.mark.skipif(not FIXTURES, reason="tests/fixtures has no GPTQModel-written checkpoints yet")
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_fused_args_match_gptqmodel_fixtures(fixture):
    """GPTQModel's own dequantized weights, from the fused arguments and the documented formula."""
    expected = load_file(str(fixture / "expected" / "dequantized.safetensors"))
    checked = _check_checkpoint(fixture, expected)
    if fixture_info(fixture).get("bits") in (4, 8):
        assert checked, f"{fixture.name}: no layer took the fused path"


@pytest.mark.parametrize("bits,sym", [(8, True), (4, False)])
def test_fused_args_on_a_synthetic_checkpoint(bits, sym, tmp_path):
    """The checkpoint reader + config + fused arguments, on a tiny Qwen3-shaped checkpoint written by
    tools/make_synthetic_gptq.py (v1 zero points, g_idx stored): exact against the reference dequant."""
    out = tmp_path / f"syn{bits}"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_gptq.py"), str(out), "--preset", "tiny",
                    "--bits", str(bits), "--sym" if sym else "--no-sym"], check=True, capture_output=True)
    assert _check_checkpoint(out, None) > 0
