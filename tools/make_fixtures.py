#!/usr/bin/env python
"""Generate the tiny GPTQ reference checkpoints in ``tests/fixtures`` with GPTQModel.

These fixtures are the project's *independent* references: the checkpoints are written,
re-read and dequantized by GPTQModel (never by gptq-ascend code), so every test that
compares against them checks our reader against someone else's.

How to run
==========
GPTQModel is never part of the project's default install or CI. Create a separate venv
(pip is capped at torch <= 2.14.1 on this machine; gptqmodel then pulls a CUDA torch 2.14.1
build, ~6 GB, which runs fine on CPU)::

    python3.11 -m venv /work/venvs/gptqmodel
    /work/venvs/gptqmodel/bin/pip install torch==2.13.0
    /work/venvs/gptqmodel/bin/pip install gptqmodel==7.7.0 --no-build-isolation

then, from the repository root::

    /work/venvs/gptqmodel/bin/python tools/make_fixtures.py --out tests/fixtures

Options: ``--only NAME [NAME ...]`` regenerates some fixtures only (committed bases are then
reused from ``--out`` if present, else retrained; ``--retrain`` forces retraining),
``--threads N`` (torch intra-op threads, default 1: on this shared 2-core machine two OpenMP
threads trained ~5x SLOWER than one whenever other jobs ran, 26 s vs 5 s for 20 steps).
The script sets ``GPTQMODEL_CPU_WORKERS=2``, ``CUDA_VISIBLE_DEVICES=`` (empty) and offline HF
env vars itself, before importing gptqmodel. Exit status 1 if any fixture failed.

Determinism: everything is seeded. Two runs gave byte-identical tokenizer.json, base weights,
quantized model.safetensors, dequantized.safetensors, logits.safetensors and config.json (only
fixture.json differs: date and base training seconds).

What it does
============
1. Tokenizer: byte-level BPE (HF ``tokenizers``), vocab 1024, trained on the Python docs
   shipped offline in ``pydoc_data.topics.topics`` (79 topics, ~465K chars, 159K tokens).
   Special tokens ``<|endoftext|>`` (id 0: bos = eos), ``<|im_start|>`` (1), ``<|im_end|>`` (2),
   ``<|pad|>`` (3, pad), and a ChatML-like ``chat_template`` (written as chat_template.jinja).
   No BOS is prepended automatically. generation_config: eos_token_id [0, 2], do_sample false.
2. Bases: tiny Qwen3 (tied embeddings) and Llama (untied lm_head) models, trained 600 AdamW
   steps (batch 16 x 128 tokens, float32, flush-denormal on, ~2 min CPU each) on the first 20K
   tokens of the pydoc stream (topics in sorted order, joined by eos), which they memorise
   (final batch loss ~0.17-0.19): predictions on that text are peaked and greedy decoding is
   stable. Saved as float16 safetensors with the tokenizer, plus training.json.
   Shapes (all in/out dims multiples of 32; 4 heads x head_dim 32, 2 KV heads so TP=2
   divides both; vocab 1024; max_position_embeddings 512; rope_theta 1e4):
     base-qwen3        hidden 128, intermediate 256, 2 layers (down_proj K=256: two 128-groups)
     base-llama        hidden 128, intermediate 256, 2 layers
     base-llama-short  hidden 128, intermediate 352, 2 layers (down_proj K=352 with group 128:
                       groups 128, 128, 96 -> a SHORT last group). NOT committed (trained into a
                       temp dir, ~2 min) to keep tests/fixtures small.
3. Prompts: P=3 windows of T=16 tokens from the memorised slice, chosen (select_prompts) to
   maximise the smallest top1-top2 logit margin over all positions under base-qwen3 and
   base-llama (achieved: >= 0.97 at every position), with no eos inside, and whose text
   round-trips through decode/encode to the same ids. Text and offsets are in fixture.json.
4. Quantize each fixture with GPTQModel on CPU (calibration: 48 windows x 128 tokens evenly
   spaced over the memorised slice), save, keep only config.json, quantize_config.json,
   model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json,
   chat_template.jinja (dropped: quant_log.csv).
5. Verify (verify_fixture): config.json quantization_config has the requested bits /
   group_size / sym / desc_act / lm_head / checkpoint_format; every qweight/qzeros/scales/g_idx
   has the GPTQ shape; g_idx == i // g (desc_act: a non-monotonic permutation of it); sym
   qzeros words are 0x7F7F7F7F (8-bit v1), 0x77777777 (4-bit v1), 0x55555555 (2-bit v1),
   0x88888888 (4-bit v2); bases load with transformers alone and render the chat template.
6. Reload each with GPTQModel and write ``<name>/expected/`` (a subfolder, so model loaders do
   not take these for weights):
   - ``dequantized.safetensors``: ``<module>.weight`` = ``module.dequantize_weight()`` for every
     quantized module (names = the checkpoint prefixes before ``.qweight``, lm_head included
     when quantized), [in_features, out_features], float16 as returned. Because the model is
     reloaded with dtype=float16 (scales stay float16 as stored), this equals the exact
     ``(q - z) * scale`` computed in float32 and rounded once to float16 -- checked bit-exact
     against an independent unpacker on all fixtures, 3-bit included.
   - ``logits.safetensors``: ``input_ids`` int64 [3, 16]; ``logits`` float32 [3, 16, 1024] from
     the reloaded GPTQModel model (it runs in float16; cast to float32); ``base_logits``
     float32 [3, 16, 1024] from the float16 base upcast to float32 (transformers only).
   - ``fixture.json``: settings, effective QuantizeConfig kwargs, quantization_config, shapes,
     per-module bits/group, checks, versions, tensor dtypes, prompts, stats (top-1 agreement
     and KL of quantized vs base on the prompts), base training info, UTC date.

Fixtures (base: quantize load dtype -> dtype of non-quantized tensors in the checkpoint)
   qwen3-int8-g128-sym     8-bit g128 sym, desc_act False, v1 ("gptq")  [Qwen3-1.7B-GPTQ-Int8]
   qwen3-int4-g32-descact  4-bit g32 sym, desc_act True, v1
   llama-int8-g64-asym     8-bit g64 asym, v1
   qwen3-int8-perchannel   8-bit group_size -1 sym, v1
   llama-int4-g64-v2       4-bit g64 asym, "gptq_v2"
   qwen3-int3-g32          3-bit g32 sym, v1
   llama-int2-g32          2-bit g32 asym, v1
   llama-int4-g32-lmhead   4-bit g32 sym, lm_head=True, lm_head 4-bit g32 (explicit dynamic)
   llama-int4-g32-lmhead8  4-bit g32 sym, lm_head=True with GPTQModel's default: lm_head 8-bit
                           g32 through an injected ``dynamic`` override (mixed bits per module)
   qwen3-int4-g128-sym     4-bit g128 sym, v1 (all K multiples of 128; peer check with vLLM)
   llama-int4-g128-short   4-bit g128 sym, v1, down_proj K=352 -> short last group of 96
   Qwen3 fixtures are quantized from a bfloat16 load (GPTQModel's CPU default), so their
   embeddings/norms are bfloat16 and config dtype "bfloat16" with float16 scales, like the real
   Qwen3-1.7B-GPTQ-Int8; Llama fixtures from an explicit float16 load (all float16).

GPTQModel 7.7.0 facts learned here (CPU, no GPU)
================================================
* Env: ``GPTQMODEL_CPU_WORKERS=2`` (else "Virtual pool 'model_loader:cpu' requests 2 workers
  but parent 'cpu' only has 1") and ``CUDA_VISIBLE_DEVICES=`` must be set before import.
* ``QuantizeConfig(bits, group_size, desc_act, sym, format="gptq"|"gptq_v2", lm_head,
  device="cpu", offload_to_disk=False)`` returns a ``GPTQConfig``. desc_act defaults to None
  (-> False), damp_percent to 0.05.
* ``act_group_aware`` (GAR, group-aware reordering inside GPTQ) defaults to True for GPTQ. It
  raises ``ValueError: Quantization: Module ... act_group_aware=True requires group_size > 0``
  for group_size -1, and ``desc_act=True`` switches it off with a warning; this script passes
  ``act_group_aware=False`` in both cases. With GAR on, the saved g_idx is still i // g.
* ``offload_to_disk`` defaults to True and then writes a random temp path into
  quantization_config.meta.offload_to_disk_path; False keeps the config deterministic.
* ``GPTQModel.load(base_dir, quantize_config=qc, backend=BACKEND.TORCH[, dtype=...])``: pass no
  ``device=``. Without ``dtype`` the CPU default is bfloat16 ("Loader: Auto dtype (CPU + Torch
  Fused): torch.bfloat16"), even for a float16 base: the saved non-quantized tensors and
  config ``dtype`` become bfloat16. ``dtype=torch.float16`` keeps float16. Scales are always
  saved float16.
* Calibration must be a list of dicts ``{"input_ids": [...], "attention_mask": [...]}``
  (a tokenizer BatchEncoding is refused); ``model.quantize(calib, batch_size=1,
  backend=BACKEND.TORCH, calibration_data_min_length=1)``, then ``model.save(dir)``; ~10-20 s
  per fixture here. save() also writes quant_log.csv, and rewrites generation_config.json
  with "do_sample": true (this script copies the base's generation_config.json back).
* Saved config.json carries quantization_config (bits, group_size, desc_act, sym, lm_head,
  format and checkpoint_format, quant_method "gptq", method, pack_dtype "int32", meta{...});
  quantize_config.json repeats it.
* ``lm_head=True`` makes GPTQModel add ``dynamic = {"lm_head": {"bits": 8, "group_size": 32,
  "sym": true, "desc_act": false, "mse": 2.4}}`` unless ``dynamic`` already matches lm_head
  (looper/module_looper.py). lm_head=True on a tied-embedding model raises
  NotImplementedError. A quantized lm_head is stored as lm_head.qweight/... with no
  lm_head.weight; the embedding stays float.
* Short last group accepted: in_features 352 with group 128 gives qzeros/scales with
  ceil(352/128) = 3 rows and g_idx i // 128 (last group 96 rows).
* 3-bit packs as a plain little-endian bit stream over 3 int32 words per 32 rows (value j at
  bit 3*j, two values straddling word boundaries), along K for qweight and N for qzeros.
* Reload: ``GPTQModel.load(dir, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)``;
  the HF model is ``.model``; quantized modules are ``TorchLinear`` (in
  gptqmodel.nn_modules.qlinear.torch) with ``dequantize_weight()`` -> [in, out] in the model
  dtype; v1 checkpoints are converted to v2 in memory on load ("Converting GPTQ v1 to v2").
  dtype=float32 is refused: "ValueError: <class '...TorchLinear'> only supports
  `[torch.float16, torch.bfloat16]` dtype: actual dtype = `torch.float32`". The bfloat16 default
  rounds scales to bfloat16 first (measured |error| up to 1e-3 on weights of magnitude 0.25),
  which is why this script reloads in float16.

RUN LOG (last full run, 2026-11-23, shared 2-core machine with other jobs running)
=======
All 11 fixtures OK; total 10 min 5 s (bases 125 / 136 / 174 s incl. verification and
contention, each fixture 8-17 s quantize + reload + expected). tests/fixtures: 21 MB (du -sh),
~1.5-1.9 MB per fixture (model 0.4-0.7 MB, dequantized 0.59-0.84 MB, logits 0.39 MB,
tokenizer 0.06 MB), bases 0.9 / 1.2 MB.
Quantized vs base on the 3 prompts (top-1 agreement / mean KL): int8 g128 1.00 / 1.3e-4,
int8 perchannel 1.00 / 1.9e-4, int8 g64 asym 1.00 / 4e-5, int4 g32 descact 1.00 / 0.021,
int4 g64 v2 1.00 / 0.014, int4 g128 1.00 / 0.024, int4 lm_head 1.00 / 0.020, int4 lm_head8
1.00 / 0.017, int4 short 0.98 / 0.037, int3 0.94 / 0.16, int2 0.77 / 0.94.
Versions: torch 2.14.1+cu130, gptqmodel 7.7.0, transformers 5.23.0, tokenizers 0.23.3,
Python 3.11.7.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

from gptqmodel_env import use_cpu_gptqmodel  # tools/ is on sys.path when run
from pydoc_tokenizer import CHAT_TEMPLATE, encode_stream, train_bpe_tokenizer
from tiny_lm import copy_named, lm_config, replace_dir, save_fp16, train_onecycle

use_cpu_gptqmodel()  # before gptqmodel (and ideally torch) is imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VOCAB_SIZE = 1024
TRAIN_TOKENS = 20000        # size of the memorised slice of the pydoc token stream
TRAIN_STEPS = 600
TRAIN_SEQ = 128
TRAIN_BATCH = 16
CALIB_SAMPLES = 48
CALIB_LEN = 128
PROMPT_LEN = 16
# Prompts: see select_prompts().
PROMPT_COUNT = 3
PROMPT_STRIDE = 8
PROMPT_SELECTION_BASES = ["base-qwen3", "base-llama"]

# quant_dtype: the dtype GPTQModel loads the base in for quantization, which is also the dtype of
# the non-quantized tensors (embeddings, norms, unquantized lm_head) in the saved checkpoint.
# None = GPTQModel's CPU default, bfloat16: that mirrors Qwen3-1.7B-GPTQ-Int8 (bf16 tensors,
# fp16 scales). The Llama fixtures are quantized from float16 so both layouts are covered.
BASES = {
    "base-qwen3": dict(arch="qwen3", hidden=128, intermediate=256, tie=True, seed=1, quant_dtype=None),
    "base-llama": dict(arch="llama", hidden=128, intermediate=256, tie=False, seed=2, quant_dtype="float16"),
    # Not committed (keep=False: trained into a temp dir) to keep tests/fixtures small; its
    # base_logits are in the fixture's expected/logits.safetensors.
    "base-llama-short": dict(arch="llama", hidden=128, intermediate=352, tie=False, seed=3,
                             quant_dtype="float16", keep=False),
}

# name -> (base, QuantizeConfig kwargs)
FIXTURES = {
    "qwen3-int8-g128-sym": ("base-qwen3", dict(bits=8, group_size=128, sym=True, desc_act=False, format="gptq")),
    "qwen3-int4-g32-descact": ("base-qwen3", dict(bits=4, group_size=32, sym=True, desc_act=True, format="gptq")),
    "llama-int8-g64-asym": ("base-llama", dict(bits=8, group_size=64, sym=False, desc_act=False, format="gptq")),
    "qwen3-int8-perchannel": ("base-qwen3", dict(bits=8, group_size=-1, sym=True, desc_act=False, format="gptq")),
    "llama-int4-g64-v2": ("base-llama", dict(bits=4, group_size=64, sym=False, desc_act=False, format="gptq_v2")),
    "qwen3-int3-g32": ("base-qwen3", dict(bits=3, group_size=32, sym=True, desc_act=False, format="gptq")),
    "llama-int2-g32": ("base-llama", dict(bits=2, group_size=32, sym=False, desc_act=False, format="gptq")),
    # lm_head=True alone makes GPTQModel inject dynamic={"lm_head": {bits 8, group 32, sym, mse 2.4}}
    # (looper/module_looper.py), i.e. an 8-bit lm_head. To get the 4-bit lm_head asked for, the
    # override is passed explicitly; "-lmhead8" keeps GPTQModel's default (mixed bits via dynamic).
    "llama-int4-g32-lmhead": ("base-llama", dict(
        bits=4, group_size=32, sym=True, desc_act=False, format="gptq", lm_head=True,
        dynamic={"lm_head": {"bits": 4, "group_size": 32, "sym": True, "desc_act": False}})),
    "llama-int4-g32-lmhead8": ("base-llama", dict(
        bits=4, group_size=32, sym=True, desc_act=False, format="gptq", lm_head=True)),
    "qwen3-int4-g128-sym": ("base-qwen3", dict(bits=4, group_size=128, sym=True, desc_act=False, format="gptq")),
    "llama-int4-g128-short": ("base-llama-short", dict(
        bits=4, group_size=128, sym=True, desc_act=False, format="gptq")),
}

# Files GPTQModel writes that we keep (anything else is dropped).
KEEP_FILES = {
    "config.json", "quantize_config.json", "model.safetensors", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
}


def log(msg):
    print(f"[make_fixtures {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- tokenizer
def pydoc_texts():
    from pydoc_data.topics import topics
    keys = sorted(topics)
    return keys, [topics[k] for k in keys]


def build_tokenizer():
    _, texts = pydoc_texts()
    return train_bpe_tokenizer(texts, VOCAB_SIZE, 512, CHAT_TEMPLATE)


def token_stream(tokenizer):
    """Whole pydoc corpus as one token stream, topics in sorted order separated by eos."""
    return encode_stream(tokenizer, pydoc_texts()[1])


def select_prompts(tokenizer, stream, base_dirs):
    """PROMPT_COUNT windows of PROMPT_LEN tokens from the memorised slice, chosen so that every
    position of every prompt has a clear top-1 under every selection base (float32 logits):
    maximise min over positions and bases of (top1 - top2) logit margin. Windows hold no eos
    and round-trip through decode/encode, so their text gives the same ids."""
    import torch
    mem = stream[:TRAIN_TOKENS]
    eos = tokenizer.eos_token_id
    cands = []
    for off in range(0, len(mem) - PROMPT_LEN, PROMPT_STRIDE):
        w = mem[off: off + PROMPT_LEN]
        if eos in w:
            continue
        if tokenizer.backend_tokenizer.encode(tokenizer.decode(w), add_special_tokens=False).ids != w:
            continue
        cands.append((off, w))
    ids = torch.tensor([w for _, w in cands], dtype=torch.long)
    worst = torch.full((len(cands),), float("inf"))
    with torch.no_grad():
        for bdir in base_dirs:
            m = load_base_fp32(bdir)
            for a in range(0, len(cands), 256):
                top2 = m(input_ids=ids[a: a + 256]).logits.topk(2, dim=-1).values
                marg = (top2[..., 0] - top2[..., 1]).min(dim=-1).values
                worst[a: a + 256] = torch.minimum(worst[a: a + 256], marg)
            del m
    chosen, used = [], []
    for k in torch.argsort(worst, descending=True, stable=True).tolist():
        off = cands[k][0]
        if all(abs(off - u) >= 4 * PROMPT_LEN for u in used):  # distinct passages
            chosen.append(k)
            used.append(off)
        if len(chosen) == PROMPT_COUNT:
            break
    chosen.sort(key=lambda k: cands[k][0])
    return {
        "ids": [cands[k][1] for k in chosen],
        "text": [tokenizer.decode(cands[k][1]) for k in chosen],
        "stream_offsets": [cands[k][0] for k in chosen],
        "min_top2_margin_over_selection_bases": [round(worst[k].item(), 4) for k in chosen],
        "selection_bases": [os.path.basename(b) for b in base_dirs],
        "candidates": len(cands),
    }


def calibration(stream):
    """CALIB_SAMPLES windows of CALIB_LEN tokens, evenly spread over the memorised slice."""
    n = min(TRAIN_TOKENS, len(stream)) - CALIB_LEN
    step = n // CALIB_SAMPLES
    out = []
    for i in range(CALIB_SAMPLES):
        w = stream[i * step: i * step + CALIB_LEN]
        out.append({"input_ids": list(w), "attention_mask": [1] * len(w)})
    return out


# ----------------------------------------------------------------------------- bases
def make_config(spec, tokenizer):
    sizes = dict(hidden=spec["hidden"], intermediate=spec["intermediate"], layers=2, heads=4, kv_heads=2,
                 head_dim=32, max_pos=512)
    return lm_config(spec["arch"], sizes, len(tokenizer), spec["tie"], 10000.0, tokenizer.bos_token_id,
                     tokenizer.eos_token_id, tokenizer.pad_token_id)


def train_base(name, spec, tokenizer, stream, out_dir):
    import torch

    cfg, cls = make_config(spec, tokenizer)
    torch.manual_seed(spec["seed"])
    model = cls(cfg).float()
    data = torch.tensor(stream[:TRAIN_TOKENS], dtype=torch.long)
    gen = torch.Generator().manual_seed(spec["seed"])

    def next_batch():
        starts = torch.randint(0, len(data) - TRAIN_SEQ - 1, (TRAIN_BATCH,), generator=gen).tolist()
        return torch.stack([data[s: s + TRAIN_SEQ] for s in starts])

    t0 = time.time()
    final_loss = train_onecycle(model, TRAIN_STEPS, next_batch, lambda m: log(f"{name}: {m}"))
    save_fp16(model, tokenizer, out_dir, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")],
              pad_token_id=tokenizer.pad_token_id)
    info = {"spec": spec, "train_tokens": TRAIN_TOKENS, "steps": TRAIN_STEPS, "seq": TRAIN_SEQ,
            "batch": TRAIN_BATCH, "optimizer": "AdamW lr 3e-3 OneCycle, clip 1.0, float32, saved float16",
            "final_batch_loss": round(final_loss, 4), "train_seconds": round(time.time() - t0, 1)}
    with open(os.path.join(out_dir, "training.json"), "w") as fh:
        json.dump(info, fh, indent=1)
        fh.write("\n")
    return info


def load_base_fp32(base_dir):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16)
    return m.float().eval()


def verify_base(base_dir, spec):
    """transformers alone must read the base (model, tokenizer, chat template)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    cfg = AutoConfig.from_pretrained(base_dir)
    assert cfg.tie_word_embeddings == spec["tie"], cfg.tie_word_embeddings
    AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    assert len(tok) == VOCAB_SIZE and tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", repr(chat)


