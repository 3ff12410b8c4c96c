"""``GPTQConfig.present``: the one answer to "is this folder a GPTQ checkpoint?" (used by hf_model).

It must agree with ``GPTQConfig.load`` on every place load reads settings from, and say no for the
plain checkpoints GPTQModel quantized the fixtures from.
"""

from __future__ import annotations

import json
import shutil

import pytest

from gptq_ascend.errors import ConfigError
from gptq_ascend.format import QUANT_CONFIG_FILES, GPTQConfig

from .conftest import FIXTURES, gptq_fixture_dirs

SETTINGS = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}


@pytest.mark.parametrize("path", gptq_fixture_dirs(), ids=lambda p: p.name)
def test_gptqmodel_checkpoints_are_present(path):
    assert GPTQConfig.present(path)


@pytest.mark.parametrize("name", ["base-qwen3", "base-llama"])
def test_plain_checkpoints_are_not(name):
    if not (FIXTURES / name).exists():
        pytest.skip(f"no {name} fixture")
    assert not GPTQConfig.present(FIXTURES / name)
    with pytest.raises(ConfigError, match="not a GPTQ checkpoint"):
        GPTQConfig.load(FIXTURES / name)


@pytest.mark.parametrize("side_file", QUANT_CONFIG_FILES)
def test_settings_beside_a_plain_config_json(tmp_path, side_file):
    shutil.copy(FIXTURES / "base-qwen3" / "config.json", tmp_path / "config.json")
    assert not GPTQConfig.present(tmp_path)
    (tmp_path / side_file).write_text(json.dumps(SETTINGS))
    assert GPTQConfig.present(tmp_path)
    assert GPTQConfig.load(tmp_path).default.bits == 4


def test_settings_inside_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "quantization_config": SETTINGS}))
    assert GPTQConfig.present(tmp_path)
    assert GPTQConfig.load(tmp_path).default.group_size == 128


def test_malformed_config_json_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: malformed JSON"):
        GPTQConfig.present(tmp_path)
