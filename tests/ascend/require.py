"""Skip-or-fail for hardware tests: a missing NPU (or torch_npu, vLLM-Ascend, a kernel library) SKIPS with
the reason, and FAILS when ``GPTQ_ASCEND_REQUIRE_NPU=1`` (set by ``python -m gptq_ascend.validate``)."""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "GPTQ_ASCEND_REQUIRE_NPU"


def need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but: {why}")
        pytest.skip(why)
