"""Contracts read from the vendors' own files (tests/ascend/vendor/, cut from the torch_npu 2.13.0 wheel and
the vllm-ascend 0.18.0 / 0.23.0.post1 sdists by tests/ascend/vendor/extract.py; see its README.md).

torch_npu: every ``torch_npu.<op>(...)`` call in python/gptq_ascend is bound against the op's schema from
the shipped native-functions YAML (parsed by torch's own schema parser); the arguments we build for every
layer kind are put through the shipped meta function (its verbatim source, EXECUTED on meta tensors with
one shim: the ``torch_npu`` dtype names it compares uint8 weights with) and through the constraints the
shipped docs state. vLLM-Ascend: the hooks the plugin relies on are found, per version, in the source.

A version that moves any of this fails here instead of on a 910B. When the archives are at hand
(``GPTQ_ASCEND_VENDOR_DIR`` holding the wheel and the sdists), the excerpts are re-cut and must match.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import types
from pathlib import Path

import pytest
import torch

import gptq_ascend
from gptq_ascend import format as fmt
from gptq_ascend.backends.ascend import fused
from gptq_ascend.errors import ConfigError
from gptq_ascend.vllm_plugin import compat

from .vendor_model import random_layer

VENDOR = Path(__file__).resolve().parent / "vendor"
TORCH_NPU = VENDOR / "torch-npu-2.13.0"
VLLM_ASCEND = ("vllm-ascend-0.18.0", "vllm-ascend-0.23.0.post1")
PACKAGE = Path(gptq_ascend.__file__).resolve().parent


def excerpt(directory: Path, name: str) -> dict[str, str]:
    """{definition name: verbatim source} of one excerpt file."""
    text = (directory / f"{name}.excerpt").read_bytes().decode("utf-8")
    parts = re.split(r"^# ---- (\S+): lines \d+-\d+\n", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def dedented_ast(src: str) -> ast.Module:
    import textwrap

    return ast.parse(textwrap.dedent(src))


# --------------------------------------------------------------------------------------------------
# torch_npu: the schema
# --------------------------------------------------------------------------------------------------


def shipped_schemas() -> dict[str, torch._C.FunctionSchema]:
    out = {}
    for name, entry in excerpt(TORCH_NPU, "npu_native_functions_by_codegen.yaml").items():
        func = re.search(r"^\s*func:\s*(.+)$", entry, flags=re.M).group(1).strip()
        out[name] = torch._C.parse_schema(func)
    return out


def our_torch_npu_calls() -> list[tuple[str, ast.Call, ast.FunctionDef | None]]:
    """Every ``torch_npu.<name>(...)`` call in the package, with its enclosing function."""
    calls = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)] + [None]:
            body = ast.walk(func) if func is not None else ()
            for node in body:
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch_npu"):
                    calls.append((f"{path.relative_to(PACKAGE)}:{node.lineno}", node, func))
    # a call is visited once per enclosing function level; keep the innermost
    seen, out = set(), []
    for where, node, func in reversed(calls):
        if id(node) not in seen:
            seen.add(id(node))
            out.append((where, node, func))
    return out


def test_every_torch_npu_call_binds_to_the_shipped_schema():
    schemas = shipped_schemas()
    calls = our_torch_npu_calls()
    assert {c.func.attr for _, c, _ in calls} == set(schemas), \
        "a torch_npu op is called that tests/ascend/vendor/extract.py does not extract (or one is no longer called)"
    for where, call, func in calls:
        schema = schemas[call.func.attr]
        args = list(schema.arguments)
        positional = [a for a in args if not a.kwarg_only]
        assert len(call.args) <= len(positional), f"{where}: too many positional arguments for {schema}"
        given = set()
        for i, arg in enumerate(call.args):
            # Our positional arguments are variables named exactly as the schema's: order is checked.
            assert isinstance(arg, ast.Name) and arg.id == positional[i].name, \
                f"{where}: positional argument {i} is {ast.unparse(arg)}; the schema has {positional[i].name}"
            given.add(positional[i].name)
        for kw in call.keywords:
            assert kw.arg in {a.name for a in args}, f"{where}: {kw.arg}= is not in {schema}"
            assert kw.arg not in given, f"{where}: {kw.arg} given twice"
            given.add(kw.arg)
        # Arguments with schema defaults are optional; required ones must be given.
        required = [a.name for a in args if not a.has_default_value()]
        assert set(required) <= given, f"{where}: missing {sorted(set(required) - given)} for {schema}"
        # The wrapper's annotations agree with the schema's types (Tensor / Tensor? vs int).
        assert func is not None
        annotations = {a.arg: ast.unparse(a.annotation) for a in func.args.args if a.annotation is not None}
        for name in given:
            schema_type = re.sub(r"^Optional\[(.*)\]$", r"\1", str(next(a for a in args if a.name == name).type))
            if name in annotations:
                expected = {"Tensor": "torch.Tensor", "int": "int"}[schema_type]
                assert annotations[name] == expected, f"{where}: {name}: {annotations[name]} vs schema {schema_type}"


def test_the_schema_and_the_docs_agree_on_what_we_pass():
    """The docs' signature lists the same leading arguments as the YAML (the YAML adds weight_dtype)."""
    docs = excerpt(TORCH_NPU, "_op_plugin_docs.py")
    schemas = shipped_schemas()
    for op, schema in schemas.items():
        proto = re.search(rf"torch_npu\.{op}\((.*?)\) -> Tensor", docs[op]).group(1)
        doc_names = [p.strip().split()[1].split("=")[0] for p in proto.split(",")]
        assert doc_names == [a.name for a in schema.arguments][:len(doc_names)], (op, doc_names)


