"""Implementations of the op contract in ``gptq_ascend.ops``.

Each module registers its backend on import; a backend whose dependencies are missing still
registers and reports why in ``available()``, so callers can log the reason.
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

BUILTIN = ("reference", "cpu", "npu", "npu_triton")


def load_all() -> None:
    for name in BUILTIN:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            logger.debug("backend module %s is not part of this install", name)
