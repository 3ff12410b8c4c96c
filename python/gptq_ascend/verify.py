"""`gptq-ascend verify REFERENCE CANDIDATE`: does the candidate still behave like the reference?

The checks an earlier deployment attempted, done right: the candidate is compared with an independent
reference (the unquantized model, or the GPTQ checkpoint itself), never with itself. Reported:

* NaN/Inf anywhere in hidden states or logits;
* per-layer hidden-state norms side by side, flagging growth the reference does not show (the
  int8-view mistake's signature: norms growing ~1.4x per layer);
* over every position of held-out text: top-1 agreement, cosine similarity of the next-token
  probability vectors, KL(reference || candidate);
* perplexity of both on that text.

Exit status 0 only when every threshold holds. A GPTQ checkpoint (config with quantization_config)
is run "online": its quantized layers go through the same op backends as the vLLM plugin.

Every chunk starts the way the model's tokenizer starts a sequence (:func:`chunk_rule`): a model
trained with BOS first and measured without it is far off its distribution (issue 15: Gemma 3 270M
measured 19x its true perplexity, and a good conversion failed the ratio).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import GPTQAscendError

DEFAULT_THRESHOLDS = {
    "min_top1": 0.90,  # fraction of positions where both models pick the same next token
    "max_kl": 0.05,  # mean KL(ref || cand) in nats
    "min_cosine": 0.98,  # mean cosine similarity of next-token probability vectors
    "max_ppl_ratio": 1.01,  # candidate perplexity / reference perplexity (the 1% budget)
    "max_norm_ratio": 1.5,  # candidate / reference hidden-state norm at any layer
}
DEFAULT_TEXT_SOURCE = "pydoc_data.topics (first 6 topics)"
DEFAULT_TEXT_WARNING = ("this is the built-in default text, Python's pydoc topics, a common calibration "
                        "source: if the candidate was calibrated on it, the figures flatter the candidate. "
                        "Pass --text FILE with text it was not calibrated on.")
# The files transformers builds a tokenizer from (fast, SentencePiece, BPE vocab/merges, tiktoken).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                    "merges.txt", "vocab.txt", "tiktoken.model", "qwen.tiktoken")


class VerifyError(GPTQAscendError):
    """verify was given something it cannot measure (a missing folder, no tokenizer, too little text)."""


@dataclass(frozen=True)
class ChunkRule:
    """The token ids every chunk of text starts with (BOS, or nothing) and why.

    :func:`chunk_rule` decides; anything that feeds a model token ids it built itself (verify, the
    benchmarks) should put ``prefix`` first, as the model's own tokenizer would.
    """

    prefix: tuple[int, ...]
    reason: str
    notes: tuple[str, ...] = ()

    @property
    def bos_id(self) -> int | None:
        return self.prefix[0] if len(self.prefix) == 1 else None

    def describe(self, seq_len: int, count: int | None = None) -> str:
        size = f"{count} x {seq_len} tokens" if count is not None else f"{seq_len} tokens"
        if not self.prefix:
            return f"chunks: {size}, no BOS: nothing prepended ({self.reason})"
        what = f"BOS id {self.bos_id}" if self.bos_id is not None else f"ids {list(self.prefix)}"
        return (f"chunks: {size}, {what} prepended to {seq_len - len(self.prefix)} tokens of text each "
                f"({self.reason})")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise VerifyError(f"{path}: not valid UTF-8 JSON ({type(e).__name__}): expected a JSON object") from None
    if not isinstance(data, dict):
        raise VerifyError(f"{path}: is a JSON {type(data).__name__}, expected a JSON object")
    return data


def _int_or_none(v: object) -> int | None:
    # generation_config / config may hold a list (several eos ids) or null; only a single id is a BOS id
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def load_tokenizer(folder: str | Path):
    """The folder's own tokenizer (never downloaded), or None when it has no tokenizer files."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        raise VerifyError(f"{folder}: its tokenizer files cannot be loaded "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _added_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before the text when asked for special tokens (what
    ``tokenizer(text)`` in transformers and vLLM's /v1/completions feed the model)."""
    probe = "The quick brown fox"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k: k + len(plain)] == plain:
            return list(full[:k])
    bos = tokenizer.bos_token_id  # the tokenizer rewrote the text's first token too: keep only a BOS
    return [bos] if bos is not None and full[:1] == [bos] and plain[:1] != [bos] else []


