"""The gptq_ascend linear method inside vLLM's own layer classes, loaded shard by shard.

No engine: each layer is built once per simulated tensor-parallel rank (vLLM's TP rank/size lookups
patched), its parameters are filled through their ``weight_loader`` exactly as vLLM's model loaders
call them (with shard ids for fused layers), then ``process_weights_after_loading`` and ``apply``
run. The ranks' outputs are combined the way vLLM's collectives would (column-parallel: concatenated
per shard; row-parallel: summed) and compared with ``x @ W`` where W is ``format.dequantize`` of the
full, unsharded checkpoint tensors.

This covers every parameter kind (PackedvLLMParameter along K and along N, RowvLLMParameter g_idx,
GroupQuantScaleParameter and, for row-parallel act-order or group_size -1, ChannelQuantScaleParameter
with PackedColumnParameter) at TP=1, 2 and 4, for every bit width, sym/asym, v1/v2, act-order, and a
quantized lm_head with vocab padding. The real-engine TP=2 run is in test_vllm_plugin_engine.py.
"""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch

pytest.importorskip("vllm")

import gptq_ascend.vllm_plugin as plugin  # noqa: E402
from gptq_ascend import format as fmt  # noqa: E402
from gptq_ascend import ops  # noqa: E402
from gptq_ascend.errors import ConfigError  # noqa: E402

plugin.register()

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor.layers import linear as vlinear  # noqa: E402
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead  # noqa: E402

from gptq_ascend.vllm_plugin.config import GPTQAscendConfig  # noqa: E402
from gptq_ascend.vllm_plugin.linear import BACKEND_ENV, GPTQAscendLinearMethod, regularize  # noqa: E402

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def available_backends() -> list[str]:
    names = []
    for name, backend in ops.backends().items():
        ok, _ = backend.available()
        if ok and name in ("reference", "cpu"):
            names.append(name)
    return names


BACKENDS = available_backends()


# ---------------------------------------------------------------------------------------------------
# Random GPTQ tensors whose meaning format.dequantize defines
# ---------------------------------------------------------------------------------------------------


