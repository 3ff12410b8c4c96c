#!/usr/bin/env python
"""Quantize the demo model (``models/qwen3-pydoc``) to GPTQ-Int8 with GPTQModel.

Settings are those of Qwen3-1.7B-GPTQ-Int8: bits 8, group_size 128, sym True, desc_act False,
lm_head not quantized, checkpoint format "gptq" (v1: stored zero point = 128 - 1 = 127).

GPTQModel is never part of the project's default install or CI. It lives in its own venv
(pip must keep torch <= 2.14.1 on this machine; gptqmodel pulls a CUDA torch 2.14.1 build,
~6 GB, which runs fine on CPU)::

    python3.11 -m venv /work/venvs/gptqmodel
    /work/venvs/gptqmodel/bin/pip install torch==2.13.0
    /work/venvs/gptqmodel/bin/pip install gptqmodel==7.7.0 --no-build-isolation

then, from the repository root (after ``tools/train_demo_model.py``)::

    /work/venvs/gptqmodel/bin/python tools/quantize_demo_model.py \\
        --base models/qwen3-pydoc --out models/qwen3-pydoc-gptq-int8

The script sets ``GPTQMODEL_CPU_WORKERS=2`` and ``CUDA_VISIBLE_DEVICES=`` (empty) itself,
before importing gptqmodel.

What it does
============
1. Calibration: ``--calib-samples`` windows of ``--calib-len`` tokens spread evenly over the
   TRAINING text only (the training topics of ``tools/train_demo_model.py``, its split and its
   ChatML Q/A conversations, encoded with the base model's saved tokenizer), passed as a list of
   ``{"input_ids", "attention_mask"}`` dicts (GPTQModel refuses a BatchEncoding).
2. ``GPTQModel.load(base, quantize_config=QuantizeConfig(bits=8, group_size=128, sym=True,
   desc_act=False, format="gptq", lm_head=False, device="cpu"), backend=BACKEND.TORCH)``,
   ``model.quantize(calib, batch_size=1, backend=BACKEND.TORCH, calibration_data_min_length=1)``,
   ``model.save(tmp)``; only the files needed to load are copied to ``--out`` (config.json,
   quantize_config.json, model.safetensors) plus the base's tokenizer files and
   generation_config.json (written by the project venv's transformers, which vLLM reads).
3. Check: the float16 base, loaded by transformers and run in float32, is the reference. It is
   compared on the held-out text (``<base>/heldout.json``, the same text as heldout.txt, in
   windows of ``--calib-len`` tokens; perplexity, top-1 agreement, mean KL(base || int8)) and on
   greedy continuations with:
   - ``gptqmodel_fp16`` / ``gptqmodel_bf16``: ``GPTQModel.load(out, backend=BACKEND.TORCH,
     device="cpu", dtype=...)`` (its TORCH kernel accepts only float16/bfloat16; bfloat16 is
     what it picks on CPU without ``dtype=``);
   - ``dequantized_fp32``: the base with every quantized Linear's weight replaced by GPTQModel's
     ``dequantize_weight()``, run in float32: the weight quantization error alone.
   A JSON summary is printed last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gptqmodel_env import use_cpu_gptqmodel  # noqa: E402

use_cpu_gptqmodel()  # before gptqmodel (and ideally torch) is imported
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import train_demo_model as tdm  # noqa: E402  (stdlib-only at import time)
from tiny_lm import copy_named, replace_dir  # noqa: E402

QUANT = dict(bits=8, group_size=128, sym=True, desc_act=False, format="gptq", lm_head=False)
KEEP_FROM_GPTQMODEL = {"config.json", "quantize_config.json", "model.safetensors"}
FROM_BASE = {"generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja"}


def log(msg):
    print(f"[quantize_demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def calibration(tokenizer, n, length, seed):
    train_topics, _ = tdm.split_topics()
    pairs = tdm.chat_examples(train_topics, random.Random(seed))
    stream = tdm.encode_stream(tokenizer, [t for _, t in train_topics]) + tdm.encode_chats(tokenizer, pairs)
    step = (len(stream) - length) // n
    out = []
    for i in range(n):
        w = stream[i * step: i * step + length]
        out.append({"input_ids": list(w), "attention_mask": [1] * len(w)})
    return out, len(stream)


def heldout_windows(tokenizer, base_dir, seq):
    import torch
    with open(os.path.join(base_dir, "heldout.json")) as fh:
        texts = json.load(fh)["texts"]
    ids = tdm.encode_stream(tokenizer, texts)
    n = (len(ids) - 1) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


def logits_of(model, windows):
    import torch
    outs = []
    with torch.no_grad():
        for w in windows:
            outs.append(model(input_ids=w[None]).logits[0].float())
    return outs


def compare(base_logits, q_logits, windows):
    import torch
    nll_b = nll_q = 0.0
    n = agree = 0
    kl = 0.0
    for lb, lq, w in zip(base_logits, q_logits, windows, strict=True):
        tgt = w[1:]
        lpb = torch.log_softmax(lb[:-1], -1)
        lpq = torch.log_softmax(lq[:-1], -1)
        nll_b -= lpb.gather(-1, tgt[:, None]).sum().item()
        nll_q -= lpq.gather(-1, tgt[:, None]).sum().item()
        kl += (lpb.exp() * (lpb - lpq)).sum().item()
        agree += (lb.argmax(-1) == lq.argmax(-1)).sum().item()
        n += len(tgt)
    n_pos = sum(len(w) for w in windows)
    return {"base_ppl": round(math.exp(nll_b / n), 4), "int8_ppl": round(math.exp(nll_q / n), 4),
            "ppl_ratio": round(math.exp((nll_q - nll_b) / n), 5),
            "top1_agreement": round(agree / n_pos, 5), "mean_kl_base_to_int8": round(kl / n, 6),
            "tokens": n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="models/qwen3-pydoc")
    ap.add_argument("--out", default="models/qwen3-pydoc-gptq-int8")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args(argv)

    t_all = time.time()
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import gptqmodel
    import transformers
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    versions = {"torch": torch.__version__, "gptqmodel": gptqmodel.__version__,
                "transformers": transformers.__version__, "python": sys.version.split()[0]}
    log(f"versions {versions}")
    base = os.path.abspath(args.base)
    out = os.path.abspath(args.out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    calib, n_stream = calibration(tokenizer, args.calib_samples, args.calib_len, args.seed)
    log(f"calibration: {len(calib)} x {args.calib_len} tokens from the {n_stream}-token training stream")

    qc = QuantizeConfig(device="cpu", **QUANT)
    t_q = time.time()
    model = GPTQModel.load(base, quantize_config=qc, backend=BACKEND.TORCH)
    model.quantize(calib, batch_size=1, backend=BACKEND.TORCH, calibration_data_min_length=1)
    with tempfile.TemporaryDirectory(prefix="qwen3_pydoc_gptq_") as tmp:
        model.save(tmp)
        del model
        quant_seconds = time.time() - t_q
        written = sorted(os.listdir(tmp))
        log(f"GPTQModel wrote {written} in {quant_seconds:.0f}s")
        replace_dir(out)
        copy_named(tmp, out, KEEP_FROM_GPTQMODEL)
    copy_named(base, out, FROM_BASE)
    log(f"kept {sorted(os.listdir(out))}")

    # ---- check: reload with GPTQModel, compare with the base
    windows = heldout_windows(tokenizer, base, args.calib_len)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    b_logits = logits_of(base_model, windows)
    b_samples = tdm.greedy(base_model, tokenizer, tdm.SAMPLE_PROMPTS, args.max_new_tokens)
    results = {}
    deq = None
    # GPTQModel's TORCH kernel runs in float16 or bfloat16 only (float32 raises ValueError);
    # without dtype= it picks bfloat16 on CPU.
    for label, dt in (("gptqmodel_fp16", torch.float16), ("gptqmodel_bf16", torch.bfloat16)):
        qmodel = GPTQModel.load(out, backend=BACKEND.TORCH, device="cpu", dtype=dt)
        hf_q = qmodel.model.eval()
        qmods = {n: m for n, m in hf_q.named_modules() if hasattr(m, "qweight")}
        log(f"reloaded ({label}): {len(qmods)} quantized modules "
            f"({type(next(iter(qmods.values()))).__name__}), model dtype {next(hf_q.parameters()).dtype}")
        if deq is None:  # GPTQModel's own dequantization, [in, out] -> nn.Linear [out, in]
            with torch.no_grad():
                deq = {n: m.dequantize_weight().float().t().contiguous() for n, m in qmods.items()}
        q_logits = logits_of(hf_q, windows)
        samples = tdm.greedy(hf_q, tokenizer, tdm.SAMPLE_PROMPTS, args.max_new_tokens)
        results[label] = {"heldout": compare(b_logits, q_logits, windows), "greedy": samples}
        del qmodel, hf_q, q_logits
    # weight error only: the float32 base with every quantized Linear replaced by GPTQModel's
    # dequantize_weight(), computed in float32 like the base
    wq = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, w in deq.items():
            lin = wq.get_submodule(n)
            assert lin.weight.shape == w.shape, (n, lin.weight.shape, w.shape)
            lin.weight.copy_(w)
    results["dequantized_fp32"] = {"heldout": compare(b_logits, logits_of(wq, windows), windows),
                                   "greedy": tdm.greedy(wq, tokenizer, tdm.SAMPLE_PROMPTS, args.max_new_tokens)}
    del wq
    for p in b_samples:
        log(f"base            {p!r} -> {b_samples[p]!r}")
        for label, r in results.items():
            log(f"{label:15s} {p!r} -> {r['greedy'][p]!r}")
    for label, r in results.items():
        r["greedy_identical_to_base"] = {p: r["greedy"][p] == b_samples[p] for p in b_samples}
        log(f"{label}: held-out {r['heldout']}; greedy identical to base "
            f"{sum(r['greedy_identical_to_base'].values())}/{len(b_samples)}")
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
    summary = {
        "command": "tools/quantize_demo_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": versions, "quantize_config": QUANT,
        "calibration": {"samples": len(calib), "length": args.calib_len, "source": "training stream"},
        "quantize_seconds": round(quant_seconds, 1), "gptqmodel_wrote": written, "sizes": sizes,
        "greedy_base": b_samples, "comparisons_vs_fp32_base": results,
        "total_seconds": round(time.time() - t_all, 1),
    }
    print(json.dumps(summary, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
