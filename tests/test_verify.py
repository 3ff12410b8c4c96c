"""`gptq-ascend verify` against the unquantized base model the fixtures were quantized from."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptq_ascend import format as fmt
from gptq_ascend.convert import convert
from gptq_ascend.verify import VerifyError, chunk_rule

from .conftest import FIXTURES

INT8 = FIXTURES / "qwen3-int8-g128-sym"
BASE = FIXTURES / "base-qwen3"
# A tiny Llama trained only on windows that start with <bos> (id 2), its tokenizer adding it as
# Gemma's does (tools/make_bos_fixture.py); heldout.txt holds text it never saw.
BOS_BASE = FIXTURES / "base-llama-bos"
pytestmark = pytest.mark.skipif(not (INT8.exists() and BASE.exists() and BOS_BASE.exists()),
                                reason="needs the fixtures qwen3-int8-g128-sym, base-qwen3 and base-llama-bos")


def int8_view_dequant(t, spec, k, dtype):
    """The earlier deployment's converter: bytes read as int8, zero point ignored."""
    g = t.g_idx.long()
    return (t.qweight.t().contiguous().view(torch.int8).float() * t.scales.float()[g].t()).to(dtype)


def run_verify(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "gptq_ascend", "verify", *map(str, args)],
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def test_gptq_online_and_converted_pass_against_the_base(tmp_path):
    rc, out = run_verify(BASE, INT8, "--json", tmp_path / "online.json")
    assert rc == 0, out
    assert "PASS" in out and "top-1 agreement" in out and "perplexity" in out
    # Qwen-style tokenizer: no BOS, though generation_config.json names a bos_token_id
    assert "chunks: 8 x 128 tokens, no BOS" in out, out
    # no heldout.txt beside these models: the built-in default text, named and warned about
    assert "text: pydoc_data.topics" in out and "warning: this is the built-in default text" in out, out
    converted = tmp_path / "fp16"
    convert(INT8, converted)
    rc, out = run_verify(INT8, converted)
    assert rc == 0, out


def test_the_int8_view_conversion_fails_with_the_explosion_visible(tmp_path):
    wrong = tmp_path / "wrong"
    convert(INT8, wrong, dequant_fn=int8_view_dequant)
    rc, out = run_verify(BASE, wrong)
    assert rc == 2, out
    assert "FAIL" in out
    assert "<-- grows" in out and "hidden-state norms diverge" in out
    assert "top-1 agreement" in out


def test_verify_help():
    rc, out = run_verify("--help")
    assert rc == 0 and "--max-kl" in out and "--min-top1" in out and Path(BASE).exists()


DEMO = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.skipif(not (DEMO / "qwen3-pydoc-gptq-int8").exists(), reason="demo model not in this checkout")
def test_demo_model_online_is_within_one_percent_perplexity_of_the_original():
    rc, out = run_verify(DEMO / "qwen3-pydoc", DEMO / "qwen3-pydoc-gptq-int8", "--max-chunks", "12",
                         "--max-ppl-ratio", "1.01", "--min-top1", "0.97")
    assert rc == 0, out


# ----------------------------------------------------------------------------- BOS (issue 15)
def _text_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def _bos_chunks(tok, text: str, seq_len: int, count: int) -> list[torch.Tensor]:
    """What the tokenizer feeds a model: <bos> then text; every text token is predicted once."""
    ids, bos = _text_ids(tok, text), tok.bos_token_id
    return [torch.tensor([bos] + ids[i: i + seq_len - 1]) for i in range(0, len(ids), seq_len - 1)][:count]


