#!/usr/bin/env python
"""Train the project's demo model: a small Qwen3ForCausalLM that speaks about Python.

The text is the Python reference documentation that ships with every CPython install,
``pydoc_data.topics.topics`` (79 topics, ~465K characters), so nothing is downloaded.

Run from the repository root with the project venv (torch CPU + transformers)::

    .venv/bin/python tools/train_demo_model.py --out models/qwen3-pydoc            # ~30 min
    .venv/bin/python tools/train_demo_model.py --out /tmp/x --minutes 2             # smoke run

then quantize it with ``tools/quantize_demo_model.py`` (GPTQModel, separate venv).

What it does
============
1. Split: six whole topics (``HELDOUT_TOPICS``, ~5% of the characters) are held out. They were
   chosen among the topics whose paragraphs appear nowhere else in ``topics`` (several topics,
   e.g. "compound", contain the text of others verbatim), so the held-out text is really unseen.
   It is written to ``<out>/heldout.txt`` (topics separated by a blank line) for perplexity
   checks; ``<out>/heldout.json`` holds the same texts as a list, one per topic.
2. Tokenizer: byte-level BPE (HF ``tokenizers``), vocab 4096, trained on the training topics
   only. Special tokens ``<|endoftext|>`` (id 0, bos = eos), ``<|im_start|>`` (1), ``<|im_end|>``
   (2), ``<|pad|>`` (3, pad); a ChatML chat template (``<|im_start|>role\\n...<|im_end|>\\n``).
3. Training data: the training topics as one token stream (sorted keys, each topic followed
   by ``<|endoftext|>``), plus ChatML conversations built from the documentation's own section
   headings ("What is <heading>?" -> the first paragraphs of that section, ending in
   ``<|im_end|>``), so that /v1/chat/completions answers in the docs' style. Random windows of
   ``--seq`` tokens are drawn from the concatenation (seeded).
4. Model: Qwen3ForCausalLM, hidden 256, 4 layers, 4 query heads / 2 KV heads of head_dim 64
   (TP=2 divides both), intermediate 768, tied embeddings (as Qwen3-1.7B), max positions 1024.
   Every linear layer's input dim (256, 768) is a multiple of 128, the GPTQ group size.
5. AdamW (betas 0.9/0.95, weight decay 0.1), linear warm-up then cosine decay to 10%, grad
   clip 1.0, bf16 autocast on CPU (weights and optimizer state stay float32; ~1.4x faster
   than float32 here on a quiet machine). By default the schedule runs on the clock: after
   the warm-up steps the cosine spans the rest of ``--minutes`` and training stops when the
   budget is spent, whatever the load of this shared machine; ``--steps N`` gives a
   step-based schedule instead (to replay a run exactly). ``OMP_WAIT_POLICY=PASSIVE`` is
   set before torch loads: with 2 threads on 2 busy cores, spinning OpenMP workers made steps
   2-6x slower than sleeping ones.
   Train / validation loss is logged every ``--eval-every`` steps and written to
   ``<out>/training.json``.
6. Saved in float16 (``save_pretrained``: config.json, model.safetensors, generation_config.json
   with greedy decoding and eos = [<|endoftext|>, <|im_end|>]) with the tokenizer files, then
   reloaded from disk with ``AutoModelForCausalLM`` and greedy continuations of a few prompts
   are printed and stored in ``training.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time

from pydoc_tokenizer import CHAT_TEMPLATE, encode_stream, train_bpe_tokenizer  # tools/ is on sys.path when run
from tiny_lm import lm_config, save_fp16

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB_SIZE = 4096
# Topics whose text appears nowhere else in pydoc_data.topics (checked paragraph by paragraph);
# together 23,351 of 464,970 characters (5.0%).
HELDOUT_TOPICS = ["calls", "del", "import", "raise", "return", "slicings"]
SYSTEM_PROMPT = "You are a helpful assistant who answers questions about Python."
QUESTION_TEMPLATES = ["What is {}?", "Tell me about {}.", "Explain {}.", "Describe {} in Python."]
SAMPLE_PROMPTS = [
    "The for statement",
    "A list comprehension",
    "def ",
    "The \"while\" statement is used",
    "Dictionaries",
    "An exception",
]

MODEL = dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=768, max_pos=1024)


def log(msg):
    print(f"[train_demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data
def split_topics():
    from pydoc_data.topics import topics
    keys = sorted(topics)
    for k in HELDOUT_TOPICS:
        assert k in topics, k
    train = [(k, topics[k]) for k in keys if k not in HELDOUT_TOPICS]
    held = [(k, topics[k]) for k in HELDOUT_TOPICS]
    return train, held


_HEADING = re.compile(r"^([^\n]{3,80})\n([*=\-~^])\2+\n", re.M)


def chat_examples(train_topics, rng):
    """(question, answer) pairs from the section headings of the training topics."""
    pairs, seen = [], set()
    for _, text in train_topics:
        heads = list(_HEADING.finditer(text))
        for i, m in enumerate(heads):
            title = m.group(1).strip()
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            body = text[m.end():end].strip()
            if len(body) < 80 or title in seen:
                continue
            seen.add(title)
            # first paragraphs, up to ~700 characters, cut at a paragraph boundary
            paras, ans = body.split("\n\n"), ""
            for p in paras:
                if ans and len(ans) + len(p) > 700:
                    break
                ans += ("\n\n" if ans else "") + p
            subject = title if not title.lower().startswith("the ") else title[0].lower() + title[1:]
            pairs.append((rng.choice(QUESTION_TEMPLATES).format(subject), ans))
    return pairs


def build_tokenizer(train_texts):
    return train_bpe_tokenizer(train_texts, VOCAB_SIZE, MODEL["max_pos"], CHAT_TEMPLATE)





def encode_chats(tokenizer, pairs):
    ids = []
    for q, a in pairs:
        msgs = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        ids += tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids + [tokenizer.eos_token_id]
    return ids


# ----------------------------------------------------------------------------- model
def make_model(tokenizer, seed):
    import torch

    cfg, cls = lm_config("qwen3", MODEL, len(tokenizer), True, 1000000.0, tokenizer.bos_token_id,
                         tokenizer.eos_token_id, tokenizer.pad_token_id, hidden_act="silu", attention_bias=False)
    torch.manual_seed(seed)
    return cls(cfg).float()


def eval_loss(model, windows, batch, autocast):
    import torch
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for i in range(0, len(windows), batch):
            x = windows[i: i + batch]
            out = model(input_ids=x, labels=x)
            k = x.shape[0] * (x.shape[1] - 1)
            tot += out.loss.float().item() * k
            n += k
    model.train()
    return tot / n


def windows_of(ids, seq):
    import torch
    n = (len(ids) - 1) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


def greedy(model, tokenizer, prompts, max_new_tokens):
    """Greedy continuations of each prompt, plus one chat turn ("<chat> ..." key) with SYSTEM_PROMPT.
    Shared with tools/quantize_demo_model.py, which runs it on the base and the quantized model."""
    import torch
    out = {}
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=max_new_tokens, do_sample=False)
            out[p] = tokenizer.decode(g[0, ids.shape[1]:], skip_special_tokens=False)
        msgs = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": "What is the \"for\" statement?"}]
        enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        g = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           max_new_tokens=50, do_sample=False)
        out["<chat> What is the \"for\" statement?"] = tokenizer.decode(
            g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def greedy_samples(model_dir, prompts, max_new_tokens=40):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return greedy(model, tok, prompts, max_new_tokens)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/qwen3-pydoc")
    ap.add_argument("--minutes", type=float, default=30.0, help="time budget for the training loop")
    ap.add_argument("--steps", type=int, default=None, help="fixed number of steps (overrides --minutes)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bf16", action="store_true", help="train in float32 without autocast")
    args = ap.parse_args(argv)

    import tokenizers
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    autocast = not args.no_bf16
    t_all = time.time()

    train_topics, held_topics = split_topics()
    rng = random.Random(args.seed)
    pairs = chat_examples(train_topics, rng)
    train_texts = [t for _, t in train_topics]
    tokenizer = build_tokenizer(train_texts)
    doc_ids = encode_stream(tokenizer, train_texts)
    chat_ids = encode_chats(tokenizer, pairs)
    held_ids = encode_stream(tokenizer, [t for _, t in held_topics])
    train_ids = doc_ids + chat_ids
    n_chars = sum(len(t) for t in train_texts)
    n_held = sum(len(t) for _, t in held_topics)
    log(f"train: {len(train_topics)} topics, {n_chars} chars, {len(doc_ids)} doc tokens "
        f"+ {len(chat_ids)} chat tokens ({len(pairs)} Q/A); held out: {len(held_topics)} topics, "
        f"{n_held} chars, {len(held_ids)} tokens")

    model = make_model(tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {MODEL}, vocab {len(tokenizer)}, {n_params / 1e6:.2f}M parameters; bf16 autocast {autocast}")

    data = torch.tensor(train_ids, dtype=torch.long)
    val_windows = windows_of(held_ids, args.seq)
    # fixed subset of training windows for a comparable "train" loss
    g_eval = torch.Generator().manual_seed(args.seed + 1)
    tr_starts = torch.randint(0, len(doc_ids) - args.seq - 1, (len(val_windows),), generator=g_eval).tolist()
    train_eval = torch.stack([data[s: s + args.seq] for s in tr_starts])

    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60.0
    # Without --steps the schedule runs on the clock: warm-up over the first --warmup steps, then a
    # cosine over the remaining time budget (so it always completes, whatever the machine's load).
    # The step count reached is logged; pass it as --steps to replay a run on a step schedule.
    fixed = args.steps is not None
    t_warm = [None]

    def lr_at(step, now):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        if fixed:
            prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        else:
            if t_warm[0] is None:
                t_warm[0] = now
            prog = (now - t_warm[0]) / max(1e-9, budget - (t_warm[0] - t0))
        prog = min(1.0, max(0.0, prog))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    def done(step):
        return step >= args.steps if fixed else time.time() - t0 >= budget

    history = []
    model.train()
    t0 = time.time()
    eval_time = 0.0
    step = 0
    lr = 0.0
    run_loss, run_n = 0.0, 0
    while True:
        lr = lr_at(step, time.time())
        for grp in opt.param_groups:
            grp["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([data[s: s + args.seq] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run_loss += loss.item()
        run_n += 1
        step += 1
        last = done(step)
        if step % args.eval_every == 0 or last:
            te = time.time()
            vl = eval_loss(model, val_windows, args.batch, autocast)
            tl = eval_loss(model, train_eval, args.batch, autocast)
            eval_time += time.time() - te
            el = time.time() - t0
            rec = {"step": step, "lr": round(lr, 6), "train_loss_running": round(run_loss / run_n, 4),
                   "train_loss": round(tl, 4), "val_loss": round(vl, 4), "val_ppl": round(math.exp(vl), 2),
                   "elapsed_s": round(el, 1)}
            history.append(rec)
            log(f"step {step} lr {lr:.2e} running {rec['train_loss_running']:.3f} "
                f"train {tl:.3f} val {vl:.3f} (ppl {math.exp(vl):.1f}) {el / 60:.1f} min")
            run_loss, run_n = 0.0, 0
        if last:
            break
    train_seconds = time.time() - t0

    # ---- save (float16)
    out = os.path.abspath(args.out)
    save_fp16(model, tokenizer, out, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")],
              pad_token_id=tokenizer.pad_token_id)
    with open(os.path.join(out, "heldout.txt"), "w") as fh:
        fh.write("\n\n".join(t for _, t in held_topics) + "\n")
    with open(os.path.join(out, "heldout.json"), "w") as fh:
        json.dump({"topics": HELDOUT_TOPICS, "texts": [t for _, t in held_topics]}, fh, indent=0)
        fh.write("\n")

    # ---- reload from disk and sample
    samples = greedy_samples(out, SAMPLE_PROMPTS)
    for p, s in samples.items():
        log(f"greedy {p!r} -> {s!r}")

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    fp16_val = eval_loss(reloaded, val_windows, args.batch, False)
    info = {
        "command": "tools/train_demo_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]},
        "model": MODEL, "vocab_size": len(tokenizer), "parameters": n_params,
        "data": {"train_topics": len(train_topics), "train_chars": n_chars, "train_doc_tokens": len(doc_ids),
                 "train_chat_tokens": len(chat_ids), "chat_pairs": len(pairs),
                 "heldout_topics": HELDOUT_TOPICS, "heldout_chars": n_held, "heldout_tokens": len(held_ids),
                 "val_windows": int(val_windows.shape[0])},
        "training": {"steps": step, "schedule": "steps" if fixed else f"clock ({args.minutes:g} min)",
                     "batch": args.batch, "seq": args.seq, "lr": args.lr, "warmup": args.warmup,
                     "bf16_autocast": autocast, "threads": args.threads, "seed": args.seed,
                     "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_time, 1),
                     "tokens_seen": step * args.batch * args.seq},
        "final": history[-1] if history else None,
        "saved_fp16_val_loss_fp32_compute": round(fp16_val, 4),
        "saved_fp16_val_ppl_fp32_compute": round(math.exp(fp16_val), 3),
        "history": history,
        "greedy_samples": samples,
        "total_seconds": round(time.time() - t_all, 1),
    }
    with open(os.path.join(out, "training.json"), "w") as fh:
        json.dump(info, fh, indent=1)
        fh.write("\n")
    log(f"saved {out}: {sorted(os.listdir(out))}; val ppl of the saved fp16 model (fp32 compute) "
        f"{math.exp(fp16_val):.2f}; total {info['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