def test_every_torch_npu_device_function_we_call_is_exported():
    """``torch.npu.<name>`` (device probing, synchronize) in the package and the NPU benchmark: each name
    is in the wheel's ``torch_npu.npu.__all__``."""
    (src,) = excerpt(TORCH_NPU, "__init__.py").values()
    exported = set(ast.literal_eval(ast.parse(src).body[0].value))
    used = {}
    for path in [*PACKAGE.rglob("*.py"), PACKAGE.parents[1] / "benchmarks" / "dequant.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "npu" and isinstance(node.value.value, ast.Name)
                    and node.value.value.id == "torch"):
                used.setdefault(node.attr, f"{path.name}:{node.lineno}")
    assert used, "no torch.npu call found: the scan is broken"
    missing = {name: where for name, where in used.items() if name not in exported}
    assert not missing, f"not exported by torch_npu 2.13.0's torch_npu.npu: {missing}"


# --------------------------------------------------------------------------------------------------
# torch_npu: the meta function, executed, and the documented constraints
# --------------------------------------------------------------------------------------------------


def shipped_meta():
    """The shipped ``npu_weight_quant_batchmatmul_meta``, executed from its verbatim source."""
    src = excerpt(TORCH_NPU, "_meta_registrations.py")["npu_weight_quant_batchmatmul_meta"]
    shim_npu = types.SimpleNamespace(int4=object(), float4_e2m1fn_x2=object(), float4_e1m2fn_x2=object())
    namespace = {"torch": torch, "torch_npu": shim_npu, "m": None, "impl": lambda lib, name: (lambda f: f)}
    exec(compile(src, "torch_npu/op_plugin/meta/_meta_registrations.py", "exec"), namespace)
    return namespace["npu_weight_quant_batchmatmul_meta"]


def as_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="meta")


LAYER_KINDS = [
    # id, bits, K, N, group
    ("int8-per-group", 8, 512, 96, 128),
    ("int4-int32-packed-per-group", 4, 512, 96, 128),
    ("int8-per-channel-g0", 8, 512, 96, -1),
    ("int4-per-channel-g0-transposed", 4, 512, 96, -1),
    ("int4-per-channel-g0-K%8", 4, 100, 96, -1),
    ("int4-per-channel-g0-K8", 4, 8, 96, -1),
]


def _fused_call_args(bits, k, n, group, m=5, dtype=torch.float16):
    """What fused_gemm hands the op for a random layer: recorded at our own seam (npu_fused_matmul),
    with the int4 pack done by its documented model."""
    layer = random_layer(bits, k, n, group, False, "gptq", False, seed=k * n + bits)
    args = fused.prepare_fused_args(layer.tensors, layer.spec, k)
    packed_inputs = []

    def int4pack(w):
        packed_inputs.append(w)
        return fused.int4pack_reference(w)

    packed = fused.pack_fused(args, layer.spec, k, n, torch.device("cpu"), convert_int4=int4pack)
    seen = {}

    def record(x, weight, antiquant_scale, antiquant_offset, antiquant_group_size):
        seen.update(x=x, weight=weight, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
                    antiquant_group_size=antiquant_group_size)
        return x.new_empty((x.shape[0], n))

    x = torch.randn((m, k)).to(dtype)
    orig, fused.npu_fused_matmul = fused.npu_fused_matmul, record
    try:
        fused.fused_gemm(fused.fused_activation(x, packed.perm), packed)
    finally:
        fused.npu_fused_matmul = orig
    return seen, packed_inputs


