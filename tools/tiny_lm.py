"""The tiny causal language models the tools build, and the folders they are written to: the model config,
the AdamW training loop tools/make_fixtures.py and tools/make_bos_fixture.py share, saving a model in
float16, and replacing a folder with chosen files of another.

torch + transformers only (imported inside the functions), so it imports in the project venv
(train_demo_model.py, make_bos_fixture.py) and in the GPTQModel venv (make_fixtures.py,
quantize_demo_model.py) alike. A refactoring of code those scripts had each written out: it changes
none of the numbers they produce (same calls in the same order, so the seeded runs stay
bit-identical; docs/notes/issue-12-structure.md, session 5)."""

from __future__ import annotations

import os
import shutil
import time


def lm_config(arch: str, sizes: dict, vocab_size: int, tie: bool, rope_theta: float, bos: int, eos: int,
              pad: int, **extra):
    """(config, model class) of a Qwen3 (``arch="qwen3"``) or Llama causal LM. ``sizes`` holds hidden,
    intermediate, layers, heads, kv_heads, head_dim and max_pos; ``extra`` goes to the config as is."""
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=sizes["hidden"],
        intermediate_size=sizes["intermediate"],
        num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["kv_heads"],
        head_dim=sizes["head_dim"],
        max_position_embeddings=sizes["max_pos"],
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
        rope_theta=rope_theta,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        **extra,
    )
    if arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM
        return Qwen3Config(**kw), Qwen3ForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaConfig(**kw), LlamaForCausalLM


def train_onecycle(model, steps: int, next_batch, log, lr: float = 3e-3) -> float:
    """Train ``model`` (float32) for ``steps`` AdamW steps (no weight decay) on a one-cycle schedule
    peaking at ``lr`` (10% warm-up), gradients clipped to 1.0; ``next_batch()`` gives each step's input
    ids (labels = inputs). Logs the loss every 100 steps through ``log``; returns the last batch loss."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    # Without this, training slows down ~10x after a few hundred steps (denormals in Adam state).
    torch.set_flush_denormal(True)
    t0 = time.time()
    for step in range(steps):
        x = next_batch()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    torch.set_flush_denormal(False)
    return float(loss.item())


def replace_dir(path: str) -> None:
    """An empty folder at ``path``, whatever was there before."""
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)


def save_fp16(model, tokenizer, out_dir: str, **generation) -> None:
    """Replace ``out_dir`` with ``model`` in float16 (eval mode, safetensors), a generation_config.json of
    ``generation`` (token ids) with greedy decoding, and the tokenizer's files."""
    from transformers import GenerationConfig

    model = model.eval().half()
    model.generation_config = GenerationConfig(**generation, do_sample=False)
    replace_dir(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def copy_named(src: str, dst: str, names) -> list[str]:
    """Copy the files of ``src`` whose names are in ``names`` into ``dst``; returns what was copied."""
    copied = [f for f in sorted(os.listdir(src)) if f in names]
    for f in copied:
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return copied