def chunk_rule(folder: str | Path, tokenizer=None) -> ChunkRule:
    """Whether chunks of ``folder``'s model start with BOS, which id, and why (docs/notes/issue-15).

    Whether, in order:
    1. ``add_bos_token`` (a JSON boolean) in tokenizer_config.json, when present: the model author's
       statement, read by transformers 4's Llama/Gemma tokenizers and by llama.cpp's GGUF converter,
       both of which let it override the tokenizer.json template (transformers 5 ignores it when a
       tokenizer.json exists; a disagreement is reported in ``notes``);
    2. else what the tokenizer itself prepends with special tokens on (tokenizer.json's post-processor,
       or the tokenizer class's default), as ``tokenizer(text)`` and vLLM's completions do.
    Which id: the one the tokenizer prepends; else the tokenizer's ``bos_token``; else ``bos_token_id``
    in generation_config.json, then config.json. ``bos_token_id`` in those files alone never means
    "prepend": Qwen3's configs name one that its pretraining never put first.
    """
    folder = Path(folder)
    tc_path, gc_path, cfg_path = (folder / n for n in ("tokenizer_config.json", "generation_config.json",
                                                       "config.json"))
    tc, gc, cfg = _read_json(tc_path), _read_json(gc_path), _read_json(cfg_path)
    if tokenizer is None:
        tokenizer = load_tokenizer(folder)
    added = _added_prefix(tokenizer) if tokenizer is not None else []
    flag = tc.get("add_bos_token")
    flag = flag if isinstance(flag, bool) else None
    gc_bos = _int_or_none(gc.get("bos_token_id"))
    notes: list[str] = []
    if added and gc_bos is not None and added[:1] != [gc_bos]:
        notes.append(f"generation_config.json has bos_token_id {gc_bos}, the tokenizer prepends {added[0]}; "
                     "the tokenizer's id is used")

    if flag is False:
        if added:
            notes.append(f"the tokenizer prepends {added} but tokenizer_config.json says add_bos_token false; "
                         "the flag is followed (as llama.cpp and transformers 4 do; transformers 5 and so "
                         "vLLM with it would prepend)")
        return ChunkRule((), "tokenizer_config.json: add_bos_token false", tuple(notes))
    if flag is None:
        if added:
            return ChunkRule(tuple(added), "the tokenizer prepends it", tuple(notes))
        why = "no tokenizer files" if tokenizer is None else "the tokenizer adds no BOS"
        if gc_bos is not None:
            why += f"; generation_config.json's bos_token_id {gc_bos} is only a start token for generation"
        return ChunkRule((), why, tuple(notes))
    # add_bos_token true
    if added:
        return ChunkRule(tuple(added), "the tokenizer prepends it; tokenizer_config.json: add_bos_token true",
                         tuple(notes))
    candidates = [(tokenizer.bos_token_id if tokenizer is not None else None, "the tokenizer's bos_token"),
                  (gc_bos, "generation_config.json bos_token_id"),
                  (_int_or_none(cfg.get("bos_token_id")), "config.json bos_token_id")]
    for bos, source in candidates:
        if bos is not None:
            if tokenizer is not None:
                notes.append("tokenizer_config.json says add_bos_token true but this transformers' tokenizer "
                             "does not prepend it (nor will vLLM with it): BOS is prepended here as the flag "
                             "asks (llama.cpp and transformers 4 follow the flag)")
            return ChunkRule((bos,), f"tokenizer_config.json: add_bos_token true; id from {source}",
                             tuple(notes))
    raise VerifyError(f"{tc_path}: add_bos_token is true but no BOS id is defined: expected a bos_token in "
                      f"the tokenizer or bos_token_id in {gc_path.name} or {cfg_path.name}")


