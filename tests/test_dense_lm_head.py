"""The dense lm_head routing (vllm_plugin/lm_head.py, GPTQ_ASCEND_LM_HEAD) with real vLLM.

* ``compat.cpu_dense_gemm_path`` reads back the choice of vLLM's own CPU dispatch
  (``dispatch_cpu_unquantized_gemm``, run here on real layers), checked against what this CPU allows:
  sgl-kernel only with AMX tiles and a weight <= 1 MiB, oneDNN when its matmul primitive can be created for
  the weight (tried here directly), else the ``F.linear`` fallback.
* The mode variable and the old ``GPTQ_ASCEND_LM_HEAD_INT8`` switch.
* A real engine on a tiny GPTQModel fixture, bf16 and fp32 activations: with ``GPTQ_ASCEND_LM_HEAD=ours``
  (our GEMV on the tied BF16 lm_head; in fp32, on a BF16 copy of vLLM's widened float32 head) the greedy
  tokens and their logprobs match ``GPTQ_ASCEND_LM_HEAD=vllm`` (vLLM's own dense lm_head) within bf16
  rounding of the logits, and the engine reports that our GEMV was chosen.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from gptq_ascend.errors import ConfigError  # noqa: E402
from gptq_ascend.vllm_plugin import compat  # noqa: E402
from gptq_ascend.vllm_plugin.lm_head import (  # noqa: E402
    DENSE_MAX_M,
    DENSE_MAX_M_ONEDNN,
    LM_HEAD_ENV,
    LM_HEAD_INT8_ENV,
    DenseLMHeadMethod,
    lm_head_mode,
)

from .test_cpu_kernel import ISAS  # noqa: E402

cpu_mod = pytest.importorskip("gptq_ascend.backends.cpu")
_DENSE_OK, _DENSE_WHY = cpu_mod.dense_gemm_available()
needs_dense = pytest.mark.skipif(not _DENSE_OK, reason=str(_DENSE_WHY))
TIERS = [t for t in ("avx512vbmi", "avx512", "avx2") if t in ISAS]  # the SIMD tiers this CPU can select


@pytest.fixture
def on_tier(tier):
    """The kernel tier ``tier`` (the test's parameter) for the test's duration; the start-up settings after."""
    cpu_mod.kernel_config(tier)
    yield tier
    cpu_mod.kernel_config("reset")


# ---------------------------------------------------------------------------------------------------
# What vLLM's dispatch chose
# ---------------------------------------------------------------------------------------------------


def _layer(n: int, k: int, dtype=torch.bfloat16) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(n, k, generator=torch.Generator().manual_seed(0)).to(dtype),
                                      requires_grad=False)
    return layer


def _onednn_builds(w: torch.Tensor) -> bool:
    from vllm import _custom_ops as ops

    if not ops._supports_onednn:
        return False
    try:
        ops.create_onednn_mm(w.t(), 32)
        return True
    except RuntimeError:
        return False


def _zentorch() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_zen_cpu() and hasattr(torch.ops, "zentorch")
                and hasattr(torch.ops.zentorch, "zentorch_linear_unary"))


@pytest.mark.parametrize("n,k", ((1024, 1024), (256, 128)), ids=("2MiB", "64KiB"))
def test_vllm_dispatch_is_read_back(n, k):
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = _layer(n, k)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    assert compat.cpu_dense_gemm_path(layer) == _expected_vllm_path(layer)
    x = torch.randn(3, k).to(torch.bfloat16)  # and the closure read back is the one that computes
    y = layer.cpu_linear(x, layer.weight, None)
    ref = x.double() @ layer.weight.double().t()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


def test_path_of_layers_without_vllm_dispatch():
    layer = _layer(4, 4)
    assert compat.cpu_dense_gemm_path(layer) == "none"
    layer.cpu_linear = torch.nn.functional.linear
    assert compat.cpu_dense_gemm_path(layer) == "torch"
    layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)
    assert compat.cpu_dense_gemm_path(layer) == "torch"
    layer.cpu_linear = lambda x, weight, bias: x
    assert compat.cpu_dense_gemm_path(layer) == "unknown"


def test_lm_head_mode_variables():
    assert lm_head_mode({}) == "auto"
    assert lm_head_mode({LM_HEAD_INT8_ENV: "1"}) == "int8"
    assert lm_head_mode({LM_HEAD_INT8_ENV: "0"}) == "auto"
    for m in ("auto", "ours", "vllm", "int8"):
        assert lm_head_mode({LM_HEAD_ENV: m.upper(), LM_HEAD_INT8_ENV: "1"}) == m  # the new variable wins
    with pytest.raises(ConfigError, match=f"{LM_HEAD_ENV}='fast' is not one of auto, ours, vllm, int8"):
        lm_head_mode({LM_HEAD_ENV: "fast"})


def _expected_vllm_path(layer: torch.nn.Module) -> str:
    n, k = layer.weight.shape
    small = n * k * layer.weight.element_size() <= 1 << 20 and k % 32 == 0 and n % 16 == 0
    if _zentorch():
        return "zentorch"
    if small and torch.cpu._is_amx_tile_supported() and layer.weight.dtype == torch.bfloat16:
        return "sgl"
    return "onednn" if _onednn_builds(layer.weight) else "torch"


@needs_dense
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("mode", ("auto", "ours"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=("bf16", "fp16", "fp32"))
def test_lm_head_method_decision(on_tier, tier, mode, dtype, caplog):
    """DenseLMHeadMethod on a real layer after vLLM's real dispatch: the choice follows the rules of
    lm_head.py from what vLLM chose and the tier, apply() computes with the chosen path, and the
    choice is logged."""
    layer = _layer(1024, 1024, dtype)
    qm = DenseLMHeadMethod(mode)
    with caplog.at_level("INFO", logger="vllm.gptq_ascend"):
        qm.process_weights_after_loading(layer)
    vpath = _expected_vllm_path(layer)
    assert compat.cpu_dense_gemm_path(layer) == vpath
    bf16_dot = tier == "avx512vbmi"  # the only one of these tiers with vdpbf16ps
    if dtype == torch.float32:  # randn values: neither BF16 nor FP16 numbers, so no 16-bit copy
        want = (False, None)
    elif mode == "ours" or vpath == "torch":
        want = (True, DENSE_MAX_M)
    elif vpath == "onednn" and bf16_dot and dtype == torch.bfloat16:  # measured for BF16 only
        want = (True, DENSE_MAX_M_ONEDNN)
    else:
        want = (False, None)
    assert (qm.ours, qm.max_m if qm.ours else None) == want
    assert any("gptq_ascend: lm_head 1024 x 1024" in r.getMessage() for r in caplog.records)
    gen = torch.Generator().manual_seed(4)
    for m in (1, DENSE_MAX_M_ONEDNN, DENSE_MAX_M_ONEDNN + 1, DENSE_MAX_M + 1):
        x = torch.randn(m, 1024, generator=gen).to(dtype)
        y = qm.apply(layer, x)
        if qm.ours and m <= qm.max_m:
            assert torch.equal(y, torch.ops.gptq_ascend.cpu_dense_gemm(x, layer.weight, None))
        else:
            assert torch.equal(y, layer.cpu_linear(x, layer.weight, None))


@needs_dense
@pytest.mark.parametrize("src", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
@pytest.mark.parametrize("tier", TIERS)
def test_fp32_weight_of_16bit_values_runs_a_16bit_copy(on_tier, src, caplog):
    """With float32 activations vLLM widens a BF16 or FP16 checkpoint's lm_head to float32. When every
    value is a BF16 (else an FP16) number, ours runs a copy in that format (the same weights, half the
    bytes): its result equals the op on that copy, matches float64 math on the float32 weight, and one
    value off both grids turns it off. The FP16 weights drawn here are not all BF16 numbers."""
    layer = _layer(2048, 512, src)
    w32 = layer.weight.data.float()
    assert src == torch.bfloat16 or not torch.equal(w32.to(torch.bfloat16).float(), w32)
    layer.weight = torch.nn.Parameter(w32, requires_grad=False)
    qm = DenseLMHeadMethod("auto")
    with caplog.at_level("INFO", logger="vllm.gptq_ascend"):
        qm.process_weights_after_loading(layer)
    vpath = compat.cpu_dense_gemm_path(layer)
    assert qm.ours and qm.max_m == (DENSE_MAX_M if vpath == "torch" else DENSE_MAX_M_ONEDNN), (vpath, qm.max_m)
    assert qm.w16 is not None and qm.w16.dtype == src and torch.equal(qm.w16.float(), w32)
    name = "BF16" if src == torch.bfloat16 else "FP16"
    assert any(f"reads a {name} copy" in r.getMessage() for r in caplog.records)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(qm.max_m, 512, generator=gen)
    y = qm.apply(layer, x)
    assert y.dtype == torch.float32
    assert torch.equal(y, torch.ops.gptq_ascend.cpu_dense_gemm(x, qm.w16, None))
    ref = x.double() @ w32.double().t()
    assert float((y.double() - ref).abs().max() / ref.abs().max()) <= 2**-20
    # One weight off both grids: no copy, vLLM's own path on the float32 weight.
    w_off = w32.clone()
    w_off[7, 3] = float(w_off[7, 3]) + 2.0 ** -20 * (1 + abs(float(w_off[7, 3])))
    layer.weight = torch.nn.Parameter(w_off, requires_grad=False)
    qm2 = DenseLMHeadMethod("auto")
    qm2.process_weights_after_loading(layer)
    assert qm2.w16 is None and not qm2.ours


@needs_dense
def test_dense_gemm_matches_vllm_fallback_numerics():
    """Our op vs torch's F.linear (the fallback it replaces) at the lm_head's M range: both are
    correct GEMMs, so they agree to the rounding of the bf16 output."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3000, 256, generator=gen).to(torch.bfloat16)
    for m in (1, 4, DENSE_MAX_M):
        x = torch.randn(m, 256, generator=gen).to(torch.bfloat16)
        ours = cpu_mod.dense_gemm(x, w).double()
        ref = x.double() @ w.double().t()
        theirs = torch.nn.functional.linear(x, w).double()
        scale = ref.abs().max()
        assert float((ours - ref).abs().max() / scale) <= 2**-8
        assert float((ours - theirs).abs().max() / scale) <= 2**-7


# ---------------------------------------------------------------------------------------------------
# A real engine
# ---------------------------------------------------------------------------------------------------

FIXTURE = "qwen3-int8-g128-sym"


def _lm_head_state(model) -> dict:
    """Runs inside the worker: the lm_head's method, what it chose, and the vLLM path behind it."""
    head = model.lm_head
    qm = head.quant_method
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, head.weight.shape[1], generator=gen).to(head.weight.dtype)
    big = torch.randn(DENSE_MAX_M + 1, head.weight.shape[1], generator=gen).to(head.weight.dtype)
    w16 = getattr(qm, "w16", None)
    w_ours = head.weight if w16 is None else w16  # what our op would read (vLLM's mode: fp32, not ours)
    return {"method": type(qm).__name__, "ours": bool(getattr(qm, "ours", False)), "w16": w16 is not None,
            # what the logits processor's call computes: our op's bits at M = 3, vLLM's own above DENSE_MAX_M
            "apply_small_is_ours": w_ours.dtype in (torch.bfloat16, torch.float16) and torch.equal(
                qm.apply(head, h), torch.ops.gptq_ascend.cpu_dense_gemm(h, w_ours)),
            "apply_big_is_vllm": torch.equal(qm.apply(head, big), head.cpu_linear(big, head.weight, None)),
            "vllm_path": compat.cpu_dense_gemm_path(head), "dtype": str(head.weight.dtype),
            "w16_dtype": None if w16 is None else str(w16.dtype),
            "tied": head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()}


