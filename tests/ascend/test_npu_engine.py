"""The plugin inside vLLM-Ascend's engine, on an Ascend NPU: ``pytest -m npu tests/ascend/test_npu_engine.py``.

The same references as the CPU engine tests (tests/test_vllm_plugin_engine.py, whose helpers run the
engines and compare): GPTQModel's expected logits of every committed fixture (greedy tokens and top-K
log-probabilities through ``vllm.LLM(..., quantization="gptq_ascend")``), eager and graph mode; int8 and
int4, symmetric and asymmetric, act-order and a quantized lm_head are among the fixtures; the
offline-converted FP16 checkpoint against the online tokens; TP=2 against TP=1 where two NPUs are
visible; a ``vllm serve`` smoke.

Without an NPU and vLLM-Ascend every test SKIPS with what is missing (a skip is not a pass); with
``GPTQ_ASCEND_REQUIRE_NPU=1`` (what ``python -m gptq_ascend.validate`` sets) a missing piece FAILS. The
tolerances are first estimates for fp16 activations on the NPU (no hardware run has calibrated them):
the CPU tests' GPTQModel tolerances plus 0.05 for the NPU's fp16 accumulation order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptq_ascend.backends.ascend import device

from ..conftest import fixture_info, gptq_fixture_dirs
from .require import need

pytestmark = pytest.mark.npu

FIXTURES = {p.name: p for p in gptq_fixture_dirs()}
TOL_NPU = {"float16": 0.15, "bfloat16": 0.35}   # vs GPTQModel's logits, by the dtype GPTQModel ran in
TOL_OFFLINE = 0.05                               # online gptq_ascend vs the converted FP16 checkpoint
TOL_SAME = 0.02                                  # same weights, same dtype, another mode / TP layout
GRAPH_FIXTURES = ("qwen3-int8-g128-sym", "qwen3-int4-g32-descact")
CONVERT = ("qwen3-int8-g128-sym", "qwen3-int4-g32-descact")
ACT_ORDER = "qwen3-int4-g32-descact"
DTYPE = "float16"



@pytest.fixture(scope="module")
def engine():
    """The CPU engine tests' helpers, once an NPU and vLLM-Ascend are there."""
    ok, why = device.npu_status()
    need(ok, f"no NPU here: {why}")
    try:
        import vllm_ascend  # noqa: F401
    except Exception as e:
        need(False, f"vllm_ascend is not importable ({type(e).__name__}: {e})")
    need(bool(FIXTURES), "tests/fixtures has no GPTQModel-written checkpoints")
    from .. import test_vllm_plugin_engine as helpers

    return helpers


_cache: dict[tuple, dict] = {}


def run(engine, name: str, **kw) -> dict:
    key = (name, tuple(sorted(kw.items())))
    if key not in _cache:
        fixture = FIXTURES[name]
        _cache[key] = engine.run_engine(str(fixture), dtype=DTYPE, prompts=engine.prompts_of(fixture), **kw)
    return _cache[key]


def _tolerance(fixture: Path) -> float:
    computed_by = fixture_info(fixture)["expected"]["logits.safetensors"]["logits"].get("computed_by", "")
    return TOL_NPU["bfloat16" if "model dtype torch.bfloat16" in computed_by else "float16"]


MODES = [(n, "eager") for n in sorted(FIXTURES)] + [(n, "graph") for n in GRAPH_FIXTURES if n in FIXTURES]


@pytest.mark.parametrize(("name", "mode"), MODES, ids=[f"{n}-{m}" for n, m in MODES])
def test_fixture_matches_gptqmodel_on_vllm_ascend(engine, name, mode):
    fixture = FIXTURES[name]
    res = run(engine, name, enforce_eager=mode == "eager")
    stats = engine.compare_with_gptqmodel(fixture, res, _tolerance(fixture))
    print(f"\n{name} ({mode}, NPU): {stats}")
    assert stats["top1_checked"] >= 0.5 * (stats["top1_checked"] + stats["top1_near_ties_skipped"])
    layers = res["layers"][0]
    assert layers, "no gptq_ascend layer in the model (did vLLM-Ascend's linear classes bypass the plugin?)"
    assert sum(len(engine._shards(n)) for n, _ in layers) == len(fixture_info(fixture)["quantized_modules"])
    if mode == "graph":
        engine._agree(res, run(engine, name, enforce_eager=True), TOL_SAME, f"{name}: graph vs eager on the NPU")


@pytest.mark.parametrize("name", CONVERT)
def test_offline_fp16_equals_online_on_vllm_ascend(engine, name, tmp_path):
    if name not in FIXTURES:
        pytest.skip(f"fixture {name} missing")
    fixture = FIXTURES[name]
    dst = tmp_path / "converted"
    out = subprocess.run([sys.executable, "-m", "gptq_ascend", "convert", str(fixture), str(dst), "--dtype",
                          "float16", "--no-progress"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    offline = engine.run_engine(str(dst), quantization=None, dtype=DTYPE, prompts=engine.prompts_of(fixture),
                                prompt_logprobs=False, report=False)
    engine._agree(run(engine, name), offline, TOL_OFFLINE, f"{name}: online gptq_ascend vs offline FP16 (NPU)")


def test_tensor_parallel_2_equals_tp1_on_vllm_ascend(engine):
    if device.npu_count() < 2:
        pytest.skip(f"TP=2 needs two NPUs; {device.npu_count()} visible")
    if ACT_ORDER not in FIXTURES:
        pytest.skip(f"fixture {ACT_ORDER} missing")
    fixture = FIXTURES[ACT_ORDER]
    tp2 = engine.run_engine(str(fixture), dtype=DTYPE, prompts=engine.prompts_of(fixture), prompt_logprobs=False,
                            tensor_parallel_size=2, distributed_executor_backend="mp")
    engine._agree(tp2, run(engine, ACT_ORDER), TOL_SAME, "TP=2 vs TP=1 on the NPU")
    assert len(tp2["layers"]) == 2


def test_vllm_serve_smoke_on_vllm_ascend(engine, tmp_path):
    """``vllm serve FIXTURE --quantization gptq_ascend --enforce-eager`` (the original deployment's
    command, TP 1): /v1/completions with the fixture's token prompts at batch 1 equals vllm.LLM's greedy
    tokens; one chat completion answers."""
    requests = pytest.importorskip("requests")
    from gptq_ascend.server_process import VllmServer

    name = "qwen3-int8-g128-sym" if "qwen3-int8-g128-sym" in FIXTURES else sorted(FIXTURES)[0]
    fixture = FIXTURES[name]
    args = ["--quantization", "gptq_ascend", "--enforce-eager", "--tensor-parallel-size", "1", "--dtype", DTYPE,
            "--max-model-len", "256", "--served-model-name", "fixture"]
    with VllmServer(fixture, args, tmp_path / "serve.log", startup_timeout=900) as srv:
        srv.wait_ready()
        expected = run(engine, name)["tokens"]
        for prompt, tokens in zip(engine.prompts_of(fixture), expected, strict=True):
            body = {"model": "fixture", "prompt": prompt, "max_tokens": len(tokens), "temperature": 0.0,
                    "ignore_eos": True, "return_tokens_as_token_ids": True, "logprobs": 1}
            r = requests.post(srv.url + "/v1/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            got = [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]
            assert got == tokens
        r = requests.post(srv.url + "/v1/chat/completions", timeout=300,
                          json={"model": "fixture", "messages": [{"role": "user", "content": "hello"}],
                                "max_tokens": 8, "temperature": 0.0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None, r.text