def make_chunks(ids: list[int], seq_len: int, limit: int, rule: ChunkRule) -> list[torch.Tensor]:
    """Up to ``limit`` chunks of ``seq_len`` ids: ``rule.prefix`` then consecutive text ids.

    With a prefix every text token is a target exactly once (the prefix predicts the first one);
    without, each chunk's first token is context only, as before issue 15.
    """
    body = seq_len - len(rule.prefix)
    if body < 2:
        raise VerifyError(f"--seq-len {seq_len}: expected at least {len(rule.prefix) + 2} "
                          f"(the {len(rule.prefix)} prefix token(s) and two tokens of text)")
    pre = list(rule.prefix)
    out = []
    for i in range(0, len(ids), body):
        piece = ids[i: i + body]
        if len(piece) >= (1 if pre else 2):
            out.append(torch.tensor(pre + piece))
    return out[:limit]


@dataclass
class LayerNorms:
    layer: int
    reference: float
    candidate: float

    @property
    def ratio(self) -> float:
        return self.candidate / self.reference if self.reference else math.inf


@dataclass
class VerifyResult:
    reference: str
    candidate: str
    tokens: int
    nonfinite_reference: int
    nonfinite_candidate: int
    top1_agreement: float
    mean_cosine: float
    mean_kl: float
    ppl_reference: float
    ppl_candidate: float
    norms: list[LayerNorms]
    thresholds: dict[str, float]
    text_source: str = ""
    text_is_default: bool = False
    chunking: str = ""
    chunk_prefix: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_candidate / self.ppl_reference

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"], d["ppl_ratio"] = self.ok, self.ppl_ratio
        return d

    def text(self) -> str:
        t = self.thresholds
        lines = [
            f"reference: {self.reference}",
            f"candidate: {self.candidate}",
            f"text: {self.text_source}",
        ]
        if self.text_is_default:
            lines.append(f"warning: {DEFAULT_TEXT_WARNING}")
        lines += [
            self.chunking,
            *(f"note: {n}" for n in self.notes),
            f"tokens compared: {self.tokens}",
            f"NaN/Inf: reference {self.nonfinite_reference}, candidate {self.nonfinite_candidate}",
            "",
            "hidden-state norm per layer (mean L2 over text tokens):",
            f"  {'layer':>5}  {'reference':>12}  {'candidate':>12}  {'ratio':>8}",
        ]
        for n in self.norms:
            flag = "  <-- grows" if n.ratio > t["max_norm_ratio"] or n.ratio < 1 / t["max_norm_ratio"] else ""
            lines.append(f"  {n.layer:>5}  {n.reference:>12.4g}  {n.candidate:>12.4g}  {n.ratio:>8.3f}{flag}")
        lines += [
            "",
            f"top-1 agreement : {self.top1_agreement:.4f}   (>= {t['min_top1']})",
            f"mean cosine     : {self.mean_cosine:.6f} (>= {t['min_cosine']})",
            f"mean KL (nats)  : {self.mean_kl:.6f} (<= {t['max_kl']})",
            f"perplexity      : reference {self.ppl_reference:.4f}, candidate {self.ppl_candidate:.4f}, "
            f"ratio {self.ppl_ratio:.4f} (<= {t['max_ppl_ratio']})",
            "",
            "PASS" if self.ok else "FAIL: " + "; ".join(self.failures),
        ]
        return "\n".join(lines)


def check_model_folder(path: str | Path, role: str) -> Path:
    """``path`` as a local model folder, or a one-line :class:`VerifyError` saying what is wrong."""
    p = Path(path)
    expected = "expected a local model folder (config.json, safetensors weights, tokenizer files); " \
               "verify reads only local files and downloads nothing"
    if not p.exists():
        raise VerifyError(f"{role} {p} does not exist: {expected}")
    if not p.is_dir():
        raise VerifyError(f"{role} {p} is not a folder: {expected}")
    if not (p / "config.json").is_file():
        raise VerifyError(f"{role} {p} has no config.json: {expected}")
    return p