# ----------------------------------------------------------------------------- quantize
def effective_qkw(qkw):
    """The QuantizeConfig kwargs actually used (recorded in fixture.json)."""
    qkw = dict(qkw)
    qkw.setdefault("lm_head", False)
    # GAR (act_group_aware, default True for GPTQ) refuses group_size -1 and desc_act=True.
    if qkw["group_size"] == -1 or qkw["desc_act"]:
        qkw["act_group_aware"] = False
    return qkw


def quantize_one(name, base_dir, qkw, quant_dtype, calib, work_dir, out_dir):
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    # offload_to_disk=False: otherwise a random temp path is written into the config's meta.
    qc = QuantizeConfig(device="cpu", offload_to_disk=False, **qkw)
    load_kw = {} if quant_dtype is None else {"dtype": getattr(torch, quant_dtype)}
    model = GPTQModel.load(base_dir, quantize_config=qc, backend=BACKEND.TORCH, **load_kw)
    model.quantize(calib, batch_size=1, backend=BACKEND.TORCH, calibration_data_min_length=1)
    model.save(work_dir)
    del model
    written = sorted(os.listdir(work_dir))
    replace_dir(out_dir)
    copy_named(work_dir, out_dir, KEEP_FILES)
    # Tokenizer files from the base if GPTQModel did not write them. generation_config.json is
    # always the base's: GPTQModel's saver rewrites it with "do_sample": true.
    for f in os.listdir(base_dir):
        if f == "generation_config.json" or (
                f in KEEP_FILES and f.startswith(("tokenizer", "special_tokens", "chat_template"))
                and not os.path.exists(os.path.join(out_dir, f))):
            shutil.copy2(os.path.join(base_dir, f), os.path.join(out_dir, f))
    return written


