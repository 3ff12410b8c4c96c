"""The GPTQ format core against independent references.

* Packing: an explicit transcription of AutoGPTQ's word-by-word packer (including 3-bit's
  10 | 1 | 10 | 1 | 10 layout), written here without using the module under test, and hypothesis
  round trips at every width and odd shapes.
* Dequant: float64 math on values drawn in the test, and GPTQModel's own ``dequantize_weight()``
  stored with every fixture.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from gptq_ascend import format as fmt
from gptq_ascend.checkpoint import Checkpoint
from gptq_ascend.errors import ConfigError, FormatError

from .conftest import gptq_fixture_dirs


def autogptq_pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's packer, transcribed loop by loop (numpy-free), as the independent reference."""
    k, n = q.shape
    q = [[int(v) for v in row] for row in q.tolist()]
    words: list[list[int]] = []
    if bits in (2, 4, 8):
        per = 32 // bits
        for r in range(0, k, per):
            row = [0] * n
            for j in range(per):
                if r + j < k:
                    for c in range(n):
                        row[c] |= q[r + j][c] << (bits * j)
            words.append(row)
    else:
        assert bits == 3 and k % 32 == 0
        i = 0
        while i < k:
            w0, w1, w2 = [0] * n, [0] * n, [0] * n
            for c in range(n):
                for j in range(10):
                    w0[c] |= q[i + j][c] << (3 * j)
                w0[c] |= (q[i + 10][c] << 30) & 0xFFFFFFFF
                w1[c] |= (q[i + 10][c] >> 2) & 1
                for j in range(10):
                    w1[c] |= q[i + 11 + j][c] << (3 * j + 1)
                w1[c] |= (q[i + 21][c] << 31) & 0xFFFFFFFF
                w2[c] |= (q[i + 21][c] >> 1) & 0x3
                for j in range(10):
                    w2[c] |= q[i + 22 + j][c] << (3 * j + 2)
            words += [w0, w1, w2]
            i += 32
    t = torch.tensor(words, dtype=torch.int64)
    return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_autogptq_word_layout(bits):
    gen = torch.Generator().manual_seed(bits)
    k = 64 if bits == 3 else 40
    q = torch.randint(0, 2**bits, (k, 5), generator=gen)
    expected = autogptq_pack_rows(q, bits)
    assert torch.equal(fmt.pack(q, bits, dim=0), expected)
    assert torch.equal(fmt.unpack(expected, bits, k, dim=0), q.to(torch.int32))


def test_known_symmetric_zero_words():
    # GPTQModel/AutoGPTQ v1 files store z - 1: 127 for 8-bit, 7 for 4-bit (notes: 0x7F7F7F7F, 0x77777777).
    for bits, word, zero in ((8, 0x7F7F7F7F, 128), (4, 0x77777777, 8), (2, 0x55555555, 2)):
        spec = fmt.QuantSpec(bits, 128, True, False, "gptq")
        n = 32 // bits
        z = fmt.unpack_zeros(torch.tensor([[word]], dtype=torch.int32), spec, n)
        assert z.tolist() == [[zero] * n]
    v2 = fmt.QuantSpec(8, 128, True, False, "gptq_v2")
    assert fmt.unpack_zeros(torch.tensor([[0x80808080 - 2**32]], dtype=torch.int32), v2, 4).tolist() == [[128] * 4]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), k=st.integers(1, 97), n=st.integers(1, 9),
       dim=st.sampled_from([0, 1]), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, k, n, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (k, n) if dim == 0 else (n, k)
    q = torch.randint(0, 2**bits, shape, generator=gen)
    packed = fmt.pack(q, bits, dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == -(-k * bits // 32)
    assert torch.equal(fmt.unpack(packed, bits, k, dim), q.to(torch.int32))


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), groups=st.integers(1, 4), n32=st.integers(1, 3),
       v2=st.booleans(), seed=st.integers(0, 2**16))
