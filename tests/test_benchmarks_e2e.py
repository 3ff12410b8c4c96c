"""benchmarks.e2e's pure-Python parts: the GGUF writer of the llama.cpp peer, argument handling, the NPU
refusal and how prompts are tokenized. No llama.cpp build and no vLLM engine here: the writer uses the
gguf-py that ships in llama-cpp-python's sdist (downloaded once from PyPI into the user cache; only
its gguf-py is unpacked)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "tools"))

import llama_cpp_peer as lcpp  # noqa: E402

from benchmarks import e2e  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def gguf():
    try:
        lc = lcpp.ensure_source(lcpp.DEFAULT_VERSION, gguf_only=True)
    except lcpp.LlamaCppError as e:
        pytest.skip(f"gguf-py not available: {e} (needs PyPI once)")
    return lcpp.import_gguf(lc)


# What llama.cpp's own converter names each Hugging Face tensor of a Qwen3 layer (llama.cpp's
# src/llama-arch.cpp LLM_TENSOR_NAMES), written out here rather than taken from gguf-py's map.
HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def expected_gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    parts = hf.split(".")
    assert parts[:2] == ["model", "layers"], hf
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"


def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def read_back(gguf, path: Path) -> tuple[dict, dict]:
    """Tensors (torch, in Hugging Face [out, in] order) and metadata as gguf-py's reader sees them."""
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # ggml lists the fastest dimension first
        raw = torch.from_numpy(t.data.copy()).reshape(-1).view(torch.uint8)
        as_dtype = {gguf.GGMLQuantizationType.BF16: torch.bfloat16, gguf.GGMLQuantizationType.F16: torch.float16,
                    gguf.GGMLQuantizationType.F32: torch.float32}.get(t.tensor_type)
        assert as_dtype is not None, f"{t.name}: unexpected type {t.tensor_type.name}"
        tensors[t.name] = raw.view(as_dtype).reshape(shape)
    return tensors, fields


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """The GPTQModel-written int8 fixture converted by `gptq-ascend convert` (BF16 and FP16)."""
    out = {}
    for dtype in ("bfloat16", "float16"):
        dst = tmp_path_factory.mktemp("conv") / f"qwen3-int8-{dtype}"
        subprocess.run([sys.executable, "-m", "gptq_ascend", "convert", str(FIXTURES / "qwen3-int8-g128-sym"),
                        str(dst), "--dtype", dtype, "--no-progress"], check=True, env=ENV, capture_output=True)
        out[dtype] = dst
    return out


