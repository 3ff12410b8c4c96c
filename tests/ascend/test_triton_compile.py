"""Compile the Triton dequant kernel for Ascend 910B with triton-ascend + ascendnpu-ir, without CANN.

Every stage runs for real up to hivmc (CANN-only). A configuration passes when the only error is
"External hivmc run fails" and the compiler did not have to give up multi-buffering for lack of UB. This
is a compile check, not a hardware result: nothing here runs on an NPU.
"""

from __future__ import annotations

import re

import pytest
import torch

from gptq_ascend.backends.ascend import tiling

from . import toolchain

pytestmark = pytest.mark.ascend_toolchain

ARCH = "Ascend910B3"
# (K, N, bits, group_size, out dtype): the constexpr combinations real layers produce.
CONFIGS = [
    (2048, 2048, 8, 128, torch.float16),     # Qwen int8 g128
    (2048, 2048, 8, 128, torch.bfloat16),
    (2048, 6144, 4, 128, torch.float16),     # Qwen int4 g128
    (2048, 6144, 4, 128, torch.bfloat16),
    (2048, 2048, 4, -1, torch.bfloat16),     # per-channel int4
    (256, 48, 8, 32, torch.float16),         # small N: narrow tile, tail columns
]


def _compile(k, n, bits, group, dtype, ub, tmp_path):
    plan = tiling.plan_tiling(k, n, bits, group, 2, tiling.VECTOR_CORES_910B3, ub)
    return plan, toolchain.compile_dequant_kernel(k, n, bits, group, str(dtype)[6:], ub, ARCH, tmp_path)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}-int{c[2]}-g{c[3]}-{str(c[4])[6:]}")
def test_triton_dequant_compiles_for_ascend910b_up_to_hivmc(config, tmp_path):
    toolchain.require()
    plan, result = _compile(*config, tiling.TRITON_UB_BYTES, tmp_path)
    if result.compiled:   # a machine with CANN's hivmc on PATH: the whole pipeline ran
        return
    errors = [line for line in result.log.splitlines() if re.search(r"\berror\b", line, re.I)]
    assert result.stopped_at_hivmc, f"{plan}\n{result.log[-3000:]}"
    # Allowed: the missing hivmc itself, and the pipeline's closing summary line.
    assert all("hivmc" in line or "Failed to run BiShengIR pipeline" in line for line in errors), \
        f"{plan}: errors before hivmc:\n" + "\n".join(errors)
    assert "Ub overflow" not in result.log and "ub overflow" not in result.log, \
        f"{plan}: the tile does not fit the UB with multi-buffering:\n{result.log[-2000:]}"


def test_oversized_tile_is_rejected_before_hivmc(tmp_path):
    """Negative control: the AscendC kernel's full 192 KB plan (16 x 512) is too big for the Triton
    kernel's extra buffers with bf16 output; the checker must see that as a real error, not as hivmc."""
    toolchain.require()
    plan, result = _compile(2048, 2048, 8, 128, torch.bfloat16, tiling.UB_BYTES_A2, tmp_path)
    assert plan.tile_rows == 16 and plan.tile_cols == 512
    assert not result.compiled and not result.stopped_at_hivmc, result.log[-2000:]
    assert "ub overflow" in result.log, result.log[-2000:]
