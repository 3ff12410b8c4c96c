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
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DEFAULT_THRESHOLDS = {
    "min_top1": 0.90,  # fraction of positions where both models pick the same next token
    "max_kl": 0.05,  # mean KL(ref || cand) in nats
    "min_cosine": 0.98,  # mean cosine similarity of next-token probability vectors
    "max_ppl_ratio": 1.01,  # candidate perplexity / reference perplexity (the 1% budget)
    "max_norm_ratio": 1.5,  # candidate / reference hidden-state norm at any layer
}


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
            f"tokens compared: {self.tokens}",
            f"NaN/Inf: reference {self.nonfinite_reference}, candidate {self.nonfinite_candidate}",
            "",
            "hidden-state norm per layer (mean L2 over tokens):",
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


def _load(path: str, dtype: torch.dtype, backend: str | None):
    from transformers import AutoTokenizer

    from .hf_model import load_causal_lm

    return load_causal_lm(path, dtype=dtype, backend=backend), AutoTokenizer.from_pretrained(path)


def default_text(reference: Path, candidate: Path) -> tuple[str, str]:
    """Held-out text shipped with the model if any, else the Python docs that ship with Python."""
    for folder in (reference, candidate):
        if (folder / "heldout.txt").exists():
            return (folder / "heldout.txt").read_text(encoding="utf-8"), str(folder / "heldout.txt")
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)[:6]), "pydoc_data.topics (first 6 topics)"


def _chunks(ids: list[int], length: int, limit: int) -> list[torch.Tensor]:
    out = [torch.tensor(ids[i: i + length]) for i in range(0, len(ids) - 1, length)]
    return [c for c in out if c.numel() > 1][:limit]


@torch.no_grad()
def compare(reference: str, candidate: str, text: str | None = None, seq_len: int = 128, max_chunks: int = 8,
            thresholds: dict[str, float] | None = None, backend: str | None = None,
            dtype: torch.dtype = torch.float32) -> VerifyResult:
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    ref_model, tok = _load(reference, dtype, backend)
    cand_model, _ = _load(candidate, dtype, backend)
    if text is None:
        text, _ = default_text(Path(reference), Path(candidate))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunks = _chunks(ids, seq_len, max_chunks)
    if not chunks:
        raise ValueError("verify: the text is too short to compare anything")

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
            norms = [float(h.float().norm(dim=-1).mean()) for h in hs]
            if not acc:
                acc.extend([0.0] * len(norms))
            for i, v in enumerate(norms):
                acc[i] += v / len(chunks)
        lr, lc = out_r.logits[0, :-1].double(), out_c.logits[0, :-1].double()
        nonfinite_ref += int((~torch.isfinite(lr)).sum()) + sum(int((~torch.isfinite(h)).sum())
                                                                 for h in out_r.hidden_states)
        nonfinite_cand += int((~torch.isfinite(lc)).sum()) + sum(int((~torch.isfinite(h)).sum())
                                                                  for h in out_c.hidden_states)
        lr, lc = torch.nan_to_num(lr), torch.nan_to_num(lc)
        target = chunk[1:]
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
                       norms, th)
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="compare a candidate model's behaviour with a reference (norms, top-1, KL, perplexity)",
        description="REFERENCE is the unquantized model or the GPTQ checkpoint; CANDIDATE is a converted "
                    "checkpoint or a GPTQ checkpoint (run online through the op backends). Exit status 0 "
                    "only when every threshold holds.",
    )
    p.add_argument("reference", help="reference model folder")
    p.add_argument("candidate", help="candidate model folder")
    p.add_argument("--text", type=Path, help="held-out text file (default: heldout.txt beside a model, "
                                             "else Python's own pydoc topics)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per chunk (default 128)")
    p.add_argument("--max-chunks", type=int, default=8, help="chunks of text to compare (default 8)")
    p.add_argument("--backend", default=None, help="op backend for GPTQ layers (default: best available)")
    for key, value in DEFAULT_THRESHOLDS.items():
        p.add_argument("--" + key.replace("_", "-"), type=float, default=value,
                       help=f"threshold (default {value})")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    thresholds = {k: getattr(args, k) for k in DEFAULT_THRESHOLDS}
    text = args.text.read_text(encoding="utf-8") if args.text else None
    res = compare(args.reference, args.candidate, text, args.seq_len, args.max_chunks, thresholds, args.backend)
    print(res.text())
    if args.json:
        args.json.write_text(json.dumps(res.to_dict(), indent=2) + "\n")
    sys.stdout.flush()
    return 0 if res.ok else 2