def _ppl_float64(model, chunks: list[torch.Tensor]) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for c in chunks:
            logp = model(input_ids=c[None]).logits[0, :-1].double().log_softmax(-1)
            nll -= float(logp.gather(-1, c[1:, None]).sum())
            n += c.numel() - 1
    return math.exp(nll / n)


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _rtn_gptq(base: Path, out: Path, bits: int = 8, group: int = 128) -> dict[str, torch.Tensor]:
    """A GPTQ (v1, sym) checkpoint of ``base`` by round-to-nearest, written to ``out``; returns the
    dequantized weights ``(q - z) * s`` in float64, computed here from the codes chosen here."""
    state = load_file(base / "model.safetensors")
    maxq, zero = 2 ** bits - 1, 2 ** (bits - 1)
    spec = fmt.QuantSpec(bits, group, True, False, "gptq")
    tensors, dequant = {}, {}
    for name, t in state.items():
        module = name.removesuffix(".weight")
        if not module.endswith(LINEARS):
            tensors[name] = t
            continue
        w = t.double().t()  # [K, N], GPTQ layout
        k, n = w.shape
        wg = w.reshape(k // group, group, n)
        scale = (2 * wg.abs().amax(dim=1) / maxq).clamp_min(1e-8).half()  # [G, N], stored float16
        s = scale.double().repeat_interleave(group, dim=0)
        q = (w / s).round().add(zero).clamp(0, maxq).to(torch.int32)
        tensors[module + ".qweight"] = fmt.pack(q, bits, 0)
        tensors[module + ".qzeros"] = fmt.pack_zeros(torch.full((k // group, n), zero, dtype=torch.int32), spec)
        tensors[module + ".scales"] = scale
        tensors[module + ".g_idx"] = fmt.default_g_idx(k, group)
        dequant[name] = ((q - zero).double() * s).t().contiguous()
    out.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": True,
                                  "desc_act": False, "checkpoint_format": "gptq", "lm_head": False}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(base / f, out / f)
    return dequant


def test_bos_model_chunks_start_with_bos_and_perplexities_match_transformers(tmp_path):
    """Issue 15: a model trained with BOS first must be measured with BOS first. verify's figures are
    checked against transformers run here in float64 on <bos>-prefixed chunks of heldout.txt, for the
    reference and for a GPTQ-Int8 candidate run online (its float64 weights dequantized here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BOS_BASE)
    assert tok("x")["input_ids"][0] == tok.bos_token_id == 2  # the fixture is what it claims
    cand = tmp_path / "gptq-int8"
    dequant = _rtn_gptq(BOS_BASE, cand)
    rc, out = run_verify(BOS_BASE, cand, "--json", tmp_path / "v.json")
    res = json.loads((tmp_path / "v.json").read_text())

    text = (BOS_BASE / "heldout.txt").read_text(encoding="utf-8")
    chunks = _bos_chunks(tok, text, 128, 8)
    ref = AutoModelForCausalLM.from_pretrained(BOS_BASE, dtype=torch.float64).eval()
    ppl_ref = _ppl_float64(ref, chunks)
    sd = ref.state_dict()
    sd.update(dequant)
    ref.load_state_dict(sd)
    ppl_cand = _ppl_float64(ref, chunks)

    assert res["tokens"] == sum(c.numel() - 1 for c in chunks) == 8 * 127
    assert res["ppl_reference"] == pytest.approx(ppl_ref, rel=2e-4), out
    assert res["ppl_candidate"] == pytest.approx(ppl_cand, rel=2e-4), out
    assert res["ppl_ratio"] == pytest.approx(ppl_cand / ppl_ref, rel=1e-4)
    assert res["chunk_prefix"] == [2]
    assert "chunks: 8 x 128 tokens, BOS id 2 prepended to 127 tokens of text each" in out, out
    assert f"text: {BOS_BASE / 'heldout.txt'}" in out and "warning:" not in out, out
    assert rc == 0 and "PASS" in out, out


def test_the_bos_fixture_really_depends_on_bos():
    """Without BOS the fixture is measured off its distribution (the old verify's figure): the test
    above can only fail on the old verify if this gap is far larger than its tolerance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BOS_BASE)
    model = AutoModelForCausalLM.from_pretrained(BOS_BASE, dtype=torch.float64).eval()
    ids = _text_ids(tok, (BOS_BASE / "heldout.txt").read_text(encoding="utf-8"))
    no_bos = [torch.tensor(ids[i: i + 128]) for i in range(0, 8 * 128, 128)]
    with_bos = [torch.tensor([2] + c.tolist()) for c in no_bos]
    # the same 127 targets per chunk, with and without <bos> in front of the context
    nll = {}
    with torch.no_grad():
        for key, chunks, first in (("with", with_bos, 1), ("without", no_bos, 0)):
            tot = 0.0
            for c in chunks:
                logp = model(input_ids=c[None]).logits[0, first:-1].double().log_softmax(-1)
                tot -= float(logp.gather(-1, c[first + 1:, None]).sum())
            nll[key] = tot / (8 * 127)
    assert math.exp(nll["without"] - nll["with"]) > 1.05, nll


def _tokenizer_variant(tmp_path: Path, src: Path, name: str, tc_edit: dict, gc: dict | None = None) -> Path:
    d = tmp_path / name
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy2(src / f, d / f)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    for k, v in tc_edit.items():
        if v is None:
            tc.pop(k, None)
        else:
            tc[k] = v
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    if gc is not None:
        (d / "generation_config.json").write_text(json.dumps(gc))
    return d


def test_chunk_rule_precedence(tmp_path):
    from transformers import AutoTokenizer

    # the tokenizer prepends <bos> and tokenizer_config.json says so
    r = chunk_rule(BOS_BASE)
    assert r.prefix == (2,) and r.bos_id == 2 and "tokenizer prepends it" in r.reason
    # Qwen-style: nothing prepended; generation_config.json's bos_token_id alone does not count
    r = chunk_rule(BASE)
    assert r.prefix == () and "generation_config.json's bos_token_id 0" in r.reason
    # an explicit add_bos_token false wins over the tokenizer.json template (llama.cpp's order)
    d = _tokenizer_variant(tmp_path, BOS_BASE, "flag-false", {"add_bos_token": False})
    assert AutoTokenizer.from_pretrained(d)("x")["input_ids"][0] == 2  # the template still prepends
    r = chunk_rule(d)
    assert r.prefix == () and "add_bos_token false" in r.reason and r.notes
    # an explicit add_bos_token true on a tokenizer whose template adds nothing: BOS, id from the tokenizer
    d = _tokenizer_variant(tmp_path, BASE, "flag-true", {"add_bos_token": True})
    assert chunk_rule(d).prefix == (AutoTokenizer.from_pretrained(d).bos_token_id,) == (0,)
    # ... and from generation_config.json when the tokenizer names no bos_token
    d = _tokenizer_variant(tmp_path, BASE, "flag-true-gc", {"add_bos_token": True, "bos_token": None},
                           gc={"bos_token_id": 1, "eos_token_id": 0})
    assert AutoTokenizer.from_pretrained(d).bos_token_id is None
    r = chunk_rule(d)
    assert r.prefix == (1,) and "generation_config.json" in r.reason
    # ... and no id anywhere: a one-line error naming the file
    d = _tokenizer_variant(tmp_path, BASE, "flag-true-none", {"add_bos_token": True, "bos_token": None},
                           gc={"eos_token_id": 0})
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("bos_token_id")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VerifyError, match="tokenizer_config.json: add_bos_token is true but no BOS id"):
        chunk_rule(d)
    # no tokenizer files at all (the benchmarks' synthetic models): nothing prepended
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy2(BASE / "config.json", bare / "config.json")
    assert chunk_rule(bare).prefix == ()


@pytest.mark.parametrize("case", ["missing", "hub-id", "file", "no-config", "text-missing"])
def test_bad_paths_give_one_line(tmp_path, case):
    """Issue 13 item 7: a path that does not exist is not a hub repo id; one line, no traceback."""
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()
    args = {"missing": [tmp_path / "nope", INT8], "hub-id": ["Qwen/Qwen3-1.7B", INT8],
            "file": [BASE, a_file], "no-config": [BASE, tmp_path / "empty"],
            "text-missing": [BASE, INT8, "--text", tmp_path / "none.txt"]}[case]
    rc, out = run_verify(*args)
    lines = out.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in out, out
    want = {"missing": "does not exist: expected a local model folder",
            "hub-id": "REFERENCE Qwen/Qwen3-1.7B does not exist: expected a local model folder",
            "file": "is not a folder", "no-config": "has no config.json",
            "text-missing": "does not exist: expected a UTF-8 text file"}[case]
    assert lines[0].startswith("gptq-ascend verify: error: ") and want in lines[0], out


def test_candidate_tokenizer_disagreeing_is_named(tmp_path):
    from gptq_ascend.verify import compare

    # same vocabulary, but the candidate's tokenizer_config.json says add_bos_token false: measured the
    # reference's way (BOS first), and the output says the candidate's files would start otherwise
    other_rule = _tokenizer_variant(tmp_path, BOS_BASE, "cand-flag-false", {"add_bos_token": False})
    shutil.copy2(BOS_BASE / "model.safetensors", other_rule / "model.safetensors")
    res = compare(str(BOS_BASE), str(other_rule), max_chunks=2)
    assert res.chunk_prefix == [2] and any("the candidate's tokenizer files start a sequence with []" in n
                                           for n in res.notes), res.notes
    # another vocabulary altogether: refused, naming both folders
    other_vocab = tmp_path / "cand-other-vocab"
    shutil.copytree(other_rule, other_vocab)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(BASE / f, other_vocab / f)
    with pytest.raises(VerifyError, match="disagree on the text .token ids differ from position"):
        compare(str(BOS_BASE), str(other_vocab), max_chunks=2)
