"""`gptq-ascend verify` against the unquantized base model the fixtures were quantized from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptq_ascend.convert import convert

from .conftest import FIXTURES

INT8 = FIXTURES / "qwen3-int8-g128-sym"
BASE = FIXTURES / "base-qwen3"
pytestmark = pytest.mark.skipif(not (INT8.exists() and BASE.exists()),
                                reason="needs the GPTQModel fixtures qwen3-int8-g128-sym and base-qwen3")


def int8_view_dequant(t, spec, k, dtype):
    """The earlier deployment's converter: bytes read as int8, zero point ignored."""
    g = t.g_idx.long()
    return (t.qweight.t().contiguous().view(torch.int8).float() * t.scales.float()[g].t()).to(dtype)


def run_verify(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "gptq_ascend", "verify", *map(str, args)],
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def test_gptq_online_and_converted_pass_against_the_base(tmp_path):
    rc, out = run_verify(BASE, INT8, "--json", tmp_path / "online.json")
    assert rc == 0, out
    assert "PASS" in out and "top-1 agreement" in out and "perplexity" in out
    converted = tmp_path / "fp16"
    convert(INT8, converted)
    rc, out = run_verify(INT8, converted)
    assert rc == 0, out


def test_the_int8_view_conversion_fails_with_the_explosion_visible(tmp_path):
    wrong = tmp_path / "wrong"
    convert(INT8, wrong, dequant_fn=int8_view_dequant)
    rc, out = run_verify(BASE, wrong)
    assert rc == 2, out
    assert "FAIL" in out
    assert "<-- grows" in out and "hidden-state norms diverge" in out
    assert "top-1 agreement" in out


def test_verify_help():
    rc, out = run_verify("--help")
    assert rc == 0 and "--max-kl" in out and "--min-top1" in out and Path(BASE).exists()


DEMO = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.skipif(not (DEMO / "qwen3-pydoc-gptq-int8").exists(), reason="demo model not in this checkout")
def test_demo_model_online_is_within_one_percent_perplexity_of_the_original():
    rc, out = run_verify(DEMO / "qwen3-pydoc", DEMO / "qwen3-pydoc-gptq-int8", "--max-chunks", "12",
                         "--max-ppl-ratio", "1.01", "--min-top1", "0.97")
    assert rc == 0, out
