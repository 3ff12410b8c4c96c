"""Offline conversion: output format, exactness against GPTQModel, atomicity, and bad input.

Bad-input cases damage a copy of a real checkpoint on disk and run the real CLI; each must exit
non-zero, name the file/tensor/field, and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptq_ascend import format as fmt
from gptq_ascend.checkpoint import Checkpoint
from gptq_ascend.cli import main as cli
from gptq_ascend.convert import VerifyFailed, convert, verify_conversion

from .conftest import gptq_fixture_dirs

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = gptq_fixture_dirs()
needs_fixtures = pytest.mark.skipif(not FIXTURES, reason="tests/fixtures has no GPTQModel-written checkpoints")


def make_synthetic(out: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_gptq.py"), str(out), *extra],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A small Qwen3-shaped GPTQ-Int8 checkpoint (error handling does not need real weights)."""
    return make_synthetic(tmp_path_factory.mktemp("syn") / "tiny", "--preset", "tiny")


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def run_cli(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "gptq_ascend", *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# Output format and exactness
# ---------------------------------------------------------------------------------------------


def test_output_is_a_plain_sharded_hf_checkpoint(synthetic, tmp_path):
    dst = tmp_path / "out"
    result = convert(synthetic, dst, dtype="bfloat16", max_shard_size="1MB", verify=True)
    assert result.verify.ok and result.shards > 1
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total = 0
    for shard in shards:
        with safe_open(str(dst / shard), framework="pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
                assert t.dtype == torch.bfloat16
                assert not name.endswith(("qweight", "qzeros", "scales", "g_idx"))
    assert total == index["metadata"]["total_size"]
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    assert (dst / "generation_config.json").exists()
    assert oct(dst.stat().st_mode & 0o777) != oct(0o700)
    assert leftovers(tmp_path) == []


@needs_fixtures
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_converted_weights_equal_gptqmodel_dequant(fixture, tmp_path):
    dst = tmp_path / "fp16"
    assert cli(["convert", str(fixture), str(dst), "--verify"]) == 0
    expected = load_file(str(fixture / "expected" / "dequantized.safetensors"))
    out = Checkpoint.open(dst)
    for name, ref in expected.items():
        got = out.get(name)
        assert got.dtype == torch.float16 and got.shape == ref.t().shape
        diff = (got.float() - ref.t().float()).abs()
        assert bool((diff <= ref.t().float().abs() * 2.0**-10 + 2.0**-24).all()), name
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (dst / f).exists(), f


@needs_fixtures
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_converted_fixture_logits_match_gptqmodel_in_transformers(fixture, tmp_path):
    from transformers import AutoModelForCausalLM

    dst = tmp_path / "fp16"
    convert(fixture, dst, dtype="float16")
    ref = load_file(str(fixture / "expected" / "logits.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits.float()
    expected = ref["logits"].float()
    # The converted weights are fp16 roundings of GPTQModel's; the forward runs in fp32 here and
    # GPTQModel's in its own dtype: compare at an fp16-level tolerance relative to the logit scale.
    scale = expected.abs().max()
    assert float((logits - expected).abs().max()) <= 2e-2 * float(scale), fixture.name
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.98


def test_verify_catches_the_int8_view_mistake(synthetic, tmp_path):
    """The earlier converter's bug, plugged into our converter, must fail --verify loudly."""

    def int8_view(t, spec, k, dtype):
        g = t.g_idx.long()
        w = t.qweight.t().contiguous().view(torch.int8).float() * t.scales.float()[g].t()
        return w.to(dtype)

    dst = tmp_path / "wrong"
    with pytest.raises(VerifyFailed) as e:
        convert(synthetic, dst, verify=True, dequant_fn=int8_view)
    assert "differ from the reference dequant" in str(e.value) and "NOT written" in str(e.value)
    assert not dst.exists() and leftovers(tmp_path) == []


def test_verify_detects_a_tampered_output(synthetic, tmp_path):
    dst = tmp_path / "out"
    convert(synthetic, dst)
    shard = dst / "model-00001-of-00001.safetensors"
    tensors = load_file(str(shard))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][3, 5] += 0.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    report = verify_conversion(synthetic, dst, torch.float16)
    assert not report.ok and any(name in m for m in report.mismatches)


def test_fp16_overflow_is_reported_with_bfloat16_advice(tmp_path):
    src = make_synthetic(tmp_path / "big", "--preset", "tiny")
    path = src / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.up_proj.scales"][0, 0] = 60000.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    rc, out = run_cli("convert", str(src), str(tmp_path / "o"))
    assert rc != 0 and "model.layers.0.mlp.up_proj" in out and "--dtype bfloat16" in out
    assert not (tmp_path / "o").exists()
    assert run_cli("convert", str(src), str(tmp_path / "o"), "--dtype", "bfloat16", "--verify")[0] == 0


# ---------------------------------------------------------------------------------------------
# Atomicity
# ---------------------------------------------------------------------------------------------


def test_existing_dst_is_refused_then_replaced_with_force(synthetic, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, out = run_cli("convert", str(synthetic), str(dst))
    assert rc != 0 and "already exists" in out and "--force" in out
    assert (dst / "keep.txt").read_text() == "mine"
    assert run_cli("convert", str(synthetic), str(dst), "--force")[0] == 0
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_failure_with_force_leaves_existing_dst_untouched(synthetic, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synthetic, src)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.g_idx"][7] = 99  # found late, after shards are written
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, out = run_cli("convert", str(src), str(dst), "--force")
    assert rc != 0 and "model.layers.1.self_attn.o_proj.g_idx" in out
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def big_synthetic(tmp_path_factory) -> Path:
    """Six Qwen3-1.7B-sized layers: ~600 MB of output, seconds of work to interrupt."""
    return make_synthetic(tmp_path_factory.mktemp("big") / "src", "--preset", "qwen3-1.7b", "--layers", "6",
                          "--vocab", "512")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_conversion_leaves_nothing(big_synthetic, tmp_path, sig):
    dst = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gptq_ascend", "convert", str(big_synthetic), str(dst),
                             "--max-shard-size", "50MB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # A job started in the background by a non-interactive shell (CI) inherits
                            # SIGINT ignored; restore the default a terminal's Ctrl-C would meet.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a shard is complete and the next one is being written
        partial = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
        if partial and len(list(partial[0].glob("*.safetensors"))) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("conversion ended before it could be interrupted: " + proc.stdout.read())
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("conversion never started")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    assert "interrupted; nothing was written" in out
    assert not dst.exists() and leftovers(tmp_path) == [], out


# ---------------------------------------------------------------------------------------------
# Bad input: each exits non-zero, names what is wrong, and writes nothing
# ---------------------------------------------------------------------------------------------


def _damage(src: Path, case: str) -> str:
    """Damage a copy in place; return the text the error must contain."""
    st = src / "model.safetensors"
    cfg_path = src / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if case == "missing-config":
        cfg_path.unlink()
        return "config.json: not found"
    if case == "malformed-config":
        cfg_path.write_text('{"quantization_config": {"bits": 8,')
        return "config.json: malformed JSON"
    if case == "unsupported-bits":
        cfg["quantization_config"]["bits"] = 5
        cfg_path.write_text(json.dumps(cfg))
        return "bits: 5 is not supported"
    if case == "not-gptq":
        cfg["quantization_config"]["quant_method"] = "awq"
        cfg_path.write_text(json.dumps(cfg))
        return "'quant_method' is 'awq'"
    if case == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) - 1000])
        return "model.safetensors: truncated"
    if case == "corrupted-header":
        data = bytearray(st.read_bytes())
        data[8:20] = b"\x00garbage!!\xff\xfe"
        st.write_bytes(bytes(data))
        return "model.safetensors: corrupted safetensors header"
    tensors = load_file(str(st))
    if case in ("missing-shard", "path-traversal"):
        names = sorted(tensors)
        half = len(names) // 2
        save_file({n: tensors[n] for n in names[:half]}, str(src / "model-00001-of-00002.safetensors"))
        save_file({n: tensors[n] for n in names[half:]}, str(src / "model-00002-of-00002.safetensors"))
        st.unlink()
        shard2 = "model-00002-of-00002.safetensors" if case == "missing-shard" else "../../etc/passwd"
        if case == "missing-shard":
            (src / shard2).unlink()
        weight_map = {n: "model-00001-of-00002.safetensors" for n in names[:half]}
        weight_map.update({n: shard2 for n in names[half:]})
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return "is missing" if case == "missing-shard" else "points outside the model folder"
    if case == "shape-mismatch":
        name = "model.layers.0.mlp.down_proj.scales"
        tensors[name] = tensors[name][:, :-1].contiguous()
        save_file(tensors, str(st))
        return "model.layers.0.mlp.down_proj.scales: expected shape"
    if case == "g_idx-range":
        tensors["model.layers.0.self_attn.q_proj.g_idx"][5] = 40
        save_file(tensors, str(st))
        return "model.layers.0.self_attn.q_proj.g_idx: values must lie in"
    if case == "nan-scales":
        tensors["model.layers.0.self_attn.k_proj.scales"][0, 1] = float("inf")
        save_file(tensors, str(st))
        return "model.layers.0.self_attn.k_proj.scales: 1 non-finite"
    if case == "pickle":
        torch.save(tensors, src / "pytorch_model.bin")
        st.unlink()
        return "pytorch_model.bin: pickle checkpoints are not loaded by default"
    raise AssertionError(case)


BAD_CASES = ["missing-config", "malformed-config", "unsupported-bits", "not-gptq", "truncated",
             "corrupted-header", "missing-shard", "path-traversal", "shape-mismatch", "g_idx-range",
             "nan-scales", "pickle"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_refused_and_nothing_is_written(synthetic, tmp_path, case):
    src = tmp_path / "src"
    shutil.copytree(synthetic, src)
    needle = _damage(src, case)
    dst = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    rc, out = run_cli("convert", str(src), str(dst))
    assert rc == 1, out
    assert needle in out, out
    assert "Traceback" not in out
    assert sorted(os.listdir(tmp_path)) == before


def test_pickle_is_loaded_only_with_opt_in_and_weights_only(synthetic, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synthetic, src)
    _damage(src, "pickle")
    rc, out = run_cli("convert", str(src), str(tmp_path / "out"), "--allow-pickle", "--verify")
    assert rc == 0, out
    assert "verify: OK" in out

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, src / "pytorch_model.bin")
    rc, out = run_cli("convert", str(src), str(tmp_path / "out2"), "--allow-pickle")
    assert rc == 1 and "weights_only=True" in out
    assert not (tmp_path / "pwned").exists()


def test_config_disagreeing_with_tensors_is_refused(synthetic, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synthetic, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["dynamic"] = {r"-:model\.layers\.1\.mlp\.up_proj": {}}
    (src / "config.json").write_text(json.dumps(cfg))
    rc, out = run_cli("convert", str(src), str(tmp_path / "out"))
    assert rc == 1 and "model.layers.1.mlp.up_proj.qweight" in out and "says it is not" in out


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def test_inspect_reports_settings_sizes_and_modes(synthetic):
    rc, out = run_cli("inspect", str(synthetic))
    assert rc == 0, out
    assert "bits=8 group_size=128 sym=True" in out
    assert "14 quantized" in out and "as FP16" in out
    assert "offline" in out and "online CPU" in out and "online NPU" in out
    assert "torch_npu is not installed" in out
    rc, out = run_cli("inspect", str(synthetic), "--json")
    data = json.loads(out)
    assert data["quantized_layers"] == 14 and data["stored_bytes"] < data["fp16_bytes"]


@needs_fixtures
def test_inspect_every_fixture(gptq_fixture):
    bits = fmt.GPTQConfig.load(gptq_fixture).default.bits
    rc, out = run_cli("inspect", str(gptq_fixture))
    assert rc == 0, out
    assert f"bits={bits}" in out


def test_cli_help_explains_every_flag():
    rc, out = run_cli("convert", "--help")
    assert rc == 0
    for flag in ("--dtype", "--max-shard-size", "--force", "--verify", "--backend", "--allow-pickle"):
        assert flag in out


def test_dequant_helper_is_the_format_reference(synthetic):
    # The converter's default path is format.dequantize, nothing else.
    ckpt = Checkpoint.open(synthetic)
    cfg = fmt.GPTQConfig.load(synthetic)
    prefix = "model.layers.0.mlp.gate_proj"
    t = ckpt.layer_tensors(prefix)
    from gptq_ascend.convert import reference_dequant

    w = reference_dequant(t, cfg.default, t.g_idx.numel(), torch.float16)
    assert torch.equal(w, fmt.dequantize(t, cfg.default).t().half())
