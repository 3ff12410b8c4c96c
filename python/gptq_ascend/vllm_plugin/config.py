"""The vLLM quantization config ``gptq_ascend``: GPTQ checkpoints, read by ``gptq_ascend.format``.

Selected only when the user asks for it (``--quantization gptq_ascend``); plain GPTQ loading in vLLM
is untouched wherever the plugin is installed. Everything that can be refused is refused here, while
vLLM builds its config and the model, before any weight is read.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from ..errors import ConfigError
from ..format import GPTQConfig, QuantSpec
from . import NAME, compat

logger = logging.getLogger("vllm.gptq_ascend")

# Fields gptq_ascend refuses although format.GPTQConfig would read past them: they change the layout.
_LAYOUT_FLAGS = ("is_marlin_format",)


def check_plugin_fields(cfg: dict, source: str) -> None:
    """Refusals on top of GPTQConfig.from_dict, for fields that it files under 'ignored'."""
    for name in _LAYOUT_FLAGS:
        if cfg.get(name):
            raise ConfigError(f"{source}: field {name!r} is {cfg[name]!r}: Marlin-repacked tensors are not "
                              "the GPTQ layout gptq_ascend reads; use the original GPTQ checkpoint")


class GPTQAscendConfig(QuantizationConfig):
    """``--quantization gptq_ascend``."""

    def __init__(self, gptq: GPTQConfig | None = None, full_config: dict | None = None) -> None:
        super().__init__()
        self.gptq = gptq
        self.full_config = dict(full_config or {})
        self.tie_word_embeddings = False
        self.device = compat.device_type()

    def __repr__(self) -> str:
        return f"GPTQAscendConfig({self.gptq!r})"

    # ---- the abstract interface ----------------------------------------------------------------

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return compat.supported_act_dtypes(compat.device_type())

    @classmethod
    def get_min_capability(cls) -> int:
        # Only consulted on CUDA/ROCm; the reference backend runs anywhere torch does.
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Empty on purpose: when config.json has no quantization_config, vLLM then builds the config
        # with no arguments and calls maybe_update_config(model_path), where GPTQConfig.load finds
        # quantize_config.json or says plainly that the model is not a GPTQ checkpoint.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQAscendConfig:
        source = "gptq_ascend: config.json [quantization_config]"
        check_plugin_fields(config, source)
        gptq = GPTQConfig.from_dict(config, source=source)
        compat.check_ascend_settings(compat.device_type())
        return cls(gptq, config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        """Claim a GPTQ checkpoint only when the user asked for gptq_ascend.

        Returning "gptq_ascend" for ``user_quant is None`` would hijack plain GPTQ loading wherever this
        plugin is installed. A non-GPTQ quant_method with ``--quantization gptq_ascend`` is left to vLLM,
        which says the two methods do not match.
        """
        if user_quant != NAME or not isinstance(hf_quant_cfg, dict):
            return None
        method = str(hf_quant_cfg.get("quant_method", "")).lower()
        if method in ("gptq", NAME):
            return NAME
        return None

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: Any = None) -> None:
        if hf_config is not None:
            text = getattr(hf_config, "get_text_config", lambda: hf_config)()
            self.tie_word_embeddings = bool(getattr(text, "tie_word_embeddings", False))
        if self.gptq is not None:
            return
        path = Path(model_name)
        if not path.is_dir():
            raise ConfigError(
                f"gptq_ascend: {model_name!r} has no quantization_config in its config.json and is not a "
                "local folder where quantize_config.json could be read: is it a GPTQ checkpoint?")
        self.gptq = GPTQConfig.load(path)
        check_plugin_fields(dict(self.gptq.raw), self.gptq.source)
        self.full_config = dict(self.gptq.raw)
        compat.check_ascend_settings(self.device)

    def get_checkpoint_weight_mapper(self):
        # vLLM >= 0.30's default drops every ``.g_idx`` tensor; act-order checkpoints need it.
        return compat.empty_weights_mapper()

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Rename the module lists of the config the way the model renames its modules."""
        if self.gptq is None:
            return
        changes = {}
        if self.gptq.modules_in_block_to_quantize:
            changes["modules_in_block_to_quantize"] = tuple(
                compat.mapper_apply_list(hf_to_vllm_mapper, list(self.gptq.modules_in_block_to_quantize)))
        if self.gptq.modules_to_not_convert:
            changes["modules_to_not_convert"] = tuple(
                compat.mapper_apply_list(hf_to_vllm_mapper, list(self.gptq.modules_to_not_convert)))
        if changes:
            self.gptq = replace(self.gptq, **changes)

    # ---- per-layer decisions -------------------------------------------------------------------

    def _require_config(self) -> GPTQConfig:
        if self.gptq is None:
            raise ConfigError("gptq_ascend: the quantization config was never read (maybe_update_config was "
                              "not called with the model path)")
        return self.gptq

    def shard_names(self, prefix: str) -> list[str]:
        """The checkpoint module names behind ``prefix`` (q/k/v for qkv_proj, gate/up for gate_up_proj)."""
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf) if self.packed_modules_mapping else None
        if not shards:
            return [prefix]
        return [f"{parent}.{s}" if parent else s for s in shards]

    def spec_for_layer(self, prefix: str) -> QuantSpec | None:
        """The one QuantSpec every shard of ``prefix`` shares, or None when none is quantized."""
        gptq = self._require_config()
        names = self.shard_names(prefix)
        specs = {name: gptq.spec_for(name) for name in names}
        distinct = set(specs.values())
        if len(distinct) > 1:
            detail = "; ".join(f"{n}: {self._describe(s)}" for n, s in specs.items())
            raise ConfigError(
                f"gptq_ascend: {prefix} fuses modules with different quantization settings ({detail}). vLLM "
                "runs them as one matrix, so they must share bits, group_size, sym and desc_act (and be "
                "all quantized or all left in float); check the checkpoint's 'dynamic' rules and "
                "'modules_in_block_to_quantize'")
        return distinct.pop()

    @staticmethod
    def _describe(spec: QuantSpec | None) -> str:
        if spec is None:
            return "not quantized"
        return (f"bits={spec.bits} group_size={spec.group_size} sym={spec.sym} desc_act={spec.desc_act}")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from .linear import GPTQAscendLinearMethod

        if isinstance(layer, ParallelLMHead):
            gptq = self._require_config()
            spec = self.spec_for_layer(prefix) if gptq.lm_head else None
            if spec is None:  # a dense lm_head: vLLM's own method, or on CPU ours (lm_head.py decides)
                from .lm_head import lm_head_method

                return lm_head_method() if compat.device_type() == "cpu" else None
            return GPTQAscendLinearMethod(self, spec, prefix, lm_head=True)
        if isinstance(layer, LinearBase):
            spec = self.spec_for_layer(prefix)
            if spec is None:
                return UnquantizedLinearMethod()
            return GPTQAscendLinearMethod(self, spec, prefix)
        moe = compat.moe_layer_types()
        if moe and isinstance(layer, moe):
            if self.spec_for_layer(prefix) is not None:
                raise ConfigError(
                    f"gptq_ascend: {prefix} is a fused mixture-of-experts layer; quantized MoE experts are "
                    "not supported yet. Exclude them with a '-:' dynamic rule or use a dense model")
            return None
        return None
