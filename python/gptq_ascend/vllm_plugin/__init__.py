"""vLLM plugin: ``--quantization gptq_ascend`` for GPTQ checkpoints on CPU and Ascend NPU.

vLLM loads ``register`` through the ``vllm.general_plugins`` entry point (declared in setup.py) in
every process it starts (API server, engine core, workers), possibly several times in one process:
``register`` is idempotent.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.gptq_ascend")

NAME = "gptq_ascend"  # the --quantization value; here, not in config.py, so that it imports without vLLM
_registered = False


def register() -> None:
    """Register the ``gptq_ascend`` quantization method with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from . import compat
    from .config import GPTQAscendConfig
    from .linear import GPTQAscendLinearMethod  # noqa: F401  (registers the v2 weight loader)

    warning = compat.check_vllm_version()
    if warning:
        logger.warning(warning)
    if compat.register_quantization_config(NAME, GPTQAscendConfig):
        logger.debug("gptq_ascend: quantization method registered")
    _registered = True


__all__ = ["register", "NAME"]
