#!/usr/bin/env python
"""Train ``tests/fixtures/base-llama-bos``: a tiny Llama that, like Gemma, always sees BOS first.

The other fixtures' tokenizers add no special tokens, so nothing in the suite could tell whether
``gptq-ascend verify`` starts its chunks with BOS (issue 15: on Gemma 3 270M it did not, and reported a
perplexity 19x the true one). This model is trained only on windows that begin with ``<bos>``, the way
a BOS-trained pretrained model is, so its predictions depend on that first token.

Run from the repository root with the project venv (torch CPU + transformers, nothing downloaded)::

    .venv/bin/python tools/make_bos_fixture.py --out tests/fixtures/base-llama-bos     # ~8 min, 2 cores

What it writes (about 1.2 MB):

* a byte-level BPE tokenizer (vocab 1024) trained on the training topics of ``pydoc_data.topics``, with
  Gemma's special-token layout: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2. Its ``tokenizer.json``
  post-processor prepends ``<bos>`` (``TemplateProcessing "<bos> $A"``), and ``tokenizer_config.json``
  says ``"add_bos_token": true`` as Gemma's does; ``generation_config.json`` has ``bos_token_id`` 2;
* a LlamaForCausalLM (hidden 128, 2 layers, 4/2 heads of 32, intermediate 256, untied), trained in
  float32 on random windows of the training topics, each ``[<bos>] + 127`` text tokens, saved float16;
* ``heldout.txt``: the six topics tools/train_demo_model.py holds out (text found nowhere else in the
  topics), which ``verify`` then uses by default;
* ``training.json``: settings, and the held-out perplexity with and without BOS at the start of each
  chunk (the figure that shows the fixture needs BOS).

Seeded (not checked byte for byte across runs: training takes ~8 min on the 2-core build machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_lm import lm_config, save_fp16, train_onecycle  # noqa: E402  (tools/ is on sys.path when run)
from train_demo_model import HELDOUT_TOPICS  # noqa: E402

VOCAB_SIZE = 1024
SPECIAL = ["<pad>", "<eos>", "<bos>"]  # Gemma's ids: pad 0, eos 1, bos 2
SEQ, BATCH, STEPS, SEED = 128, 16, 1000, 5
SPEC = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, head_dim=32, max_pos=512)


def log(msg: str) -> None:
    print(f"[make_bos_fixture {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def split():
    from pydoc_data.topics import topics
    train = [topics[k] for k in sorted(topics) if k not in HELDOUT_TOPICS]
    return train, [topics[k] for k in HELDOUT_TOPICS]


def build_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # As Llama 3's tokenizer.json: byte-level offsets, then BOS in front of every sequence.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B:1",
                                      special_tokens=[("<bos>", SPECIAL.index("<bos>"))]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", model_max_length=SPEC["max_pos"],
                                   clean_up_tokenization_spaces=False)
    for i, t in enumerate(SPECIAL):
        assert fast.convert_tokens_to_ids(t) == i, t
    probe = fast("def f(): pass")["input_ids"]
    assert probe[0] == 2 and probe[1:] == fast("def f(): pass", add_special_tokens=False)["input_ids"], probe
    return fast


def windows(ids, n, gen):
    """n training windows: BOS, then SEQ - 1 tokens from a random offset (so BOS precedes arbitrary
    mid-document text, as in chunked perplexity evaluation)."""
    import torch
    starts = torch.randint(0, len(ids) - SEQ, (n,), generator=gen).tolist()
    return torch.stack([torch.cat([torch.tensor([2]), ids[s: s + SEQ - 1]]) for s in starts])


def heldout_ppl(model, ids, bos: bool) -> float:
    """Perplexity over non-overlapping chunks of SEQ - 1 text tokens, with or without BOS first."""
    import torch
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, SEQ - 1):
            piece = ids[i: i + SEQ - 1]
            if len(piece) < 2:
                break
            x = torch.cat([torch.tensor([2]), piece]) if bos else piece
            logp = model(input_ids=x[None]).logits[0, :-1].double().log_softmax(-1)
            tgt = x[1:]
            nll -= float(logp.gather(-1, tgt[:, None]).sum())
            n += tgt.numel()
    return math.exp(nll / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/base-llama-bos")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    train_texts, held_texts = split()
    tok = build_tokenizer(train_texts)
    enc = tok.backend_tokenizer.encode_batch(train_texts, add_special_tokens=False)
    stream: list[int] = []
    for e in enc:
        stream += e.ids + [1]  # topics separated by <eos>
    data = torch.tensor(stream)
    held_text = "\n\n".join(held_texts) + "\n"
    held = torch.tensor(tok(held_text, add_special_tokens=False)["input_ids"])
    log(f"tokenizer vocab {len(tok)}; train stream {len(stream)} tokens, held-out {len(held)} tokens")

    cfg, cls = lm_config("llama", SPEC, len(tok), False, 10000.0, bos=2, eos=1, pad=0)
    torch.manual_seed(SEED)
    model = cls(cfg).float()
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    final_loss = train_onecycle(model, args.steps, lambda: windows(data, BATCH, gen), log)
    train_seconds = time.time() - t0

    out = os.path.abspath(args.out)
    save_fp16(model, tok, out, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    # transformers 5 drops add_bos_token when saving a tokenizer.json-backed tokenizer; Gemma's
    # tokenizer_config.json states it, and llama.cpp's converter reads it, so state it here too.
    tc_path = os.path.join(out, "tokenizer_config.json")
    with open(tc_path) as fh:
        tc = json.load(fh)
    tc.update(add_bos_token=True, add_eos_token=False)
    with open(tc_path, "w") as fh:
        json.dump(tc, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(out, "heldout.txt"), "w") as fh:
        fh.write(held_text)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with_bos, without = heldout_ppl(reloaded, held, True), heldout_ppl(reloaded, held, False)
    log(f"held-out perplexity (float16 weights, float32 compute, chunks of {SEQ - 1} text tokens): "
        f"with BOS first {with_bos:.3f}, without {without:.3f} ({without / with_bos:.2f}x)")
    info = {"command": "tools/make_bos_fixture.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "spec": SPEC, "vocab_size": len(tok), "train_stream_tokens": len(stream),
            "heldout_topics": HELDOUT_TOPICS, "heldout_tokens": len(held),
            "training": {"steps": args.steps, "batch": BATCH, "seq": SEQ, "seed": SEED,
                         "windows": "[<bos>] + 127 text tokens from a random offset",
                         "optimizer": "AdamW lr 3e-3 OneCycle, clip 1.0, float32, saved float16",
                         "final_batch_loss": round(final_loss, 4),
                         "train_seconds": round(train_seconds, 1)},
            "heldout_ppl_with_bos": round(with_bos, 4), "heldout_ppl_without_bos": round(without, 4)}
    with open(os.path.join(out, "training.json"), "w") as fh:
        json.dump(info, fh, indent=1)
        fh.write("\n")
    log(f"wrote {out}: {sorted(os.listdir(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
