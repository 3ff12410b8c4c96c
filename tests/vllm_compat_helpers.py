"""Test-side adapters for the vLLM hooks whose signatures changed (see gptq_ascend/vllm_plugin/compat.py).

vLLM calls the plugin's hooks; the plugin never calls them itself, so only the tests need to call them
the way each vLLM version does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gptq_ascend.vllm_plugin.compat import vllm_version


def drops_g_idx_by_default(version: tuple[int, int, int] | None = None) -> bool:
    """vLLM >= 0.30's QuantizationConfig.get_checkpoint_weight_mapper drops every ``.g_idx``."""
    return (version or vllm_version())[:2] >= (0, 30)


def call_override(method: Callable, hf_quant_cfg: dict, user_quant: str | None, hf_config: Any = None,
                  version: tuple[int, int, int] | None = None) -> Any:
    """Call ``override_quantization_method`` the way vLLM ``version`` does."""
    if (version or vllm_version())[:2] < (0, 20):
        return method(hf_quant_cfg, user_quant)
    return method(hf_quant_cfg, user_quant, hf_config=hf_config)


def call_maybe_update_config(cfg: Any, model_name: str, hf_config: Any = None, revision: Any = None,
                             version: tuple[int, int, int] | None = None) -> Any:
    """Call ``maybe_update_config`` the way vLLM ``version`` does."""
    if (version or vllm_version())[:2] < (0, 20):
        return cfg.maybe_update_config(model_name)
    return cfg.maybe_update_config(model_name, hf_config=hf_config, revision=revision)