def random_gptq(k: int, n: int, spec: fmt.QuantSpec, seed: int, with_g_idx: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    g = spec.effective_group_size(k)
    groups = math.ceil(k / g)
    q = torch.randint(0, 2 ** spec.bits, (k, n), generator=gen)
    if spec.sym:
        z = torch.full((groups, n), spec.sym_zero)
    else:
        z = torch.randint(0, 2 ** spec.bits, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half()
    g_idx = (torch.arange(k) // g).to(torch.int32)
    if spec.desc_act:
        g_idx = g_idx[torch.randperm(k, generator=gen)].contiguous()
    out = {"qweight": fmt.pack(q, spec.bits, 0), "qzeros": fmt.pack_zeros(z, spec), "scales": scales}
    if with_g_idx:
        out["g_idx"] = g_idx
    out["_w"] = fmt.dequantize(fmt.GPTQTensors(out["qweight"], out["qzeros"], scales, g_idx), spec, k,
                               torch.float64)
    return out


def quant_config(spec: fmt.QuantSpec, **extra) -> GPTQAscendConfig:
    d = {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
         "desc_act": spec.desc_act, "checkpoint_format": spec.checkpoint_format, **extra}
    cfg = GPTQAscendConfig.from_config(d)
    cfg.packed_modules_mapping = dict(PACKED)
    return cfg


@contextlib.contextmanager
def tp_rank(rank: int, size: int):
    patches = []
    for mod in ("vllm.model_executor.layers.linear", "vllm.model_executor.parameter",
                "vllm.model_executor.layers.vocab_parallel_embedding"):
        for fn, value in (("get_tensor_model_parallel_rank", rank), ("get_tensor_model_parallel_world_size", size)):
            with contextlib.suppress(AttributeError):
                p = mock.patch(f"{mod}.{fn}", return_value=value)
                p.start()
                patches.append(p)
    try:
        with set_current_vllm_config(VllmConfig()):
            yield
    finally:
        for p in patches:
            p.stop()


def load(layer, name: str, tensor: torch.Tensor, shard=None) -> None:
    param = getattr(layer, name)
    if shard is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard)


def replicated_layer(spec: fmt.QuantSpec, t: dict, k: int, n: int, *, bias: bool):
    """A single-rank ReplicatedLinear with the GPTQ tensors `t` loaded, not yet processed."""
    with tp_rank(0, 1):
        layer = vlinear.ReplicatedLinear(k, n, bias=bias, quant_config=quant_config(spec), prefix="blk.fc")
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        load(layer, name, t[name])
    return layer


def run_layer(kind: str, spec: fmt.QuantSpec, tp: int, backend: str, monkeypatch, *, seed: int = 0,
              shards_differ: bool = False, with_g_idx: bool = True, m: int = 3):
    """Build/load/apply ``kind`` on every rank; return (combined output, x @ W reference, layers)."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    cfg = quant_config(spec)
    hidden, heads, kv_heads, head = 128, 4, 2, 32
    sizes = {"qkv": [heads * head, kv_heads * head, kv_heads * head], "merged": [256, 256],
             "column": [192], "row": [128], "replicated": [96]}[kind]
    k = 256 if kind == "row" else hidden
    ckpt = [random_gptq(k, n, spec, seed + 17 * i, with_g_idx) for i, n in enumerate(sizes)]
    if spec.desc_act and not shards_differ and with_g_idx:  # one input, one Hessian: one permutation
        for t in ckpt[1:]:
            t["g_idx"] = ckpt[0]["g_idx"].clone()
            t["_w"] = fmt.dequantize(fmt.GPTQTensors(t["qweight"], t["qzeros"], t["scales"], t["g_idx"]),
                                     spec, k, torch.float64)
    w_full = torch.cat([t["_w"] for t in ckpt], dim=1)
    x = torch.randn(m, k, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
    ref = x @ w_full

    ranks = tp if kind in ("qkv", "merged", "column", "row") else 1
    outs, layers = [], []
    for r in range(ranks):
        with tp_rank(r, ranks):
            prefix = f"model.layers.0.{ {'qkv': 'self_attn.qkv_proj', 'merged': 'mlp.gate_up_proj'}.get(kind, kind) }"
            if kind == "qkv":
                layer = vlinear.QKVParallelLinear(hidden, head, heads, kv_heads, bias=False, quant_config=cfg,
                                                  prefix=prefix)
            elif kind == "merged":
                layer = vlinear.MergedColumnParallelLinear(hidden, sizes, bias=False, quant_config=cfg,
                                                           prefix=prefix)
            elif kind == "column":
                layer = vlinear.ColumnParallelLinear(hidden, sizes[0], bias=False, quant_config=cfg, prefix=prefix)
            elif kind == "row":
                layer = vlinear.RowParallelLinear(k, sizes[0], bias=False, quant_config=cfg, prefix=prefix)
            else:
                layer = vlinear.ReplicatedLinear(hidden, sizes[0], bias=False, quant_config=cfg, prefix=prefix)
            assert isinstance(layer.quant_method, GPTQAscendLinearMethod)
            shard_ids = {"qkv": ["q", "k", "v"], "merged": [0, 1]}.get(kind, [None])
            for t, sid in zip(ckpt, shard_ids, strict=True):
                for pname in ("qweight", "qzeros", "scales", "g_idx"):
                    if pname in t:
                        load(layer, pname, t[pname], sid)
            layer.quant_method.process_weights_after_loading(layer)
            xr = x if kind != "row" else x[:, r * (k // ranks):(r + 1) * (k // ranks)]
            y = layer.quant_method.apply(layer, xr.float()).double()
            outs.append(y)
            layers.append(layer)
    if kind == "row":
        combined = sum(outs)
    elif ranks == 1:
        combined = outs[0]
    else:  # each rank holds its slice of every shard, shards side by side
        per_rank = [[n // ranks for n in sizes]] * ranks
        pieces = []
        for s in range(len(sizes)):
            for r in range(ranks):
                start = sum(per_rank[r][:s])
                pieces.append(outs[r][:, start:start + per_rank[r][s]])
        combined = torch.cat(pieces, dim=1)
    return combined, ref, layers


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    # fp32 accumulation of exactly dequantized weights: ~1e-6 relative; 1e-4 leaves room for kernels.
    assert err <= 1e-4 * scale, f"max abs error {err:.3g} vs output scale {scale:.3g}"


SPECS = [
    fmt.QuantSpec(4, 32, True, False, "gptq"),
    fmt.QuantSpec(8, 64, False, False, "gptq"),
    fmt.QuantSpec(3, 32, True, False, "gptq"),
    fmt.QuantSpec(2, 32, False, False, "gptq_v2"),
    fmt.QuantSpec(4, -1, True, False, "gptq"),
    fmt.QuantSpec(8, 32, False, True, "gptq"),
    fmt.QuantSpec(4, 64, True, True, "gptq_v2"),
]


def spec_id(s: fmt.QuantSpec) -> str:
    return (f"{s.bits}b-g{s.group_size}-{'sym' if s.sym else 'asym'}{'-act' if s.desc_act else ''}"
            f"-{s.checkpoint_format}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", ["qkv", "merged", "row"])
def test_sharded_layers_match_dequant(kind, tp, spec, backend, monkeypatch):
    got, ref, layers = run_layer(kind, spec, tp, backend, monkeypatch)
    assert_close(got, ref)
    for layer in layers:
        # the parameters are gone, the backend's tensors are buffers, and layer.weight is the packed
        # tensor the kernel streams (vLLM-Ascend's weight prefetch reads it)
        assert not any(n in dict(layer.named_parameters()) for n in ("qweight", "qzeros", "scales", "g_idx"))
        bufs = dict(layer.named_buffers())
        assert any(b.startswith("gptq0_") for b in bufs)
        assert any(layer.weight is b for b in bufs.values())
        assert all(p.backend == backend for p in layer.quant_method.parts)


def test_row_parallel_act_order_scales_are_whole_and_g_idx_sharded(monkeypatch):
    spec = fmt.QuantSpec(4, 32, True, True, "gptq")
    cfg = quant_config(spec)
    with tp_rank(1, 2):
        layer = vlinear.RowParallelLinear(256, 128, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    from vllm.model_executor.parameter import ChannelQuantScaleParameter, PackedColumnParameter, RowvLLMParameter

    assert isinstance(layer.scales, ChannelQuantScaleParameter) and layer.scales.shape == (8, 128)
    assert isinstance(layer.qzeros, PackedColumnParameter) and layer.qzeros.shape == (8, 16)
    assert type(layer.g_idx) is RowvLLMParameter and layer.g_idx.shape == (128,)
    assert layer.qweight.shape == (16, 128)
    # the act-order rows of one rank fall in groups of unequal size: they are regrouped
    got, ref, layers = run_layer("row", spec, 2, "reference", monkeypatch)
    assert_close(got, ref)
    assert all(p.has_gather for lay in layers for p in lay.quant_method.parts)


def test_row_parallel_group_ordered_scales_are_sharded():
    spec = fmt.QuantSpec(4, 32, True, False, "gptq")
    with tp_rank(0, 2):
        layer = vlinear.RowParallelLinear(256, 128, bias=False, quant_config=quant_config(spec),
                                          prefix="model.layers.0.mlp.down_proj")
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

    assert isinstance(layer.scales, GroupQuantScaleParameter) and layer.scales.shape == (4, 128)
    assert isinstance(layer.qzeros, PackedvLLMParameter) and layer.qzeros.shape == (4, 16)


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_shards_with_different_act_order_permutations(tp, monkeypatch):
    spec = fmt.QuantSpec(8, 32, False, True, "gptq")
    got, ref, layers = run_layer("qkv", spec, tp, "reference", monkeypatch, shards_differ=True)
    assert_close(got, ref)
    assert [len(lay.quant_method.parts) for lay in layers] == [3] * tp
    got, ref, _ = run_layer("merged", spec, tp, "reference", monkeypatch, shards_differ=True)
    assert_close(got, ref)


@pytest.mark.parametrize("kind", ["column", "replicated"])
def test_other_linear_classes(kind, monkeypatch):
    spec = fmt.QuantSpec(4, 32, False, True, "gptq")
    got, ref, _ = run_layer(kind, spec, 2 if kind == "column" else 1, "reference", monkeypatch)
    assert_close(got, ref)


@pytest.mark.parametrize("tp", [1, 2])
def test_checkpoint_without_g_idx(tp, monkeypatch):
    spec = fmt.QuantSpec(4, 32, True, False, "gptq")
    for kind in ("merged", "row"):
        got, ref, _ = run_layer(kind, spec, tp, "reference", monkeypatch, with_g_idx=False)
        assert_close(got, ref)


def test_bias_is_added_once(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "reference")
    spec = fmt.QuantSpec(4, 32, True, False, "gptq")
    t = random_gptq(128, 96, spec, 3)
    layer = replicated_layer(spec, t, 128, 96, bias=True)
    layer.bias.data.copy_(torch.randn(96))
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(2, 128)
    y, _ = layer(x)
    assert_close(y.double(), x.double() @ t["_w"] + layer.bias.double())


@pytest.mark.parametrize("tp", [1, 2])
def test_quantized_lm_head_with_vocab_padding(tp, monkeypatch):
    """vocab 1000 is padded to 1024 (and split across ranks); padded logits are zero."""
    monkeypatch.setenv(BACKEND_ENV, "reference")
    spec = fmt.QuantSpec(4, 32, False, False, "gptq")
    cfg = quant_config(spec, lm_head=True)
    vocab, hidden = 1000, 128
    t = random_gptq(hidden, vocab, spec, 5)
    x = torch.randn(2, hidden, dtype=torch.float64)
    ref = x @ t["_w"]
    outs = []
    for r in range(tp):
        with tp_rank(r, tp):
            head = ParallelLMHead(vocab, hidden, quant_config=cfg, prefix="lm_head")
        assert isinstance(head.quant_method, GPTQAscendLinearMethod)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            load(head, name, t[name])
        head.quant_method.process_weights_after_loading(head)
        y = head.quant_method.apply(head, x.float()).double()
        idx = head.shard_indices
        n_org = idx.org_vocab_end_index - idx.org_vocab_start_index
        assert float(y[:, n_org:].abs().max() if y.shape[1] > n_org else 0) == 0.0
        outs.append(y[:, :n_org])
    assert_close(torch.cat(outs, 1), ref)


def test_lm_head_not_quantized_unless_configured():
    spec = fmt.QuantSpec(4, 32, True, False, "gptq")
    with tp_rank(0, 1):
        head = ParallelLMHead(1024, 128, quant_config=quant_config(spec), prefix="lm_head")
    assert not isinstance(head.quant_method, GPTQAscendLinearMethod)


def test_tied_quantized_lm_head_is_refused():
    spec = fmt.QuantSpec(4, 32, True, False, "gptq")
    with tp_rank(0, 1):
        head = ParallelLMHead(1024, 128, quant_config=quant_config(spec, lm_head=True), prefix="lm_head")
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        emb = VocabParallelEmbedding(1024, 128)
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        head.tie_weights(emb)


def test_unquantized_modules_get_vllm_float_method():
    spec = fmt.QuantSpec(4, 32, True, False, "gptq")
    cfg = quant_config(spec, dynamic={r"-:.*\.mlp\..*": {}})
    with tp_rank(0, 1):
        down = vlinear.RowParallelLinear(256, 128, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
        o = vlinear.RowParallelLinear(128, 128, bias=False, quant_config=cfg, prefix="model.layers.0.self_attn.o_proj")
    assert isinstance(down.quant_method, vlinear.UnquantizedLinearMethod)
    assert isinstance(o.quant_method, GPTQAscendLinearMethod)


def test_fused_modules_with_different_settings_are_refused_naming_them():
    spec = fmt.QuantSpec(4, 32, True, False, "gptq")
    cfg = quant_config(spec, dynamic={r"+:.*\.k_proj": {"bits": 8}})
    with tp_rank(0, 1), pytest.raises(ConfigError) as e:
        vlinear.QKVParallelLinear(128, 32, 4, 2, bias=False, quant_config=cfg,
                                  prefix="model.layers.0.self_attn.qkv_proj")
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj: bits=8" in msg and "model.layers.0.self_attn.q_proj: bits=4" in msg
    cfg = quant_config(spec, dynamic={r"-:.*\.up_proj": {}})
    with tp_rank(0, 1), pytest.raises(ConfigError, match="up_proj: not quantized"):
        vlinear.MergedColumnParallelLinear(128, [256, 256], bias=False, quant_config=cfg,
                                           prefix="model.layers.0.mlp.gate_up_proj")


def test_dynamic_override_reaches_the_layer(monkeypatch):
    spec = fmt.QuantSpec(4, 32, True, False, "gptq")
    cfg = quant_config(spec, dynamic={r"+:model\.layers\.1\..*": {"bits": 8, "group_size": 64}})
    with tp_rank(0, 1):
        a = vlinear.RowParallelLinear(256, 128, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
        b = vlinear.RowParallelLinear(256, 128, bias=False, quant_config=cfg, prefix="model.layers.1.mlp.down_proj")
    assert (a.quant_method.spec.bits, a.quant_method.spec.group_size) == (4, 32)
    assert (b.quant_method.spec.bits, b.quant_method.spec.group_size) == (8, 64)
    assert b.qweight.shape == (64, 128) and b.scales.shape == (4, 128)


def test_modules_in_block_to_quantize():
    spec = fmt.QuantSpec(4, 32, True, False, "gptq")
    cfg = quant_config(spec, modules_in_block_to_quantize=[["self_attn.q_proj", "self_attn.k_proj",
                                                            "self_attn.v_proj"]])
    with tp_rank(0, 1):
        qkv = vlinear.QKVParallelLinear(128, 32, 4, 2, bias=False, quant_config=cfg,
                                        prefix="model.layers.0.self_attn.qkv_proj")
        down = vlinear.RowParallelLinear(256, 128, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    assert isinstance(qkv.quant_method, GPTQAscendLinearMethod)
    assert isinstance(down.quant_method, vlinear.UnquantizedLinearMethod)


@pytest.mark.parametrize("bits", [3, 8])
def test_shapes_that_cannot_shard_are_refused_at_construction(bits):
    spec = fmt.QuantSpec(bits, 32, True, False, "gptq")
    with tp_rank(0, 2), pytest.raises(ConfigError, match="group_size|32-bit words|multiple of 32"):
        # K per rank 48: not a multiple of group 32 (and for 3-bit not a multiple of 32)
        vlinear.RowParallelLinear(96, 64, bias=False, quant_config=quant_config(spec), prefix="blk.down_proj")


def test_regularize_is_exact():
    spec = fmt.QuantSpec(3, 32, False, True, "gptq")
    k, n = 96, 64
    t = random_gptq(k, n, spec, 11)
    # keep the rows of one "rank": unequal group sizes
    rows = torch.arange(0, k, 2)
    q = fmt.unpack_weight_codes(fmt.GPTQTensors(t["qweight"], t["qzeros"], t["scales"], t["g_idx"]), spec, k)
    sub = fmt.GPTQTensors(fmt.pack(q[rows], 3, 0), t["qzeros"], t["scales"], t["g_idx"][rows])
    g_idx = t["g_idx"][rows].long()
    z = fmt.unpack_zeros(t["qzeros"], spec, n)
    w = (q[rows] - z[g_idx]).double() * t["scales"].double()[g_idx]
    new_t, new_spec, new_k, gather = regularize(sub, spec, k // 2)
    assert not new_spec.desc_act and new_k % 32 == 0
    w2 = fmt.dequantize(new_t, new_spec, new_k, torch.float64)
    x = torch.randn(4, k // 2, dtype=torch.float64)
    xg = torch.nn.functional.pad(x, (0, 1)).index_select(-1, gather)
    torch.testing.assert_close(xg @ w2, x @ w, rtol=1e-12, atol=1e-12)


def test_opaque_op_under_torch_compile(monkeypatch):
    """A backend that is not traceable (the reference one) runs as gptq_ascend_vllm::gemm under
    torch.compile(fullgraph=True): the fake implementation gives the shapes, the buffers are inputs."""
    monkeypatch.setenv(BACKEND_ENV, "reference")
    spec = fmt.QuantSpec(4, 32, False, True, "gptq")
    t = random_gptq(128, 96, spec, 8)
    layer = replicated_layer(spec, t, 128, 96, bias=False)
    layer.quant_method.process_weights_after_loading(layer)
    assert not layer.quant_method.parts[0].compile_safe
    calls = []
    real = torch.ops.gptq_ascend_vllm.gemm.default

    def f(x):
        return layer.quant_method.apply(layer, x)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 128)
    torch._dynamo.reset()
    with mock.patch("gptq_ascend.vllm_plugin.linear._gemm_impl", wraps=__import__(
            "gptq_ascend.vllm_plugin.linear", fromlist=["_gemm_impl"])._gemm_impl) as impl:
        y = compiled(x)
        calls.append(impl.call_count)
    assert calls[0] >= 1 and real is not None
    assert_close(y.double(), x.double() @ t["_w"])