def test_zero_points_round_trip_including_zero(bits, groups, n32, v2, seed):
    # z = 0 is the case where v1's stored z - 1 borrows from its neighbour: it must still read back.
    gen = torch.Generator().manual_seed(seed)
    n = 32 * n32
    z = torch.randint(0, 2**bits, (groups, n), generator=gen)
    z[0, :: max(1, n // 5)] = 0
    spec = fmt.QuantSpec(bits, 32, False, False, "gptq_v2" if v2 else "gptq")
    assert torch.equal(fmt.unpack_zeros(fmt.pack_zeros(z, spec), spec, n), z.to(torch.int32))


def _random_layer(bits, k, n, group_size, sym, checkpoint_format, act_order, seed):
    """Draw codes/zeros/scales, pack them, and compute W in float64 from the drawn values."""
    gen = torch.Generator().manual_seed(seed)
    spec = fmt.QuantSpec(bits, group_size, sym, act_order, checkpoint_format)
    groups = spec.num_groups(k)
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    z = torch.full((groups, n), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (groups, n), generator=gen)
    s = (torch.rand(groups, n, generator=gen, dtype=torch.float64) * 0.02 + 1e-3).half()
    g = torch.arange(k) // spec.effective_group_size(k)
    if act_order:
        g = g[torch.randperm(k, generator=gen)]
    w = torch.empty(k, n, dtype=torch.float64)
    for row in range(k):
        w[row] = (q[row].double() - z[g[row]].double()) * s[g[row]].double()
    t = fmt.GPTQTensors(fmt.pack(q, bits, 0), fmt.pack_zeros(z, spec), s, g.to(torch.int32))
    return t, spec, w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,k", [(32, 96), (128, 320), (-1, 64)])
@pytest.mark.parametrize("sym,checkpoint_format,act_order", [
    (True, "gptq", False), (False, "gptq", False), (False, "gptq_v2", True), (True, "gptq_v2", True)])
def test_reference_dequant_equals_float64_math(bits, group_size, k, sym, checkpoint_format, act_order):
    n = 64 if bits == 3 else 24
    t, spec, expected = _random_layer(bits, k, n, group_size, sym, checkpoint_format, act_order, seed=k + bits)
    assert fmt.validate_layer("layer", t, spec, k) == k
    got = fmt.dequantize(t, spec, k, torch.float64)
    assert torch.equal(got, expected)
    # float32 is one rounding of the same exact product.
    assert torch.equal(fmt.dequantize(t, spec, k, torch.float32), expected.float())


def test_act_order_perm_sorts_groups():
    g = torch.tensor([2, 0, 1, 0, 2, 1], dtype=torch.int32)
    perm = fmt.act_order_perm(g)
    assert g[perm].tolist() == [0, 0, 1, 1, 2, 2]
    assert fmt.act_order_perm(torch.tensor([0, 0, 1, 1])) is None


# ---------------------------------------------------------------------------------------------
# Against GPTQModel's own dequantized weights
# ---------------------------------------------------------------------------------------------

FIXTURES = gptq_fixture_dirs()


@pytest.mark.skipif(not FIXTURES, reason="tests/fixtures has no GPTQModel-written checkpoints")
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_reference_dequant_equals_gptqmodel(fixture):
    config = fmt.GPTQConfig.load(fixture)
    ckpt = Checkpoint.open(fixture)
    expected = load_file(str(fixture / "expected" / "dequantized.safetensors"))
    layers = ckpt.quantized_layers()
    assert layers and set(expected) == {f"{p}.weight" for p in layers}
    worst = 0.0
    for prefix in layers:
        spec = config.spec_for(prefix)
        assert spec is not None, prefix
        t = ckpt.layer_tensors(prefix)
        ref = expected[f"{prefix}.weight"]
        got = fmt.dequantize(t, spec, dtype=torch.float32)
        assert got.shape == ref.shape, prefix
        # GPTQModel computes in the scales' dtype (fp16); we compute in fp32 and round once. Allow
        # one fp16 ulp of the value (relative 2**-10) and nothing more.
        diff = (got - ref.float()).abs()
        tol = ref.float().abs() * 2.0**-10 + 2.0**-24
        worst = max(worst, float((diff / tol).max()))
        assert bool((diff <= tol).all()), f"{fixture.name}:{prefix}: max diff {float(diff.max())}"
        if ref.dtype == torch.float16:
            assert torch.equal(got.half(), ref), f"{fixture.name}:{prefix}: not bit-exact in fp16"


@pytest.mark.skipif(not FIXTURES, reason="tests/fixtures has no GPTQModel-written checkpoints")
def test_the_int8_view_mistake_is_far_from_gptqmodel():
    """The earlier converter's `qweight.T.view(int8) * scale`: reading it must be visibly wrong."""
    fixture = next(p for p in FIXTURES
                   if fmt.GPTQConfig.load(p).default.bits == 8 and fmt.GPTQConfig.load(p).default.sym)
    ckpt = Checkpoint.open(fixture)
    expected = load_file(str(fixture / "expected" / "dequantized.safetensors"))
    prefix = next(iter(ckpt.quantized_layers()))
    t = ckpt.layer_tensors(prefix)
    k = t.g_idx.numel()
    g = t.g_idx.long()
    wrong = t.qweight.t().contiguous().view(torch.int8).t().float() * t.scales.float()[g]
    ref = expected[f"{prefix}.weight"].float()
    rel = float((wrong - ref).norm() / ref.norm())
    corr = float(torch.corrcoef(torch.stack([wrong.flatten(), ref.flatten()]))[0, 1])
    assert wrong.shape == (k, t.out_features)
    assert rel > 1.0 and corr < 0, (rel, corr)


# ---------------------------------------------------------------------------------------------
# Config parsing
# ---------------------------------------------------------------------------------------------


def test_config_fields_and_defaults():
    cfg = fmt.GPTQConfig.from_dict({"bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                                    "damp_percent": 0.01, "true_sequential": True, "static_groups": False})
    assert cfg.default == fmt.QuantSpec(4, 128, True, False, "gptq")
    assert cfg.spec_for("model.layers.0.mlp.down_proj") == cfg.default
    assert cfg.spec_for("lm_head") is None
    v2 = fmt.GPTQConfig.from_dict({"bits": 8, "group_size": -1, "format": "gptq_v2", "lm_head": True})
    assert v2.default.checkpoint_format == "gptq_v2" and v2.spec_for("lm_head") == v2.default


def test_dynamic_overrides_follow_gptqmodel_rules():
    cfg = fmt.GPTQConfig.from_dict({
        "bits": 4, "group_size": 128, "quant_method": "gptq",
        "dynamic": {
            r"-:model\.layers\.0\.mlp\..*": {},
            r"+:.*\.down_proj": {"bits": 8, "group_size": 64},
            r".*\.q_proj": {"sym": False},
        },
    })
    assert cfg.spec_for("model.layers.0.mlp.down_proj") is None  # first match wins
    assert cfg.spec_for("model.layers.1.mlp.down_proj") == fmt.QuantSpec(8, 64, True, False, "gptq")
    assert cfg.spec_for("model.layers.1.self_attn.q_proj") == fmt.QuantSpec(4, 128, False, False, "gptq")
    assert cfg.spec_for("model.layers.1.self_attn.k_proj") == cfg.default


def test_modules_in_block_and_not_convert():
    cfg = fmt.GPTQConfig.from_dict({"bits": 8, "group_size": 128,
                                    "modules_in_block_to_quantize": [["self_attn.q_proj"], ["mlp.up_proj"]],
                                    "modules_to_not_convert": ["visual"]})
    assert cfg.spec_for("model.layers.3.self_attn.q_proj") is not None
    assert cfg.spec_for("model.layers.3.self_attn.k_proj") is None
    assert cfg.spec_for("visual.blocks.0.mlp.up_proj") is None


@pytest.mark.parametrize("cfg,needle", [
    ({"bits": 5, "group_size": 128}, "bits: 5"),
    ({"bits": 4, "group_size": 0}, "group_size"),
    ({"group_size": 128}, "'bits' is missing"),
    ({"bits": 4, "group_size": 128, "quant_method": "awq"}, "'quant_method' is 'awq'"),
    ({"bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "'checkpoint_format' is 'marlin'"),
    ({"bits": 4, "group_size": 128, "format": "bitblas"}, "'format' is 'bitblas'"),
    ({"bits": 4, "group_size": 128, "sym": "yes"}, "'sym' must be true or false"),
    ({"bits": 4, "group_size": 128, "pack_dtype": "int16"}, "pack_dtype"),
    ({"bits": 4, "group_size": 128, "dynamic": {"+:(": {}}}, "not a valid regex"),
    ({"bits": 4, "group_size": 128, "dynamic": {".*down": {"bits": 6}}}, "bits: 6"),
    ({"bits": 4, "group_size": 128, "modules_to_not_convert": 5}, "'modules_to_not_convert' must be a list"),
    ({"bits": 4, "group_size": 128, "modules_to_not_convert": "lm_head"}, "'modules_to_not_convert' must be"),
    ({"bits": 4, "group_size": 128, "modules_in_block_to_quantize": 7}, "'modules_in_block_to_quantize' must"),
    ({"bits": 4, "group_size": 128, "modules_in_block_to_quantize": [["q_proj", 3]]}, "must be a list of"),
])
def test_config_errors_name_the_field(cfg, needle):
    with pytest.raises(ConfigError, match=None) as e:
        fmt.GPTQConfig.from_dict(cfg, "config.json")
    assert needle in str(e.value) and "config.json" in str(e.value)


def test_config_load_from_quantize_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": 128, "desc_act": False}))
    assert fmt.GPTQConfig.load(tmp_path).default.bits == 8
    (tmp_path / "quantize_config.json").unlink()
    with pytest.raises(ConfigError, match="not a GPTQ checkpoint"):
        fmt.GPTQConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed JSON"):
        fmt.GPTQConfig.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# Per-layer validation
# ---------------------------------------------------------------------------------------------


def test_validate_layer_names_the_tensor():
    t, spec, _ = _random_layer(4, 128, 16, 32, False, "gptq", False, seed=1)
    fmt.validate_layer("blk.q_proj", t, spec)

    def broken(**kw):
        d = {"qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales, "g_idx": t.g_idx, **kw}
        return fmt.GPTQTensors(**d)

    cases = [
        (broken(scales=t.scales[:-1]), "blk.q_proj.scales: expected shape (4, 16)"),
        (broken(qzeros=t.qzeros[:, :1]), "blk.q_proj.qzeros"),
        (broken(qweight=t.qweight.float()), "blk.q_proj.qweight"),
        (broken(g_idx=t.g_idx + 3), "blk.q_proj.g_idx: values must lie in [0, 3]"),
        (broken(scales=t.scales.clone().index_fill_(0, torch.tensor([1]), float("nan"))), "non-finite"),
    ]
    for bad, needle in cases:
        with pytest.raises(FormatError) as e:
            fmt.validate_layer("blk.q_proj", bad, spec)
        assert needle in str(e.value)


def test_layer_shapes_are_checked_from_metadata_alone():
    """check_layer_shapes takes (dtype, shape) as a header gives them: nothing is allocated."""
    i32, f16 = torch.int32, torch.float16
    spec = fmt.QuantSpec(bits=4, group_size=-1)
    ok = {"qweight": (i32, (4, 16)), "qzeros": (i32, (1, 2)), "scales": (f16, (1, 16))}
    assert fmt.check_layer_shapes("m", ok, spec) == 32
    cases = [
        ({"qweight": (i32, (31250000, 0))}, "m.qweight: out_features (dim 1) must be in [1, 16777216], got 0"),
        ({"qweight": (i32, (0, 16))}, "m.qweight: in_features must be in [1, 16777216], got 0"),
        ({"qweight": (i32, ())}, "m.qweight: expected a 2-D int32 tensor, got int32 ()"),
        ({"qweight": ("F8_E4M3", (4, 16))}, "m.qweight: expected a 2-D int32 tensor, got F8_E4M3 (4, 16)"),
        ({"bias": (f16, (15,))}, "m.bias: expected shape (16,) (out_features), got (15,)"),
        ({"g_idx": (torch.float32, (32,))}, "m.g_idx: expected a 1-D int32 tensor, got float32 (32,)"),
    ]
    for change, message in cases:
        with pytest.raises(FormatError) as e:
            fmt.check_layer_shapes("m", {**ok, **change}, spec)
        assert str(e.value) == message