def default_text(reference: Path, candidate: Path) -> tuple[str, str]:
    """Held-out text shipped with the model if any, else the Python docs that ship with Python."""
    for folder in (reference, candidate):
        if (folder / "heldout.txt").exists():
            return (folder / "heldout.txt").read_text(encoding="utf-8"), str(folder / "heldout.txt")
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)[:6]), DEFAULT_TEXT_SOURCE


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: the whole text is longer than model_max_length by design (it is cut into chunks)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


@torch.no_grad()
def compare(reference: str, candidate: str, text: str | None = None, seq_len: int = 128, max_chunks: int = 8,
            thresholds: dict[str, float] | None = None, backend: str | None = None,
            dtype: torch.dtype = torch.float32, text_source: str | None = None) -> VerifyResult:
    from .hf_model import load_causal_lm

    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    ref_dir = check_model_folder(reference, "REFERENCE")
    cand_dir = check_model_folder(candidate, "CANDIDATE")
    if max_chunks < 1:
        raise VerifyError(f"--max-chunks {max_chunks}: expected at least 1")
    if text is None:
        text, text_source = default_text(ref_dir, cand_dir)
    text_source = text_source or "text given by the caller"
    tok_dir = ref_dir
    tok = load_tokenizer(ref_dir)
    cand_tok = load_tokenizer(cand_dir)
    if tok is None:
        tok, tok_dir = cand_tok, cand_dir
    if tok is None:
        raise VerifyError(f"neither {ref_dir} nor {cand_dir} has tokenizer files ({', '.join(_TOKENIZER_FILES)}): "
                          "verify needs the model's tokenizer to turn the text into token ids")
    rule = chunk_rule(tok_dir, tok)
    ids = _encode(tok, text)
    notes = list(rule.notes)
    if cand_tok is not None and tok_dir == ref_dir:
        # Both models are fed the reference's ids. A candidate whose tokenizer reads the text into other
        # ids has another vocabulary mapping: nothing measured here would describe it.
        cand_ids = _encode(cand_tok, text)
        if cand_ids != ids:
            where = next((i for i, (a, b) in enumerate(zip(ids, cand_ids, strict=False)) if a != b),
                         min(len(ids), len(cand_ids)))
            raise VerifyError(f"the tokenizers of {ref_dir} and {cand_dir} disagree on the text (token ids "
                              f"differ from position {where}): expected the candidate to carry the "
                              "reference's tokenizer files")
        cand_rule = chunk_rule(cand_dir, cand_tok)
        if cand_rule.prefix != rule.prefix:
            notes.append(f"the candidate's tokenizer files start a sequence with {list(cand_rule.prefix)} "
                         f"({cand_rule.reason}), the reference's with {list(rule.prefix)}: both models are "
                         "measured the reference's way, but a server would feed the candidate its own way")
    chunks = make_chunks(ids, seq_len, max_chunks, rule)
    if not chunks:
        raise VerifyError(f"{text_source}: {len(ids)} tokens, too short to compare anything")
    p = len(rule.prefix)
    first = max(p, 1)  # index of the first target token in a chunk
    ref_model = load_causal_lm(ref_dir, dtype=dtype, backend=backend)
    cand_model = load_causal_lm(cand_dir, dtype=dtype, backend=backend)

    tokens = agree = 0
    cos_sum = kl_sum = nll_ref = nll_cand = 0.0
    nonfinite_ref = nonfinite_cand = 0
    norm_ref: list[float] = []
    norm_cand: list[float] = []
    for chunk in chunks:
        x = chunk.unsqueeze(0)
        out_r = ref_model(x, output_hidden_states=True)
        out_c = cand_model(x, output_hidden_states=True)
        for hs, acc in ((out_r.hidden_states, norm_ref), (out_c.hidden_states, norm_cand)):
            # text positions only: a BOS position often carries activations orders of magnitude larger
            # (attention sinks) that would dominate the mean and hide growth on the text
            norms = [float(h[:, p:].float().norm(dim=-1).mean()) for h in hs]
            if not acc:
                acc.extend([0.0] * len(norms))
            for i, v in enumerate(norms):
                acc[i] += v / len(chunks)
        lr, lc = out_r.logits[0, first - 1:-1].double(), out_c.logits[0, first - 1:-1].double()
        nonfinite_ref += int((~torch.isfinite(lr)).sum()) + sum(int((~torch.isfinite(h)).sum())
                                                                 for h in out_r.hidden_states)
        nonfinite_cand += int((~torch.isfinite(lc)).sum()) + sum(int((~torch.isfinite(h)).sum())
                                                                  for h in out_c.hidden_states)
        lr, lc = torch.nan_to_num(lr), torch.nan_to_num(lc)
        target = chunk[first:]
        logp_r, logp_c = lr.log_softmax(-1), lc.log_softmax(-1)
        p_r, p_c = logp_r.exp(), logp_c.exp()
        tokens += target.numel()
        agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
        cos_sum += float(torch.nn.functional.cosine_similarity(p_r, p_c, dim=-1).sum())
        kl_sum += float((p_r * (logp_r - logp_c)).sum(-1).sum())
        nll_ref -= float(logp_r.gather(-1, target[:, None]).sum())
        nll_cand -= float(logp_c.gather(-1, target[:, None]).sum())

    norms = [LayerNorms(i, r, c) for i, (r, c) in enumerate(zip(norm_ref, norm_cand, strict=True))]
    res = VerifyResult(reference, candidate, tokens, nonfinite_ref, nonfinite_cand, agree / tokens,
                       cos_sum / tokens, kl_sum / tokens, math.exp(nll_ref / tokens), math.exp(nll_cand / tokens),
                       norms, th, text_source=f"{text_source}, {len(text):,} characters, {len(ids):,} tokens",
                       text_is_default=text_source == DEFAULT_TEXT_SOURCE,
                       chunking=rule.describe(seq_len, len(chunks)),
                       chunk_prefix=list(rule.prefix), notes=notes)
    if nonfinite_cand:
        res.failures.append(f"{nonfinite_cand} NaN/Inf values in the candidate")
    grown = [n.layer for n in norms if not (1 / th["max_norm_ratio"] <= n.ratio <= th["max_norm_ratio"])]
    if grown:
        res.failures.append(f"hidden-state norms diverge from the reference at layer(s) {grown} "
                            f"(ratio up to {max(norms, key=lambda n: abs(math.log(n.ratio or 1e-30))).ratio:.3g})")
    if res.top1_agreement < th["min_top1"]:
        res.failures.append(f"top-1 agreement {res.top1_agreement:.3f} < {th['min_top1']}")
    if res.mean_cosine < th["min_cosine"]:
        res.failures.append(f"mean cosine {res.mean_cosine:.4f} < {th['min_cosine']}")
    if res.mean_kl > th["max_kl"]:
        res.failures.append(f"mean KL {res.mean_kl:.4g} > {th['max_kl']}")
    if res.ppl_ratio > th["max_ppl_ratio"]:
        res.failures.append(f"perplexity ratio {res.ppl_ratio:.4f} > {th['max_ppl_ratio']}")
    return res


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VerifyError(f"--text {path} does not exist: expected a UTF-8 text file") from None
    except IsADirectoryError:
        raise VerifyError(f"--text {path} is a folder: expected a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise VerifyError(f"--text {path}: not UTF-8 (byte {e.start}): expected a UTF-8 text file") from None
    except OSError as e:
        raise VerifyError(f"--text {path}: cannot be read ({e.strerror}): expected a UTF-8 text file") from None


def run(args: argparse.Namespace) -> int:
    """The `verify` command on the arguments cli.py parsed (cli.py owns every command's arguments)."""
    thresholds = {k: getattr(args, k) for k in DEFAULT_THRESHOLDS}
    check_model_folder(args.reference, "REFERENCE")
    check_model_folder(args.candidate, "CANDIDATE")
    text = _read_text(args.text) if args.text else None
    res = compare(args.reference, args.candidate, text, args.seq_len, args.max_chunks, thresholds, args.backend,
                  text_source=str(args.text) if args.text else None)
    print(res.text())
    if args.json:
        args.json.write_text(json.dumps(res.to_dict(), indent=2) + "\n")
    sys.stdout.flush()
    return 0 if res.ok else 2