def _packed_sym_zero_word(bits, v2):
    z = 2 ** (bits - 1) - (0 if v2 else 1)
    word = 0
    for j in range(32 // bits):
        word |= z << (bits * j)
    return word


def _dynamic_override(dynamic, module):
    """GPTQModel semantics: first matching key (re.match) wins; "-:" = not quantized."""
    import re
    for key, ov in (dynamic or {}).items():
        neg = key.startswith("-:")
        pat = key[2:] if key.startswith(("+:", "-:")) else key
        if re.match(pat, module):
            return False if neg else ov
    return None


def verify_fixture(name, fx_dir, base_spec, qkw):
    """Check config.json / tensor layout against what was asked for. Returns facts for the report."""
    import torch
    from safetensors import safe_open

    with open(os.path.join(fx_dir, "config.json")) as fh:
        cfg = json.load(fh)
    qc = cfg["quantization_config"]
    want_fmt = qkw["format"]
    checks = {"bits": qkw["bits"], "group_size": qkw["group_size"], "sym": qkw["sym"],
              "desc_act": qkw["desc_act"], "lm_head": qkw["lm_head"], "checkpoint_format": want_fmt}
    for k, v in checks.items():
        if qc.get(k) != v:
            raise AssertionError(f"{name}: quantization_config[{k!r}] = {qc.get(k)!r}, want {v!r}")
    assert qc.get("quant_method") == "gptq", qc.get("quant_method")
    v2 = want_fmt == "gptq_v2"
    dynamic = qc.get("dynamic")
    facts = {"config_dtype": cfg.get("dtype", cfg.get("torch_dtype")), "short_last_group": []}
    with safe_open(os.path.join(fx_dir, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        prefixes = sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))
        assert prefixes, name
        if qkw["lm_head"]:
            assert "lm_head.qweight" in keys, f"{name}: lm_head not quantized"
        else:
            assert "lm_head.qweight" not in keys
        facts["has_lm_head_weight"] = "lm_head.weight" in keys
        if base_spec["tie"]:
            assert "lm_head.weight" not in keys, f"{name}: tied model saved an lm_head.weight"
        for p in prefixes:
            ov = _dynamic_override(dynamic, p)
            assert ov is not False, p
            ov = ov or {}
            bits, g = ov.get("bits", qkw["bits"]), ov.get("group_size", qkw["group_size"])
            sym, desc_act = ov.get("sym", qkw["sym"]), ov.get("desc_act", qkw["desc_act"])
            if ov:
                facts.setdefault("dynamic_overrides_applied", {})[p] = ov
            qw, qz = f.get_tensor(p + ".qweight"), f.get_tensor(p + ".qzeros")
            sc, gi = f.get_tensor(p + ".scales"), f.get_tensor(p + ".g_idx")
            K, N = gi.numel(), sc.shape[1]
            gs = K if g == -1 else g
            ngroups = -(-K // gs)
            assert qw.dtype == torch.int32 and tuple(qw.shape) == (-(-K * bits // 32), N), (p, qw.shape)
            assert tuple(qz.shape) == (ngroups, -(-N * bits // 32)), (p, qz.shape)
            assert tuple(sc.shape) == (ngroups, N) and sc.dtype == torch.float16, (p, sc.shape, sc.dtype)
            if K % gs:
                facts["short_last_group"].append(f"{p}: K={K} groups of {gs}, last {K % gs}")
            mono = bool((gi[1:] >= gi[:-1]).all())
            if desc_act:
                assert sorted(gi.tolist()) == sorted((torch.arange(K) // gs).tolist()), p
            else:
                assert torch.equal(gi, (torch.arange(K, dtype=torch.int32) // gs)), p
            facts.setdefault("g_idx_monotonic", []).append(mono)
            if sym and bits in (2, 4, 8):
                want = _packed_sym_zero_word(bits, v2)
                got = set((qz.to(torch.int64) & 0xFFFFFFFF).unique().tolist())
                assert got == {want}, f"{p}: qzeros words {[hex(x) for x in got]} != {hex(want)}"
                facts.setdefault("sym_qzeros_word", {})[f"{bits}-bit"] = hex(want)
    if qkw["desc_act"]:
        assert not all(facts["g_idx_monotonic"]), f"{name}: desc_act but every g_idx is monotonic"
    facts["g_idx_monotonic"] = all(facts["g_idx_monotonic"])
    return facts


def write_expected(name, base_dir, fx_dir, qkw, prompts, prompt_ids, versions, extra):
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from safetensors import safe_open
    from safetensors.torch import save_file

    exp_dir = os.path.join(fx_dir, "expected")
    os.makedirs(exp_dir, exist_ok=True)

    # dtype=float16 keeps the scales in float16 as stored: dequantize_weight() then equals the
    # exact (q - z) * scale rounded once to float16. GPTQModel's CPU default (bfloat16) would
    # first round the scales to bfloat16 (measured error up to 1e-3 on weights of magnitude
    # 0.25), and float32 is refused by TorchLinear ("only supports [float16, bfloat16]").
    qmodel = GPTQModel.load(fx_dir, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    hf = qmodel.model
    hf.eval()

    deq, modules = {}, {}
    with torch.no_grad():
        for mname, mod in hf.named_modules():
            if hasattr(mod, "dequantize_weight") and hasattr(mod, "qweight"):
                w = mod.dequantize_weight().detach().cpu().contiguous()
                deq[f"{mname}.weight"] = w
                modules[mname] = {
                    "class": type(mod).__name__,
                    "in_features": int(mod.in_features),
                    "out_features": int(mod.out_features),
                    "bits": int(mod.bits),
                    "group_size": int(mod.group_size),
                    "dequantized_shape": list(w.shape),
                }
    # module names must match the checkpoint's tensor prefixes
    with safe_open(os.path.join(fx_dir, "model.safetensors"), "pt") as f:
        ckpt_keys = list(f.keys())
        ckpt_prefixes = sorted(k[: -len(".qweight")] for k in ckpt_keys if k.endswith(".qweight"))
        ckpt_dtypes = {}
        for k in ckpt_keys:
            ckpt_dtypes.setdefault(str(f.get_slice(k).get_dtype()), 0)
            ckpt_dtypes[str(f.get_slice(k).get_dtype())] += 1
        g_idx_monotonic = {}
        for p in ckpt_prefixes:
            if f"{p}.g_idx" in ckpt_keys:
                g = f.get_tensor(f"{p}.g_idx")
                g_idx_monotonic[p] = bool((g[1:] >= g[:-1]).all())
    if sorted(modules) != ckpt_prefixes:
        raise RuntimeError(f"{name}: dequantized modules {sorted(modules)} != checkpoint prefixes {ckpt_prefixes}")
    save_file(deq, os.path.join(exp_dir, "dequantized.safetensors"))

    ids = torch.tensor(prompt_ids, dtype=torch.long)
    with torch.no_grad():
        q_out = hf(input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = q_out.logits.float().contiguous()
        model_dtype = str(next(hf.parameters()).dtype)
        scales_dtype = str(next(m for m in hf.modules() if hasattr(m, "scales")).scales.dtype)
    del qmodel, hf
    base = load_base_fp32(base_dir)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float().contiguous()
    del base
    save_file({"input_ids": ids, "logits": logits, "base_logits": base_logits},
              os.path.join(exp_dir, "logits.safetensors"))

    top2 = base_logits.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    agree = (logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
    lp_q = torch.log_softmax(logits, -1)
    lp_b = torch.log_softmax(base_logits, -1)
    kl = (lp_b.exp() * (lp_b - lp_q)).sum(-1).mean().item()

    with open(os.path.join(fx_dir, "config.json")) as fh:
        qcfg = json.load(fh).get("quantization_config")
    with open(os.path.join(base_dir, "config.json")) as fh:
        bcfg = json.load(fh)
    info = {
        "name": name,
        "generator": "tools/make_fixtures.py (GPTQModel quantize + save + reload + dequantize_weight)",
        "generated_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base": os.path.basename(base_dir.rstrip("/")),
        "quantize_config_kwargs": qkw,
        **extra,
        "quantization_config": qcfg,
        "model_shapes": {k: bcfg.get(k) for k in (
            "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
            "max_position_embeddings", "tie_word_embeddings")},
        "quantized_modules": modules,
        "checkpoint_tensor_dtypes": ckpt_dtypes,
        "g_idx_monotonic": g_idx_monotonic,
        "versions": versions,
        "expected": {
            "dequantized.safetensors": {
                "keys": "<module>.weight for every quantized module",
                "layout": "[in_features, out_features] exactly as module.dequantize_weight() returns",
                "dtype": str(next(iter(deq.values())).dtype),
            },
            "logits.safetensors": {
                "input_ids": {"dtype": "torch.int64", "shape": list(ids.shape)},
                "logits": {"dtype": str(logits.dtype), "shape": list(logits.shape),
                           "computed_by": f"GPTQModel.load(dir, backend=BACKEND.TORCH, device='cpu').model forward, "
                                          f"model dtype {model_dtype}, scales dtype {scales_dtype}, cast to float32"},
                "base_logits": {"dtype": str(base_logits.dtype), "shape": list(base_logits.shape),
                                "computed_by": "transformers AutoModelForCausalLM on the float16 base, "
                                               "upcast to float32"},
            },
        },
        "prompts": {**prompts, "length": PROMPT_LEN,
                    "note": "windows of the sorted pydoc token stream (topics joined by eos), no BOS; "
                            "chosen by select_prompts() for clear top-1 margins under the bases"},
        "stats": {
            "top1_agreement_quant_vs_base": round(agree, 4),
            "mean_kl_base_to_quant": round(kl, 6),
            "base_top2_margin_min": round(margin.min().item(), 4),
            "base_top2_margin_median": round(margin.median().item(), 4),
        },
    }
    with open(os.path.join(exp_dir, "fixture.json"), "w") as fh:
        json.dump(info, fh, indent=1, sort_keys=False)
        fh.write("\n")
    return info


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--only", nargs="*", default=None, help="fixture names to (re)generate")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on this shared 2-core machine 2 OpenMP "
                         "threads ran training ~5x SLOWER than 1 whenever other jobs were running)")
    ap.add_argument("--retrain", action="store_true", help="retrain bases even with --only")
    args = ap.parse_args(argv)

    t_start = time.time()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    import gptqmodel
    import tokenizers
    import transformers

    versions = {
        "torch": torch.__version__, "gptqmodel": gptqmodel.__version__,
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "python": sys.version.split()[0],
    }
    log(f"versions {versions}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    names = list(FIXTURES) if not args.only else args.only
    for n in names:
        if n not in FIXTURES:
            ap.error(f"unknown fixture {n}; known: {list(FIXTURES)}")
    needed_bases = sorted({FIXTURES[n][0] for n in names} | set(PROMPT_SELECTION_BASES))

    tokenizer = build_tokenizer()
    stream = token_stream(tokenizer)
    calib = calibration(stream)
    log(f"tokenizer vocab {len(tokenizer)}, corpus {len(stream)} tokens, {len(calib)} calibration samples")

    timings, base_info, results = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="gptq_fixtures_") as tmp:
        base_dirs = {b: os.path.join(out if BASES[b].get("keep", True) else tmp, b) for b in needed_bases}
        for b in needed_bases:
            bdir = base_dirs[b]
            if args.only and not args.retrain and os.path.exists(os.path.join(bdir, "model.safetensors")):
                log(f"reusing {bdir}")
                continue
            t = time.time()
            base_info[b] = train_base(b, BASES[b], tokenizer, stream, bdir)
            verify_base(bdir, BASES[b])
            timings[b] = round(time.time() - t, 1)

        prompts = select_prompts(tokenizer, stream, [base_dirs[b] for b in PROMPT_SELECTION_BASES])
        log(f"prompts: {json.dumps(prompts)}")

        for n in names:
            b, qkw = FIXTURES[n]
            qkw = effective_qkw(qkw)
            qdtype = BASES[b]["quant_dtype"]
            bdir, fx_dir = base_dirs[b], os.path.join(out, n)
            t = time.time()
            log(f"=== {n}: {qkw} on {b} (quantize load dtype {qdtype or 'auto'})")
            try:
                written = quantize_one(n, bdir, qkw, qdtype, calib, os.path.join(tmp, "q-" + n), fx_dir)
                log(f"{n}: GPTQModel wrote {written}")
                facts = verify_fixture(n, fx_dir, BASES[b], qkw)
                with open(os.path.join(bdir, "training.json")) as fh:
                    training = json.load(fh)
                extra = {"quantize_load_dtype": qdtype or "auto (GPTQModel CPU default: bfloat16)",
                         "base_committed": BASES[b].get("keep", True),
                         "base_training": training,
                         "gptqmodel_wrote": written, "checks": facts,
                         "calibration": {"samples": len(calib), "tokens_each": CALIB_LEN,
                                         "source": f"evenly spaced windows of the first {TRAIN_TOKENS} "
                                                   "pydoc tokens (the memorised slice)"}}
                info = write_expected(n, bdir, fx_dir, qkw, {k: v for k, v in prompts.items() if k != "ids"},
                                      prompts["ids"], versions, extra)
                results[n] = {"ok": True, **info["stats"], "checks": facts}
            except Exception as e:  # record and move on
                traceback.print_exc()
                results[n] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                shutil.rmtree(fx_dir, ignore_errors=True)
            timings[n] = round(time.time() - t, 1)
            log(f"{n}: {results[n]} ({timings[n]}s)")

    total = round(time.time() - t_start, 1)
    log(f"bases: {base_info}")
    log("results:\n" + json.dumps(results, indent=1))
    log(f"timings (s): {timings}; total {total}s")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