def _run(fixture, prompts: list[list[int]], dtype: str = "bfloat16") -> dict:
    from vllm import LLM, SamplingParams

    from .test_vllm_plugin_engine import TOP_K, shutdown

    llm = LLM(model=str(fixture), quantization="gptq_ascend", dtype=dtype, enforce_eager=True,
              max_model_len=256, seed=0, gpu_memory_utilization=0.5)
    try:
        sp = SamplingParams(max_tokens=12, temperature=0.0, logprobs=TOP_K, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        res = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
               "lps": [[{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs] for o in outs],
               "state": llm.apply_model(_lm_head_state)[0]}
        return res
    finally:
        shutdown(llm)


FIXTURE_FP16 = "llama-int8-g64-asym"  # an FP16 checkpoint with an untied lm_head


@pytest.mark.engine
@needs_dense
@pytest.mark.parametrize(("fixture_name", "dtype"), ((FIXTURE, "bfloat16"), (FIXTURE, "float32"),
                                                     (FIXTURE_FP16, "float32")),
                         ids=("bf16-bfloat16", "bf16-float32", "fp16-float32"))
def test_engine_ours_equals_vllm_dense_lm_head(monkeypatch, record_property, fixture_name, dtype):
    """bfloat16: our GEMV on the tied BF16 head. float32: vLLM widens the fixture's head to float32
    (every value still a BF16 number for the Qwen3 fixture, an FP16 number for the FP16 Llama one), so
    ours runs a copy in that format: same tokens, same logprobs."""
    from .test_vllm_plugin_engine import BY_NAME, ENV, TOL_BF16, prompts_of

    if fixture_name not in BY_NAME:
        pytest.skip(f"fixture {fixture_name} missing")
    import vllm.envs

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    fixture = BY_NAME[fixture_name]
    cfg = json.loads((fixture / "config.json").read_text())
    src = {"bfloat16": "torch.bfloat16", "float16": "torch.float16"}[cfg.get("torch_dtype") or cfg["dtype"]]
    prompts = prompts_of(fixture)
    runs = {}
    for mode in ("vllm", "ours"):
        monkeypatch.setenv(LM_HEAD_ENV, mode)
        if hasattr(vllm.envs, "disable_envs_cache"):
            vllm.envs.disable_envs_cache()
        runs[mode] = _run(fixture, prompts, dtype)
    theirs, ours = runs["vllm"], runs["ours"]
    assert theirs["state"]["method"] == "UnquantizedEmbeddingMethod" and not theirs["state"]["ours"]
    assert ours["state"]["method"] == "DenseLMHeadMethod", ours["state"]
    assert ours["state"]["dtype"] == f"torch.{dtype}", ours["state"]
    assert ours["state"]["tied"] == cfg.get("tie_word_embeddings", False), ours["state"]
    assert ours["state"]["ours"] and ours["state"]["w16"] == (dtype == "float32"), ours["state"]
    assert ours["state"]["w16_dtype"] == (src if dtype == "float32" else None), ours["state"]
    assert ours["state"]["apply_small_is_ours"] and ours["state"]["apply_big_is_vllm"], ours["state"]
    # Same hidden states; the two lm_heads differ only in summation order, i.e. by about one bf16 rounding of
    # each logit. Greedy tokens must agree except where vLLM's own top-2 logprobs are that close (a near-tie
    # that either rounding may break); after such a step the continuations may part, so the prompt ends there.
    tol = TOL_BF16
    compared, worst = 0, 0.0
    for p, (ta, tb) in enumerate(zip(ours["tokens"], theirs["tokens"], strict=True)):
        for i, (a, b) in enumerate(zip(ta, tb, strict=True)):
            da, db = ours["lps"][p][i], theirs["lps"][p][i]
            if a != b:
                top2 = sorted(db.values(), reverse=True)[:2]
                assert top2[0] - top2[1] <= tol, (f"prompt {p} step {i}: token {a} vs vLLM's {b} although vLLM's "
                                                  f"top-2 margin is {top2[0] - top2[1]:.3f}")
                break
            assert abs(da[a] - db[b]) <= tol, f"prompt {p} step {i}: logprob {da[a]:.4f} vs vLLM's {db[b]:.4f}"
            worst = max(worst, abs(da[a] - db[b]))
            compared += 1
    record_property("max_abs_logprob_diff", worst)
    record_property("greedy_steps_compared", compared)
    print(f"ours vs vLLM dense lm_head: {compared} greedy steps agree, max |logprob diff| {worst:.4g}")
    assert compared >= len(prompts) * 12 // 2, f"only {compared} greedy steps agreed"
