"""The gptq_ascend vLLM plugin without an engine: registration, config decisions, compat paths, serve shim.

The compat tests call the version-dependent code paths with stand-ins for vLLM modules and calling
conventions of versions that cannot be installed beside torch 2.13 (vLLM 0.18/0.19 for vLLM-Ascend
0.18), so every branch of compat.py runs here.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import gptq_ascend.vllm_plugin as plugin  # noqa: E402
from gptq_ascend import vllm_cpu_shim  # noqa: E402
from gptq_ascend.errors import ConfigError  # noqa: E402
from gptq_ascend.vllm_plugin import compat  # noqa: E402
from gptq_ascend.vllm_plugin.config import GPTQAscendConfig  # noqa: E402

from . import vllm_compat_helpers as helpers  # noqa: E402

GPTQ_CFG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}


# ---------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------


def test_entry_point_is_declared():
    eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "gptq_ascend"]
    assert eps, "gptq-ascend is not installed (pip install -e . --no-build-isolation)"
    assert eps[0].value == "gptq_ascend.vllm_plugin:register"
    assert eps[0].load() is plugin.register


def test_register_is_idempotent_and_loaded_by_vllm():
    from vllm.model_executor.layers import linear
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    plugin.register()
    plugin.register()
    assert QUANTIZATION_METHODS.count("gptq_ascend") == 1
    assert get_quantization_config("gptq_ascend") is GPTQAscendConfig
    assert linear.WEIGHT_LOADER_V2_SUPPORTED.count("GPTQAscendLinearMethod") == 1
    # a second process-level registration (module reloaded, flag lost) still adds nothing
    plugin._registered = False
    plugin.register()
    assert QUANTIZATION_METHODS.count("gptq_ascend") == 1


# ---------------------------------------------------------------------------------------------------
# Config decisions
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [(0, 18, 0), (0, 19, 1), (0, 20, 0), (0, 32, 0), (0, 33, 0)])
def test_override_only_when_asked(version):
    call = lambda cfg, user: helpers.call_override(  # noqa: E731
        GPTQAscendConfig.override_quantization_method, cfg, user, version=version)
    assert call(GPTQ_CFG, "gptq_ascend") == "gptq_ascend"
    assert call(dict(GPTQ_CFG, quant_method="GPTQ"), "gptq_ascend") == "gptq_ascend"
    # never hijack plain GPTQ loading
    assert call(GPTQ_CFG, None) is None
    assert call(GPTQ_CFG, "gptq") is None
    assert call(GPTQ_CFG, "gptq_marlin") is None
    # another method's checkpoint: leave it to vLLM, which reports the mismatch
    assert call({"quant_method": "awq", "bits": 4}, "gptq_ascend") is None


@pytest.mark.parametrize("field, value, match", [
    ("bits", 5, "bits"),
    ("bits", "4", "bits"),
    ("group_size", 0, "group_size"),
    ("checkpoint_format", "marlin", "checkpoint_format"),
    ("pack_dtype", "int16", "pack_dtype"),
    ("quant_method", "awq", "quant_method"),
    ("sym", "yes", "sym"),
    ("dynamic", {"+:(": {"bits": 8}}, "dynamic"),
    ("dynamic", {r"+:.*\.k_proj": {"bits": 6}}, "bits"),
    ("is_marlin_format", True, "is_marlin_format"),
])
def test_unsupported_settings_are_refused_naming_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        GPTQAscendConfig.from_config(dict(GPTQ_CFG, **{field: value}))


def test_missing_required_field():
    cfg = dict(GPTQ_CFG)
    del cfg["bits"]
    with pytest.raises(ConfigError, match="'bits'"):
        GPTQAscendConfig.from_config(cfg)


def test_supported_settings_are_accepted():
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            for fmt_name in ("gptq", "gptq_v2"):
                cfg = GPTQAscendConfig.from_config(dict(GPTQ_CFG, bits=bits, sym=sym, checkpoint_format=fmt_name,
                                                        desc_act=True, group_size=32, lm_head=True))
                assert cfg.gptq.default.bits == bits and cfg.gptq.lm_head
    cfg = GPTQAscendConfig.from_config(dict(GPTQ_CFG, group_size=-1, meta={"quantizer": ["gptqmodel:7.7.0"]}))
    assert cfg.get_name() == "gptq_ascend"


def test_act_dtypes():
    assert torch.float32 in compat.supported_act_dtypes("cpu")
    assert compat.supported_act_dtypes("npu") == [torch.float16, torch.bfloat16]
    assert set(GPTQAscendConfig.get_supported_act_dtypes()) >= {torch.float16, torch.bfloat16}


@pytest.mark.parametrize("version", [(0, 18, 0), (0, 32, 0)])
def test_quantize_config_json_is_read_when_config_json_has_none(tmp_path, version):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "tie_word_embeddings": True}))
    (tmp_path / "quantize_config.json").write_text(json.dumps(dict(GPTQ_CFG, bits=8)))
    cfg = GPTQAscendConfig()  # what vLLM builds when get_config_filenames() is empty
    hf = types.SimpleNamespace(tie_word_embeddings=True)
    helpers.call_maybe_update_config(cfg, str(tmp_path), hf_config=hf, version=version)
    assert cfg.gptq.default.bits == 8
    if version >= (0, 20):
        assert cfg.tie_word_embeddings


def test_non_gptq_model_is_refused_with_a_clear_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(ConfigError, match="not a GPTQ checkpoint"):
        GPTQAscendConfig().maybe_update_config(str(tmp_path))
    with pytest.raises(ConfigError, match="is it a GPTQ checkpoint"):
        GPTQAscendConfig().maybe_update_config("Org/not-a-local-folder")


def test_checkpoint_weight_mapper_keeps_g_idx():
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    ours = GPTQAscendConfig.from_config(GPTQ_CFG).get_checkpoint_weight_mapper()
    name = "model.layers.0.mlp.down_proj.g_idx"
    assert ours.map_name(name) == name
    if helpers.drops_g_idx_by_default():
        assert QuantizationConfig.get_checkpoint_weight_mapper().map_name(name) is None


def test_apply_vllm_mapper_renames_module_lists():
    from vllm.model_executor.models.utils import WeightsMapper

    cfg = GPTQAscendConfig.from_config(dict(GPTQ_CFG, modules_in_block_to_quantize=[["model.layers.0.mlp.up_proj"]],
                                            modules_to_not_convert=["model.visual"]))
    cfg.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."}))
    assert cfg.gptq.modules_in_block_to_quantize == ("language_model.model.layers.0.mlp.up_proj",)
    assert cfg.gptq.modules_to_not_convert == ("language_model.model.visual",)


def test_spec_for_layer_uses_packed_modules_mapping():
    cfg = GPTQAscendConfig.from_config(dict(GPTQ_CFG, dynamic={r"+:.*\.layers\.1\..*": {"bits": 8}}))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert cfg.shard_names("model.layers.0.self_attn.qkv_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert cfg.spec_for_layer("model.layers.1.self_attn.qkv_proj").bits == 8
    assert cfg.spec_for_layer("model.layers.0.self_attn.o_proj").bits == 4


def test_moe_experts_are_refused():
    moe = compat.moe_layer_types()
    if not moe:
        pytest.skip("no fused-MoE layer class in this vLLM")
    cfg = GPTQAscendConfig.from_config(GPTQ_CFG)
    fake = moe[0].__new__(moe[0])
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        cfg.get_quant_method(fake, "model.layers.0.mlp.experts")


# ---------------------------------------------------------------------------------------------------
# compat: every version branch
# ---------------------------------------------------------------------------------------------------


def test_parse_and_range():
    assert compat.parse_version("0.18.0rc1") == (0, 18, 0)
    assert compat.parse_version("0.32.0+cpu") == (0, 32, 0)
    assert compat.parse_version("v0.9") == (0, 9, 0)
    assert compat.parse_version("garbage") == (0, 0, 0)
    assert compat.check_vllm_version((0, 18, 0)) is None
    assert compat.check_vllm_version((0, 33, 2)) is None
    assert "outside" in compat.check_vllm_version((0, 17, 1))
    assert "outside" in compat.check_vllm_version((0, 34, 0))
    assert compat.check_vllm_version() is None  # the installed vllm-cpu
    assert not helpers.drops_g_idx_by_default((0, 18, 0))
    assert helpers.drops_g_idx_by_default((0, 30, 0))


def test_register_weight_loader_v2_with_and_without_the_decorator():
    class M:  # stand-in method class
        pass

    with_decorator = types.SimpleNamespace(WEIGHT_LOADER_V2_SUPPORTED=[])
    with_decorator.register_weight_loader_v2_supported_method = \
        lambda cls: with_decorator.WEIGHT_LOADER_V2_SUPPORTED.append(cls.__name__) or cls
    assert compat.register_weight_loader_v2(M, with_decorator) is M
    compat.register_weight_loader_v2(M, with_decorator)
    assert with_decorator.WEIGHT_LOADER_V2_SUPPORTED == ["M"]

    list_only = types.SimpleNamespace(WEIGHT_LOADER_V2_SUPPORTED=["UnquantizedLinearMethod"])
    compat.register_weight_loader_v2(M, list_only)
    compat.register_weight_loader_v2(M, list_only)
    assert list_only.WEIGHT_LOADER_V2_SUPPORTED == ["UnquantizedLinearMethod", "M"]

    with pytest.raises(RuntimeError, match="WEIGHT_LOADER_V2_SUPPORTED"):
        compat.register_weight_loader_v2(M, types.SimpleNamespace())


def test_register_quantization_config_idempotent_with_a_stand_in_module():
    calls = []
    mod = types.SimpleNamespace(QUANTIZATION_METHODS=["gptq"], _CUSTOMIZED_METHOD_TO_QUANT_CONFIG={})

    def register_quantization_config(name):
        def wrap(cls):
            calls.append(name)
            if name not in mod.QUANTIZATION_METHODS:
                mod.QUANTIZATION_METHODS.append(name)
            mod._CUSTOMIZED_METHOD_TO_QUANT_CONFIG[name] = cls
            return cls
        return wrap

    mod.register_quantization_config = register_quantization_config
    assert compat.register_quantization_config("gptq_ascend", GPTQAscendConfig, mod)
    assert not compat.register_quantization_config("gptq_ascend", GPTQAscendConfig, mod)
    assert calls == ["gptq_ascend"]


def test_mapper_apply_list_old_and_new():
    new = types.SimpleNamespace(apply_list=lambda names: [n.upper() for n in names])
    assert compat.mapper_apply_list(new, ["a"]) == ["A"]
    old = types.SimpleNamespace(_map_name=lambda n: None if n == "drop" else "x." + n)
    assert compat.mapper_apply_list(old, ["a", "drop"]) == ["x.a"]


def test_old_and_new_hook_signatures():
    seen = []

    class Cfg:
        def maybe_update_config(self, model_name, **kw):
            seen.append((model_name, kw))

    helpers.call_maybe_update_config(Cfg(), "m", hf_config="h", version=(0, 18, 0))
    helpers.call_maybe_update_config(Cfg(), "m", hf_config="h", version=(0, 32, 0))
    assert seen == [("m", {}), ("m", {"hf_config": "h", "revision": None})]
    # our override accepts the 0.18 positional form and the 0.20+ keyword form
    assert GPTQAscendConfig.override_quantization_method(GPTQ_CFG, "gptq_ascend") == "gptq_ascend"
    assert GPTQAscendConfig.override_quantization_method(GPTQ_CFG, "gptq_ascend", hf_config=None) == "gptq_ascend"


def test_tp_rank_outside_an_engine():
    assert compat.tp_rank_and_size() == (0, 1) or compat.tp_rank_and_size()[1] >= 1


# ---------------------------------------------------------------------------------------------------
# vLLM-Ascend quirks
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("", False), ("true", True), ("x", False)])
def test_env_flag(value, expected):
    assert compat.env_flag("X", {"X": value}) is expected


def test_matmul_allreduce_is_refused_on_npu_only():
    env = {compat.ASCEND_MATMUL_ALLREDUCE_ENV: "1"}
    with pytest.raises(ConfigError, match=compat.ASCEND_MATMUL_ALLREDUCE_ENV):
        compat.check_ascend_settings("npu", env)
    compat.check_ascend_settings("cpu", env)
    compat.check_ascend_settings("npu", {})


def test_expose_weight_replaces_parameter_and_is_not_a_parameter():
    layer = torch.nn.Linear(4, 4)
    packed = torch.zeros(2, 4, dtype=torch.int32)
    compat.expose_weight(layer, packed)
    assert layer.weight is packed
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in dict(layer.named_buffers())


# ---------------------------------------------------------------------------------------------------
# The vllm console-script shim
# ---------------------------------------------------------------------------------------------------


def test_version_lookup_patch():
    if not vllm_cpu_shim.vllm_metadata_missing():
        pytest.skip("the 'vllm' distribution metadata exists here: nothing to patch")
    assert vllm_cpu_shim.patch_version_lookup()
    assert vllm_cpu_shim.patch_version_lookup()  # idempotent
    assert md.version("vllm") == md.version("vllm-cpu") + "+cpu"
    with pytest.raises(md.PackageNotFoundError):
        md.version("surely-not-installed-dist")
    from vllm.platforms import vllm_version_matches_substr

    assert vllm_version_matches_substr("cpu")  # CPU platform detection unchanged


def test_install_shim(tmp_path):
    (tmp_path / "vllm").write_text("#!/usr/bin/python\nbroken\n")
    msg = vllm_cpu_shim.install_shim(tmp_path, force=True)
    assert "installed" in msg
    text = (tmp_path / "vllm").read_text()
    assert vllm_cpu_shim.SHIM_MARKER in text and "gptq_ascend.vllm_cpu_shim import main" in text
    assert (tmp_path / "vllm.orig").read_text().endswith("broken\n")
    assert "already" in vllm_cpu_shim.install_shim(tmp_path, force=True)


def test_install_shim_updates_a_shim_written_before_the_rename(tmp_path):
    import sys

    # Verbatim what --install-shim wrote while the module was gptq_ascend/serve.py.
    old = (f"#!{sys.executable}\n# gptq-ascend vllm shim: vllm-cpu's own script dies on "
           "importlib.metadata.version('vllm');\n# see gptq_ascend/serve.py. Re-installing vllm-cpu restores "
           "the original.\nimport sys\nfrom gptq_ascend.serve import main\n\nif __name__ == '__main__':\n"
           "    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n    sys.exit(main())\n")
    (tmp_path / "vllm").write_text(old)
    (tmp_path / "vllm.orig").write_text("#!/usr/bin/python\nvllm-cpu's own\n")
    assert "updated" in vllm_cpu_shim.install_shim(tmp_path, force=True)
    assert "from gptq_ascend.vllm_cpu_shim import main" in (tmp_path / "vllm").read_text()
    assert (tmp_path / "vllm.orig").read_text() == "#!/usr/bin/python\nvllm-cpu's own\n"  # not overwritten
    assert "already" in vllm_cpu_shim.install_shim(tmp_path, force=True)
    # Until it is updated, an old shim still finds its entry point under the old name.
    from gptq_ascend.serve import main as old_main

    assert old_main is vllm_cpu_shim.main


def test_installed_vllm_script_works():
    import subprocess
    import sys

    script = Path(sys.executable).parent / "vllm"
    if not script.exists():
        pytest.skip("no vllm script in this environment")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:] + "\n(run: python -m gptq_ascend.vllm_cpu_shim --install-shim)"
    assert out.stdout.strip().startswith(md.version("vllm-cpu") if vllm_cpu_shim.vllm_metadata_missing()
                                         else md.version("vllm"))