@pytest.mark.parametrize("source", ["base-qwen3", "bfloat16", "float16"])
def test_gguf_round_trip(gguf, converted, tmp_path, source):
    folder = FIXTURES / source if source.startswith("base") else converted[source]
    cfg = json.loads((folder / "config.json").read_text())
    out = tmp_path / "m.gguf"
    summary = lcpp.write_gguf(folder, out, gguf)
    assert out.exists() and not (tmp_path / "m.gguf.partial").exists()
    tensors, fields = read_back(gguf, out)
    src = source_tensors(folder)
    assert cfg["tie_word_embeddings"] and "output.weight" not in tensors
    expected = {expected_gguf_name(k): v for k, v in src.items() if not k.startswith("lm_head.")}
    assert sorted(tensors) == sorted(expected)
    assert summary["tensors"] == len(expected)
    for name, ref in expected.items():
        got = tensors[name]
        if ref.dim() == 1:  # norms go to F32, as llama.cpp's converter writes them: exact upcast
            assert got.dtype == torch.float32, name
            assert torch.equal(got, ref.float()), name
        else:  # matrices keep the source dtype, bit for bit
            assert got.dtype == ref.dtype and got.shape == ref.shape, name
            assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), name
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
    assert fields["general.architecture"] == "qwen3"
    assert fields["qwen3.block_count"] == cfg["num_hidden_layers"]
    assert fields["qwen3.embedding_length"] == cfg["hidden_size"]
    assert fields["qwen3.feed_forward_length"] == cfg["intermediate_size"]
    assert fields["qwen3.attention.head_count"] == cfg["num_attention_heads"]
    assert fields["qwen3.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert fields["qwen3.attention.key_length"] == cfg["head_dim"]
    assert fields["qwen3.rope.freq_base"] == pytest.approx(theta)
    assert fields["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert fields["qwen3.vocab_size"] == cfg["vocab_size"]
    assert fields["tokenizer.ggml.model"] == "none"
    dtype = next(v.dtype for v in src.values() if v.dim() == 2)
    assert fields["general.file_type"] == {torch.bfloat16: 32, torch.float16: 1}[dtype]


def test_gguf_refuses_a_gptq_checkpoint(gguf, tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(lcpp.LlamaCppError, match=r"config\.json: has a quantization_config"):
        lcpp.write_gguf(FIXTURES / "qwen3-int8-g128-sym", out, gguf)
    assert not list(tmp_path.iterdir())


def test_gguf_refuses_other_architectures(gguf, tmp_path):
    with pytest.raises(lcpp.LlamaCppError, match=r"architecture 'LlamaForCausalLM' is not one"):
        lcpp.write_gguf(FIXTURES / "base-llama", tmp_path / "x.gguf", gguf)
    assert not list(tmp_path.iterdir())


# ---- arguments ----------------------------------------------------------------------------------


def this_cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_default_dtype_follows_this_cpu():
    native_bf16 = bool(this_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    # GPTQ_ASCEND_CPU_ISA=avx2 in the environment means "run as an AVX2-only CPU" (--cpu-tier's default).
    avx2_forced = os.environ.get("GPTQ_ASCEND_CPU_ISA") == "avx2"
    assert e2e.parse_args([]).dtype == ("bfloat16" if native_bf16 and not avx2_forced else "float32")
    assert e2e.parse_args([]).cpu_tier == ("avx2" if avx2_forced else "native")
    assert e2e.default_dtype({"avx2", "fma", "f16c"}) == "float32"  # Zen 1
    assert e2e.default_dtype({"avx512f", "avx512_bf16"}) == "bfloat16"  # Zen 4
    assert e2e.parse_args(["--dtype", "float32"]).dtype == "float32"


def test_mode_lists():
    assert e2e.parse_args([]).mode_list == list(e2e.DEFAULT_CPU_MODES)
    assert e2e.parse_args(["--peer"]).mode_list == list(e2e.DEFAULT_CPU_MODES) + list(e2e.LLAMA_MODES)
    args = e2e.parse_args(["--modes", "online-int4,llama-q4_0", "--peer"])
    assert args.mode_list == ["online-int4", "llama-q4_0", "llama-bf16", "llama-q8_0", "llama-q8_0-head16",
                              "llama-q4_0-head16"]
    # A user's checkpoint runs the online mode of its own bit width.
    args = e2e.parse_args(["--model", str(FIXTURES / "qwen3-int4-g128-sym")])
    assert args.mode_list == ["online-int4", "offline-bf16", "offline-fp32"]
    assert e2e.parse_args(["--device", "npu", "--model", str(FIXTURES / "qwen3-int8-g128-sym")]).mode_list == [
        "online-int8", "offline-fp16"]
    assert e2e.parse_args(["--device", "npu"]).batches == "1,8,64"
    # -head8 runs the same checkpoint as its online mode, and is compared with the same llama.cpp peer.
    args = e2e.parse_args(["--modes", "online-int8-head8,online-int4-head8,online-int4-a8,online-int4-a8-head8"])
    assert [e2e.base_mode(m) for m in args.mode_list] == ["online-int8", "online-int4", "online-int4", "online-int4"]
    lines = e2e.ratios([{"mode": "online-int8-head8", "decode_tok_s_b1": 3.0},
                        {"mode": "llama-q8_0", "decode_tok_s_b1": 2.0},
                        {"mode": "offline-bf16", "decode_tok_s_b1": 1.5}])
    assert lines == ["online-int8-head8 / offline-bf16 (best dense vLLM): 2.00x",
                     "online-int8-head8 / llama-q8_0: 1.50x"]
    # The exact-head mode also meets llama.cpp with its output matrix kept in F16 (-head16).
    lines = e2e.ratios([{"mode": "online-int4", "decode_tok_s_b1": 3.0},
                        {"mode": "llama-q4_0", "decode_tok_s_b1": 4.0},
                        {"mode": "llama-q4_0-head16", "decode_tok_s_b1": 2.0},
                        {"mode": "online-int4-a8-head8", "decode_tok_s_b1": 5.0}])
    assert lines == ["online-int4 / llama-q4_0: 0.75x", "online-int4 / llama-q4_0-head16: 1.50x",
                     "online-int4-a8-head8 / llama-q4_0: 1.25x"]
    assert e2e.parse_args([]).batches == "1,8"


def test_mode_env_switches_only_for_their_modes():
    """-head8 alone gets the int8 lm_head, -a8 alone the int8 activations, whatever the shell exported."""
    args = e2e.parse_args(["--cpu-tier", "avx2"])
    shell = {"GPTQ_ASCEND_LM_HEAD": "int8", "GPTQ_ASCEND_LM_HEAD_INT8": "1", "GPTQ_ASCEND_CPU_W8A8": "1"}
    got = {m: e2e.mode_env(m, args, shell) for m in ("online-int4", "online-int4-head8", "online-int4-a8",
                                                     "online-int4-a8-head8")}
    assert {m: (e.get("GPTQ_ASCEND_LM_HEAD"), e.get("GPTQ_ASCEND_CPU_W8A8")) for m, e in got.items()} == {
        "online-int4": (None, None), "online-int4-head8": ("int8", None), "online-int4-a8": (None, "1"),
        "online-int4-a8-head8": ("int8", "1")}
    assert all("GPTQ_ASCEND_LM_HEAD_INT8" not in e and e["GPTQ_ASCEND_CPU_ISA"] == "avx2" for e in got.values())
    assert e2e.mode_env("online-int4", args, {"GPTQ_ASCEND_LM_HEAD": "ours"})["GPTQ_ASCEND_LM_HEAD"] == "ours"


@pytest.mark.parametrize("argv, message", [
    (["--modes", "online-int3"], "unknown mode(s) online-int3"),
    (["--batches", "8"], "must be >= 1 and include 1"),
    (["--batches", "1,x"], "expected comma-separated integers"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--model", "/nonexistent/dir"], "no config.json there"),
    (["--device", "npu", "--modes", "llama-q8_0"], "--device npu runs online-intN and offline-fp16/bf16 only"),
    (["--device", "npu", "--modes", "online-int8-head8"], "--device npu runs online-intN and offline-fp16/bf16 only"),
    (["--device", "npu", "--cpu-tier", "avx2"], "--cpu-tier avx2 is a CPU setting"),
    (["--cpu-tier", "avx512"], "invalid choice: 'avx512'"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def run_cli(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.e2e", *argv], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_model_must_be_gptq(tmp_path):
    proc = run_cli("--model", str(FIXTURES / "base-qwen3"), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"benchmarks.e2e: {FIXTURES / 'base-qwen3' / 'config.json'}: no GPTQ quantization_config "
        "(quant_method 'gptq' with 'bits'); --model takes a GPTQ checkpoint"]


def test_wrong_bits_for_model(tmp_path):
    proc = run_cli("--model", str(FIXTURES / "qwen3-int8-g128-sym"), "--modes", "online-int4",
                   "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert "a 8-bit checkpoint cannot run mode online-int4 (use online-int8)" in proc.stderr
    assert "Traceback" not in proc.stderr and not list((tmp_path / "w").glob("*"))


def test_npu_refuses_without_an_npu(tmp_path):
    if e2e.npu_status()[0]:
        pytest.skip("this machine has an NPU: the refusal does not apply")
    out = tmp_path / "npu.json"
    proc = run_cli("--device", "npu", "--json", str(out), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("benchmarks.e2e: --device npu needs an Ascend NPU with torch_npu and vllm-ascend: ")
    assert lines[0].endswith("; nothing was measured")
    assert proc.stdout == "" and not out.exists() and not (tmp_path / "w").exists()


# ---- prompts: the tokenizer's own encode, BOS where it adds one ----------------------------------


def test_prompts_use_the_tokenizer_and_its_bos(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    plain = FIXTURES / "base-qwen3"
    with_bos = tmp_path / "bos"
    with_bos.mkdir()
    for f in plain.glob("tokenizer*"):
        shutil.copy2(f, with_bos / f.name)
    tok = Tokenizer.from_file(str(plain / "tokenizer.json"))
    bos_id = tok.token_to_id("<|endoftext|>")
    tok.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)])
    tok.save(str(with_bos / "tokenizer.json"))

    raw = Tokenizer.from_file(str(plain / "tokenizer.json"))
    for folder, bos in ((plain, False), (with_bos, True)):
        prompts, how = e2e.build_prompts(str(folder), 8, 128)
        assert len(prompts) == 8 and all(len(p) == 128 for p in prompts)
        for i, p in enumerate(prompts):
            ids = raw.encode(f"{i + 1}. {e2e.PROMPT_TEXT}", add_special_tokens=False).ids
            assert p == (([bos_id] + ids)[:128] if bos else ids[:128])
        assert (f"BOS {bos_id} first" in how) == bos
    prompts, how = e2e.build_prompts(str(tmp_path), 2, 16)  # no tokenizer: fixed ids
    assert how == "fixed token ids (model has no tokenizer)" and len({tuple(p) for p in prompts}) == 2


def test_llama_repack_choice():
    # ggml's AMX matmul crashed on the AMX Xeon (llama.cpp 0c1e570): it is compiled out there instead of
    # turning off the repacked layouts with it.
    assert e2e.llama_repack("auto") is True and e2e.llama_repack("on") is True
    assert e2e.llama_repack("off") is False


def test_llama_build_compiles_amx_out_on_amx_cpus():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import llama_cpp_peer as lcpp
    finally:
        sys.path.remove(str(ROOT / "tools"))
    amx = lcpp.cmake_flags(True)
    assert "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in amx
    assert "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in amx and "-DGGML_NATIVE=ON" in amx
    assert not any("amx" in f for f in lcpp.cmake_flags(False))
    assert lcpp.cpu_has_amx() is ("amx_int8" in this_cpu_flags())
    lc = lcpp.LlamaCpp("0.0", Path("/nonexistent"))
    assert lc.build_dir.name == ("build-noamx" if "amx_int8" in this_cpu_flags() else "build")


def test_avx2_tier_emulation():
    """--cpu-tier avx2: the AVX2 caps go to every mode's process, llama.cpp gets ggml's AVX2 build, and the
    activations default to what an AVX2-only CPU runs fastest (float32)."""
    if not {"avx2", "fma", "f16c"} <= this_cpu_flags():
        with pytest.raises(SystemExit):
            e2e.parse_args(["--cpu-tier", "avx2"])
        return
    args = e2e.parse_args(["--cpu-tier", "avx2", "--modes", "online-int8,llama-q8_0"])
    assert (args.cpu_tier, args.dtype) == ("avx2", "float32")
    assert e2e.parse_args(["--cpu-tier", "avx2", "--dtype", "bfloat16"]).dtype == "bfloat16"
    assert e2e.TIER_ENV["avx2"] == {"GPTQ_ASCEND_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                    "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    flags = lcpp.cmake_flags(lcpp.cpu_has_amx(), "avx2")
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_NATIVE=ON" not in flags
    assert not any("AVX512" in f or "amx" in f or "march" in f for f in flags)
    assert lcpp.LlamaCpp("0.0", Path("/nonexistent"), "avx2").build_dir.name == "build-avx2"
    with pytest.raises(lcpp.LlamaCppError, match="unknown llama.cpp build tier 'avx9'"):
        lcpp.ensure_source("0.0", tier="avx9")


def test_ratios_per_round():
    """With several rounds a ratio is also given inside each round (same host state), and their median."""
    a = {"mode": "online-int8", "decode_tok_s_b1": 12.0, "decode_tok_s_b1_rounds": [10.0, 12.0, 20.0]}
    b = {"mode": "llama-q8_0", "decode_tok_s_b1": 10.0, "decode_tok_s_b1_rounds": [10.0, 8.0, 10.0]}
    d = {"mode": "offline-bf16", "decode_tok_s_b1": 5.0}
    lines = e2e.ratios([a, b, d])
    assert lines[0] == "online-int8 / offline-bf16 (best dense vLLM): 2.40x"
    assert lines[1] == "online-int8 / llama-q8_0: 1.20x (per round 1.00 / 1.50 / 2.00, median 1.50x)"