@pytest.mark.parametrize("kind", LAYER_KINDS, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_our_arguments_pass_the_shipped_meta_function(kind, dtype):
    _, bits, k, n, group = kind
    ok, why = fused.fused_limits(fmt.QuantSpec(bits=bits, group_size=group), k, n, "Ascend910B3")
    assert ok, why
    seen, _ = _fused_call_args(bits, k, n, group, dtype=dtype)
    meta = shipped_meta()
    out = meta(*(as_meta(seen[a]) for a in ("x", "weight", "antiquant_scale", "antiquant_offset")),
               antiquant_group_size=seen["antiquant_group_size"])
    assert tuple(out.shape) == (5, n) and out.dtype == dtype


def test_the_meta_function_reads_a_contiguous_int32_weight_as_packed_along_n():
    """Why fused.int4_transposed_layout excludes K == 8: the transposed (K/8, N) view is then contiguous
    in torch's sense and the shipped meta function infers 8*N outputs (the docs list the (1, 8)
    transposed int4 weight as unsupported)."""
    meta = shipped_meta()
    k, n = 8, 96
    naive = torch.zeros((n, k // 8), dtype=torch.int32).t()          # what a K % 8 rule alone would send
    assert naive.is_contiguous()
    x = torch.empty((3, k), dtype=torch.float16, device="meta")
    s = torch.empty((n,), dtype=torch.float16, device="meta")
    assert meta(x, as_meta(naive), s, s).shape[1] == 8 * n
    assert not fused.int4_transposed_layout(k, n)
    docs = excerpt(TORCH_NPU, "_op_plugin_docs.py")["npu_weight_quant_batchmatmul"]
    assert "不支持输入weight shape为(1, 8)且类型为int4, 同时weight带有transpose的场景" in docs


# The docs' constraints we rely on, quoted (a docs change that drops one fails here).
DOC_RULES = {
    "npu_weight_quant_batchmatmul": (
        "per_channel模式: 输入shape为(1, N)或(N,).",
        "per_group模式: 输入shape为(ceil(K, antiquant_group_size),  N).",
        "若输入为float16、bfloat16,  其数据类型需与x保持一致.",
        "若输入为float16、bfloat16, 其数据类型需与antiquant_scale保持一致.",
        "per-group场景下要求传入值的范围为[32, K-1]且必须是32的倍数.",
        "K、N的范围为[1, 65535]",
        "antiquant_scale和antiquant_offset的输入shape要保持一致.",
        "数据类型支持int8、int32(通过int32承载int4的输入",
        "支持输入维度为两维(M, K)",
    ),
    "npu_convert_weight_to_int4pack": (
        "数据类型支持int32,  不支持非连续的Tensor",
        "最后一维度需要8个元素对齐, 元素的值需要在int4的表示范围内, 即[-8, 7].",
        "shape为(k, n/8), (n, k/8)",
    ),
}


def test_the_documented_constraints_are_still_stated():
    docs = excerpt(TORCH_NPU, "_op_plugin_docs.py")
    for op, rules in DOC_RULES.items():
        text = docs[op].replace("\r\n", "\n")
        for rule in rules:
            assert rule in text, f"{op}: the shipped docs no longer say {rule!r}"


@pytest.mark.parametrize("kind", LAYER_KINDS, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_our_arguments_meet_the_documented_constraints(kind, dtype):
    _, bits, k, n, group = kind
    seen, packed_inputs = _fused_call_args(bits, k, n, group, dtype=dtype)
    x, w, s, o, g = (seen[a] for a in ("x", "weight", "antiquant_scale", "antiquant_offset",
                                       "antiquant_group_size"))
    assert x.dim() == 2 and x.shape[1] == k and x.dtype in (torch.float16, torch.bfloat16)
    assert 1 <= k <= 65535 and 1 <= n <= 65535
    assert w.dtype == (torch.int8 if bits == 8 else torch.int32) and w.dim() == 2
    assert s.dtype == x.dtype and o.dtype == s.dtype and s.shape == o.shape
    if g == 0:
        assert tuple(s.shape) in ((n,), (1, n))
    else:
        assert g % 32 == 0 and 32 <= g <= k - 1 and tuple(s.shape) == (-(-k // g), n)
    for p in packed_inputs:   # what npu_convert_weight_to_int4pack receives
        assert p.dtype == torch.int32 and p.dim() == 2 and p.is_contiguous() and p.shape[-1] % 8 == 0
        assert int(p.min()) >= -8 and int(p.max()) <= 7
        assert tuple(p.shape) in ((k, n), (n, k))


# --------------------------------------------------------------------------------------------------
# vLLM-Ascend: the hooks the plugin relies on, in both versions
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=VLLM_ASCEND)
def va(request) -> Path:
    return VENDOR / request.param


def test_npu_platform_list_takes_registered_quantization_methods(va):
    """register_quantization_config appends to ``current_platform.supported_quantization`` only when it is
    a non-empty list; NPUPlatform must not override verify_quantization either."""
    plat = excerpt(va, "platform.py")
    assert "NPUPlatform.verify_quantization" not in plat
    stmt = dedented_ast(plat["NPUPlatform.supported_quantization"]).body[0]
    assert isinstance(stmt, ast.AnnAssign) and ast.unparse(stmt.annotation) == "list[str]"
    assert isinstance(stmt.value, ast.List) and stmt.value.elts
    assert ast.literal_eval(dedented_ast(plat["NPUPlatform.device_type"]).body[0].value) == "npu"
    # vLLM itself (make test's venv has it; .venv-ascend, the toolchain venv, does not)
    quantization = pytest.importorskip("vllm.model_executor.layers.quantization")

    assert "current_platform.supported_quantization" in inspect.getsource(quantization.register_quantization_config)


ASCEND_LINEARS = {
    "AscendQKVParallelLinear": "QKVParallelLinear",
    "AscendMergedColumnParallelLinear": "MergedColumnParallelLinear",
    "AscendRowParallelLinear": "RowParallelLinear",
    "AscendColumnParallelLinear": "ColumnParallelLinear",
    "AscendReplicatedLinear": "ReplicatedLinear",
}
# Reviewed readers of ``.weight`` in vllm_ascend/ops/linear.py and why a GPTQ layer never reaches them.
LINEAR_WEIGHT_READERS = {
    "AscendColumnParallelLinear.weight_loader": "only for prefixes containing 'wo_a' (DeepSeek-V4); our "
                                                "parameters carry their own loaders",
}


def test_ascend_linear_classes_subclass_vllm_linears_and_ask_the_quant_config(va):
    vl = pytest.importorskip("vllm.model_executor.layers.linear")   # absent from .venv-ascend
    classes = excerpt(va, "linear.py")
    base = dedented_ast(classes["AscendLinearBase"])
    assert "quant_config.get_quant_method(self, prefix=prefix)" in ast.unparse(base)
    for name, upstream in ASCEND_LINEARS.items():
        cls = dedented_ast(classes[name]).body[0]
        assert [ast.unparse(b) for b in cls.bases] == [upstream], name
        assert issubclass(getattr(vl, upstream), vl.LinearBase)
        src = ast.unparse(cls)
        # The quant method comes from AscendLinearBase.__init__ (-> get_quant_method), directly or through
        # AscendColumnParallelLinear.__init__.
        assert re.search(r"Ascend(LinearBase|ColumnParallelLinear)\.__init__\(", src), name
        # weight_loader_v2 for methods named in WEIGHT_LOADER_V2_SUPPORTED, exactly as upstream vLLM does.
        up = inspect.getsource(getattr(vl, upstream).__init__)
        assert ("WEIGHT_LOADER_V2_SUPPORTED" in src) == ("WEIGHT_LOADER_V2_SUPPORTED" in up), name
        readers = {f"{name}.{f.name}" for f in cls.body if isinstance(f, ast.FunctionDef)
                   and any(isinstance(n, ast.Attribute) and n.attr == "weight" for n in ast.walk(f))}
        assert readers <= set(LINEAR_WEIGHT_READERS), f"{va.name}: new readers of .weight: {readers}"


def _guarding_tests(func: ast.AST, target: ast.AST) -> list[str]:
    """The ``if`` tests on the path from ``func`` down to ``target`` (the branch taken)."""
    path: list[str] = []

    def visit(node, tests):
        if node is target:
            path.extend(tests)
            return True
        if isinstance(node, ast.If):
            return (any(visit(c, [*tests, ast.unparse(node.test)]) for c in node.body)
                    or any(visit(c, [*tests, f"not ({ast.unparse(node.test)})"]) for c in node.orelse))
        return any(visit(c, tests) for c in ast.iter_child_nodes(node))

    visit(func, [])
    return path


def test_linear_op_reads_layer_weight_only_where_gptq_layers_never_go(va):
    ops = excerpt(va, "linear_op.py")
    assert set(ops) == {"MatmulAllreduceRowParallelOp.apply_impl", "SequenceRowParallelOp.matmul_and_reduce",
                        "_get_row_parallel_op"}, f"{va.name}: the readers of .weight moved: {sorted(ops)}"
    for name in ("MatmulAllreduceRowParallelOp.apply_impl", "SequenceRowParallelOp.matmul_and_reduce"):
        func = dedented_ast(ops[name])
        for node in ast.walk(func):
            if isinstance(node, ast.Attribute) and node.attr == "weight":
                tests = " and ".join(_guarding_tests(func, node))
                if name.startswith("Matmul"):
                    # Reached only with matmul_allreduce enabled: the plugin refuses that at start-up.
                    assert "self.tp_size > 1" in tests, tests
                else:
                    # Only for vLLM's unquantized method or vLLM-Ascend's own W8A8 method.
                    assert "UnquantizedLinearMethod" in tests or "AscendLinearMethod" in tests, tests
    chooser = ast.unparse(dedented_ast(ops["_get_row_parallel_op"]))
    assert re.search(r"if matmul_allreduce_enable\(\):\s+return MatmulAllreduceRowParallelOp\(layer\)", chooser)


def test_quantized_lm_head_hooks(va):
    """A quantized lm_head: vLLM-Ascend's AscendParallelLMHead is a ParallelLMHead (what our
    get_quant_method tests), asks the quant config, and keeps the ``tp_rank`` / ``tp_size`` /
    ``shard_indices`` our lm_head loader reads (from its own group: the lm_head TP group when
    ``lmhead_tensor_parallel_size`` is set); the logits processor calls ``quant_method.apply``."""
    emb = excerpt(va, "vocab_parallel_embedding.py")
    head = dedented_ast(emb["AscendParallelLMHead"]).body[0]
    assert [ast.unparse(b) for b in head.bases] == ["ParallelLMHead"]
    assert "AscendVocabParallelEmbedding.__init__(" in ast.unparse(head)
    init = ast.unparse(dedented_ast(emb["AscendVocabParallelEmbedding.__init__"]))
    assert "quant_config.get_quant_method(self, prefix=prefix)" in init
    for attr in ("tp_size", "tp_rank", "shard_indices"):
        assert re.search(rf"self\.{attr} = ", init), attr
    for name in ("AscendLogitsProcessor._get_logits_normal", "AscendLogitsProcessor._get_logits_lmheadtp"):
        assert "lm_head.quant_method.apply(lm_head, " in ast.unparse(dedented_ast(emb[name])), name
    src = (PACKAGE / "vllm_plugin" / "linear.py").read_text()   # read, not imported: no vLLM needed
    assert "layer.tp_rank" in src and "layer.shard_indices" in src   # what the plugin reads


def _vendor_matmul_allreduce_switches(va: Path) -> tuple[str, str | None]:
    """(the env var, the additional_config key or None) that turn vLLM-Ascend's matmul-allreduce on."""
    util = ast.unparse(dedented_ast(excerpt(va, "utils.py")["matmul_allreduce_enable"]))
    env = excerpt(va, "envs.py")
    assert list(env) == ["VLLM_ASCEND_ENABLE_MATMUL_ALLREDUCE"]
    if "envs_ascend.VLLM_ASCEND_ENABLE_MATMUL_ALLREDUCE" in util:
        return "VLLM_ASCEND_ENABLE_MATMUL_ALLREDUCE", None
    assert "get_ascend_config().enable_matmul_allreduce" in util, util
    (stmt_src,) = excerpt(va, "ascend_config.py").values()
    call = dedented_ast(stmt_src).body[0].value
    key, env_name = (a.value for a in call.args[1:3])
    return env_name, key


def test_every_way_to_enable_matmul_allreduce_is_refused(va):
    env_name, key = _vendor_matmul_allreduce_switches(va)
    assert env_name == compat.ASCEND_MATMUL_ALLREDUCE_ENV
    with pytest.raises(ConfigError, match=env_name):
        compat.check_ascend_settings("npu", {env_name: "1"}, {})
    compat.check_ascend_settings("npu", {env_name: "0"}, {})
    if key is not None:   # 0.23+: additional_config wins over the env var (AscendConfig._get_config_value)
        assert key == compat.ASCEND_MATMUL_ALLREDUCE_KEY
        with pytest.raises(ConfigError, match=key):
            compat.check_ascend_settings("npu", {}, {key: True})
        compat.check_ascend_settings("npu", {env_name: "1"}, {key: False})


@pytest.mark.parametrize("value", ("0", "1", "2", "00", " 1"))
def test_env_flag_reads_the_env_var_as_vllm_ascend_does(va, value):
    (src,) = excerpt(va, "envs.py").values()
    lam = ast.parse("{" + src.strip().rstrip(",") + "}").body[0].value.values[0]
    fake_os = types.SimpleNamespace(getenv=lambda name, default: {"VLLM_ASCEND_ENABLE_MATMUL_ALLREDUCE": value}
                                    .get(name, default))
    vendor = eval(compile(ast.Expression(lam), "envs.py", "eval"), {"os": fake_os})()
    assert compat.env_flag(compat.ASCEND_MATMUL_ALLREDUCE_ENV, {compat.ASCEND_MATMUL_ALLREDUCE_ENV: value}) == vendor


def test_weight_prefetch_reads_only_what_an_exposed_packed_weight_has(va):
    """Weight prefetch reads ``mlp.gate_up_proj.weight`` / ``mlp.down_proj.weight`` and then only
    ``weight.data.element_size()`` and ``weight.data.numel()``; compat.expose_weight gives our layers a
    tensor there (the packed weight the kernel streams)."""
    readers = excerpt(va, "weight_prefetch.py")
    assert set(readers) == {"WeightPrefetchMethod._maybe_prefetch_mlp_gate_up_weight_preprocess",
                            "WeightPrefetchMethod._maybe_prefetch_mlp_down_weight_preprocess"}
    for src in readers.values():
        text = ast.unparse(dedented_ast(src))
        assert re.search(r"\.mlp\.(gate_up|down)_proj\.weight", text)
        uses = set(re.findall(r"\bweight\.([a-z_]+(?:\.[a-z_]+)?)", text))
        assert uses <= {"data.element_size", "data.numel"}, uses
    layer = torch.nn.Module()
    compat.expose_weight(layer, torch.zeros((16, 8), dtype=torch.int32))
    assert layer.weight.data.element_size() * layer.weight.data.numel() == 16 * 8 * 4


# --------------------------------------------------------------------------------------------------
# The excerpts are the vendor's text
# --------------------------------------------------------------------------------------------------


def test_sources_name_every_excerpt():
    for d in (TORCH_NPU, *(VENDOR / v for v in VLLM_ASCEND)):
        src = json.loads((d / "SOURCES.json").read_text())
        assert re.fullmatch(r"[0-9a-f]{64}", src["archive_sha256"])
        for member, digest in src["files"].items():
            exists = (d / f"{Path(member).name}.excerpt").exists()
            assert exists == (digest is not None), (d.name, member)
        assert (d / "LICENSE").exists()


def test_excerpts_match_the_archives_when_present():
    root = os.environ.get("GPTQ_ASCEND_VENDOR_DIR")
    if not root:
        pytest.skip("GPTQ_ASCEND_VENDOR_DIR is not set (a directory with the torch_npu 2.13.0 wheel and the "
                    "vllm-ascend 0.18.0 / 0.23.0.post1 sdists; see tests/ascend/vendor/README.md)")
    import subprocess
    import sys

    base = Path(root)
    wheels = sorted(base.rglob("torch_npu-2.13.0-*.whl"))
    sdists = [p for v in ("0.18.0", "0.23.0.post1") for p in sorted(base.rglob(f"vllm_ascend-{v}.tar.gz"))]
    assert wheels and len(sdists) == 2, f"{root}: expected the wheel and both sdists"
    r = subprocess.run([sys.executable, str(VENDOR / "extract.py"), "--check", "--torch-npu", str(wheels[0]),
                        "--vllm-ascend", *map(str, sdists)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
