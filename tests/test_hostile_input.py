"""Hostile input (issue 13): never serve wrong weights, never write Inf with exit 0, never harm the
source, never a traceback.

Every case damages a copy of a GPTQModel-written fixture (or its header) in tmp_path and runs the real
CLI (in-process through ``cli.main`` where a subprocess per case would be slow; a subprocess where the
old behaviour was a hang or the case needs a resource limit) or, for the plugin, the real vLLM load
path. Each must exit 1 with one line naming the file / tensor / field / flag, leave nothing behind and
leave the source byte-for-byte unchanged. The property test at the end draws mutations of a header
and config and checks the same contract for every draw.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from gptq_ascend import checkpoint as ckpt_mod
from gptq_ascend import format as fmt
from gptq_ascend.checkpoint import Checkpoint
from gptq_ascend.cli import main as cli

from .conftest import FIXTURES as FIXTURE_ROOT

ACT_ORDER = FIXTURE_ROOT / "qwen3-int4-g32-descact"  # act-order, 4-bit, bf16 plain tensors
PER_CHANNEL = FIXTURE_ROOT / "qwen3-int8-perchannel"  # group_size -1
pytestmark = pytest.mark.skipif(not ACT_ORDER.exists(), reason=f"fixture {ACT_ORDER.name} missing")
Q = "model.layers.0.self_attn.q_proj"


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def copy_fixture(dst: Path, fixture: Path = ACT_ORDER) -> Path:
    shutil.copytree(fixture, dst, ignore=shutil.ignore_patterns("expected"))
    return dst


def tree_hash(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (symlinks as their target text, files by content)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir" if p.is_dir() else "special"
    return out


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: object, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_tensors(src: Path, fn) -> None:
    path = src / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(src: Path, fn) -> None:
    """Edit quantization_config in config.json (and drop quantize_config.json so it cannot differ)."""
    cfg = json.loads((src / "config.json").read_text())
    fn(cfg["quantization_config"])
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "quantize_config.json").unlink(missing_ok=True)


def run(*args: str) -> tuple[int | str, str]:
    """The CLI in-process: (exit status, or "traceback" if it raised; everything it printed)."""
    out = io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc: int | str = cli([str(a) for a in args])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    except BaseException:
        rc = "traceback"
        out.write(traceback.format_exc())
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return rc, out.getvalue()


def run_subprocess(*args: str, timeout: float = 120, preexec=None) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "gptq_ascend", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec)
    return proc.returncode, proc.stdout + proc.stderr


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def assert_refused(rc, out: str, *needles: str) -> None:
    assert rc == 1, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gptq-ascend "), out
    for needle in needles:
        assert needle in out, out


def refuse_convert(tmp_path: Path, src: Path, *needles: str, extra: tuple = ()) -> str:
    """Convert must exit 1 with one line holding ``needles``; DST absent, source unchanged."""
    before = tree_hash(src)
    dst = tmp_path / "out"
    rc, out = run("convert", src, dst, *extra)
    assert_refused(rc, out, *needles)
    assert not os.path.lexists(dst) and leftovers(tmp_path) == []
    assert tree_hash(src) == before
    return out


def output_tensors(dst: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(dst.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ---------------------------------------------------------------------------------------------------
# 1. Online mode validates every layer as strictly as offline (format.validate_loaded)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.engine
def test_engine_refuses_a_stored_negative_g_idx_naming_the_tensor(tmp_path):
    """The issue's case: a real vLLM engine started on an act-order checkpoint with one stored g_idx
    entry -1 (o_proj: not fused, so its g_idx is the one vLLM loaded) took it for "g_idx absent",
    substituted the default order, started and served different tokens. It must refuse, naming the
    checkpoint tensor, as `convert` does."""
    pytest.importorskip("vllm")
    src = copy_fixture(tmp_path / "bad")
    edit_tensors(src, lambda t: t["model.layers.1.self_attn.o_proj.g_idx"].__setitem__(3, -1))
    script = ("from vllm import LLM\n"
              f"LLM(model={str(src)!r}, quantization='gptq_ascend', enforce_eager=True, max_model_len=256, "
              "dtype='float32', gpu_memory_utilization=0.5)\nprint('ENGINE STARTED')\n")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ENGINE STARTED" not in out, out[-3000:]
    assert ("FormatError: model.layers.1.self_attn.o_proj.g_idx: values must lie in [0, 3], "
            "found range [-1, 3]") in out, out[-3000:]
    rc, cout = run("convert", src, tmp_path / "out")  # the same file, offline: the same verdict
    assert_refused(rc, cout, "model.layers.1.self_attn.o_proj.g_idx: values must lie in [0, 3]")


def _qkv_layer(tensors: dict[str, torch.Tensor], prefix: str = "model.layers.0.self_attn"):
    """A vLLM QKVParallelLinear with the fixture's q/k/v tensors loaded through its weight loaders,
    shard by shard, as vLLM's Qwen3 loader calls them; not yet processed."""
    from vllm.model_executor.layers import linear as vlinear

    from tests.test_vllm_plugin_layers import quant_config, tp_rank

    cfg = json.loads((ACT_ORDER / "config.json").read_text())
    spec = fmt.GPTQConfig.load(ACT_ORDER).default
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    with tp_rank(0, 1):
        layer = vlinear.QKVParallelLinear(cfg["hidden_size"], head_dim, cfg["num_attention_heads"],
                                          cfg["num_key_value_heads"], bias=False,
                                          quant_config=quant_config(spec), prefix=f"{prefix}.qkv_proj")
        for sid, sub in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                param = getattr(layer, name)
                param.weight_loader(param, tensors[f"{prefix}.{sub}.{name}"], sid)
    return layer


@pytest.mark.parametrize("case,needle", [
    ("q-g_idx-negative", "model.layers.0.self_attn.q_proj.g_idx: values must lie in [0, 3], found range [-1, 3]"),
    ("v-g_idx-99", "model.layers.0.self_attn.v_proj.g_idx: values must lie in [0, 3], found range [0, 99]"),
    ("k-scales-nan", "model.layers.0.self_attn.k_proj.scales: 1 non-finite value(s) (NaN/Inf), first at (2, 5)"),
])
def test_plugin_load_path_refuses_a_corrupted_fused_layer_naming_the_checkpoint_tensor(case, needle):
    """The plugin's real load path (vLLM's QKVParallelLinear + its weight loaders) on the fixture's
    tensors with one corruption: the q_proj case is the one whose g_idx vLLM's loader overwrites with
    k's and v's (one g_idx parameter for the fused layer), so only a per-shard check sees it."""
    pytest.importorskip("vllm")
    from tests.test_vllm_plugin_layers import tp_rank

    tensors = load_file(str(ACT_ORDER / "model.safetensors"))
    s = "model.layers.0.self_attn"
    if case == "q-g_idx-negative":
        tensors[f"{s}.q_proj.g_idx"][7] = -1
    elif case == "v-g_idx-99":
        tensors[f"{s}.v_proj.g_idx"][5] = 99
    else:
        tensors[f"{s}.k_proj.scales"][2, 5] = float("nan")
    layer = _qkv_layer(tensors)
    with tp_rank(0, 1), pytest.raises(fmt.FormatError) as e:
        layer.quant_method.process_weights_after_loading(layer)
    assert str(e.value) == needle


def test_plugin_load_path_still_accepts_the_untouched_fixture():
    pytest.importorskip("vllm")
    from tests.test_vllm_plugin_layers import tp_rank

    tensors = load_file(str(ACT_ORDER / "model.safetensors"))
    layer = _qkv_layer(tensors)
    with tp_rank(0, 1):
        layer.quant_method.process_weights_after_loading(layer)
        x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
        y = layer.quant_method.apply(layer, x)
    spec = fmt.GPTQConfig.load(ACT_ORDER).default
    ws = [fmt.dequantize(Checkpoint.open(ACT_ORDER).layer_tensors(f"model.layers.0.self_attn.{p}"), spec,
                         128, torch.float64) for p in ("q_proj", "k_proj", "v_proj")]
    ref = x.double() @ torch.cat(ws, dim=1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


def test_plugin_shape_mismatch_names_the_tensor():
    """vLLM's loader asserts shapes with a bare AssertionError; the plugin's loader names the tensor."""
    pytest.importorskip("vllm")
    tensors = load_file(str(ACT_ORDER / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.scales"] = tensors["model.layers.0.self_attn.k_proj.scales"][:3]
    with pytest.raises(fmt.FormatError, match=r"qkv_proj\.scales \(shard 'k'\): the checkpoint's"):
        _qkv_layer(tensors)


# ---------------------------------------------------------------------------------------------------
# 2. Every cast is range-checked
# ---------------------------------------------------------------------------------------------------


def test_plain_bf16_value_beyond_fp16_is_refused_then_fits_bfloat16(tmp_path):
    src = copy_fixture(tmp_path / "src")
    edit_tensors(src, lambda t: t["model.norm.weight"].__setitem__(5, 99840.0))
    refuse_convert(tmp_path, src, "model.safetensors: tensor 'model.norm.weight'", "float16 range",
                   "--dtype bfloat16")
    rc, out = run("convert", src, tmp_path / "bf16", "--dtype", "bfloat16")
    assert rc == 0, out
    assert float(output_tensors(tmp_path / "bf16")["model.norm.weight"][5]) == 99840.0


def test_huge_fp32_scales_are_refused_in_bfloat16_too(tmp_path):
    src = copy_fixture(tmp_path / "src")

    def huge(t):
        s = t[f"{Q}.scales"].float()
        s[0, :] = 3e38
        t[f"{Q}.scales"] = s

    edit_tensors(src, huge)
    refuse_convert(tmp_path, src, f"{Q}: dequantized weight", extra=("--dtype", "bfloat16"))
    refuse_convert(tmp_path, src, f"{Q}: dequantized weight")


# ---------------------------------------------------------------------------------------------------
# 3. --force never harms the source; no .old-* or empty parents left
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["weight-file-inside", "parent", "grandparent", "same-via-symlink",
                                   "inside-via-symlink"])
def test_dst_inside_or_containing_src_is_refused_even_with_force(tmp_path, where):
    src = copy_fixture(tmp_path / "home" / "src")
    (tmp_path / "link").symlink_to(src)
    dst = {"weight-file-inside": src / "model.safetensors", "parent": src.parent,
           "grandparent": tmp_path, "same-via-symlink": tmp_path / "link",
           "inside-via-symlink": tmp_path / "link" / "sub"}[where]
    before = tree_hash(src)
    rc, out = run("convert", src, dst, "--force")
    assert_refused(rc, out, f"{dst}: the destination", "source")
    assert tree_hash(src) == before


def test_hf_blob_store_is_part_of_the_source(tmp_path):
    snap = make_hf_cache(tmp_path, sharded=False)
    rc, out = run("convert", snap, snap.parent.parent / "blobs", "--force")
    assert_refused(rc, out, "the destination is the source")


def test_force_over_a_file_leaves_no_old_copy(tmp_path):
    dst = tmp_path / "out"
    dst.write_text("a file in the way")
    rc, out = run("convert", ACT_ORDER, dst, "--force")
    assert rc == 0, out
    assert dst.is_dir() and leftovers(tmp_path) == []


def test_failed_run_removes_the_parent_folders_it_created(tmp_path):
    src = copy_fixture(tmp_path / "src")
    edit_tensors(src, lambda t: t["model.layers.1.mlp.down_proj.g_idx"].__setitem__(0, 77))  # late failure
    rc, out = run("convert", src, tmp_path / "a" / "b" / "out")
    assert_refused(rc, out, "model.layers.1.mlp.down_proj.g_idx")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------------
# 4. Shapes are refused by name before anything is allocated
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,needle", [
    ("qweight-0-cols", f"{Q}.qweight: out_features (dim 1) must be in [1, "),
    ("g_idx-1e9", "tensor 'model.layers.0.self_attn.q_proj.g_idx' has 512 bytes, its shape and dtype need 4000000000"),
    ("qweight-1e12-rows", f"{Q}.qweight: out_features (dim 1) must be in [1, 16777216], got 0"),
])
def test_implausible_shapes_are_refused_before_allocating(tmp_path, case, needle):
    src = copy_fixture(tmp_path / "src")
    header, data = read_st(src / "model.safetensors")
    entry = header[f"{Q}.qweight" if case != "g_idx-1e9" else f"{Q}.g_idx"]
    b = entry["data_offsets"][0]
    if case == "qweight-0-cols":  # 0 bytes that would make the dequant allocate K = 1.25e8 rows
        entry.update(shape=[31250000, 0], data_offsets=[b, b])
        del header[f"{Q}.g_idx"]
    elif case == "g_idx-1e9":
        entry["shape"] = [10**9]
    else:
        entry.update(shape=[10**12, 0], data_offsets=[b, b])
        del header[f"{Q}.g_idx"]
    write_st(src / "model.safetensors", header, data)
    refuse_convert(tmp_path, src, needle)


# ---------------------------------------------------------------------------------------------------
# 5. A tensor the index does not list is never dropped silently
# ---------------------------------------------------------------------------------------------------


def shard_fixture(src: Path) -> dict:
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(src / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[half:]}, str(src / "model-00002-of-00002.safetensors"))
    (src / "model.safetensors").unlink()
    weight_map = {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def test_tensor_missing_from_the_index_is_refused_by_name(tmp_path):
    src = copy_fixture(tmp_path / "src")
    weight_map = shard_fixture(src)
    del weight_map["model.norm.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refuse_convert(tmp_path, src, "stores 'model.norm.weight', which model.safetensors.index.json does not list")


# ---------------------------------------------------------------------------------------------------
# 6. One symlink rule: inside the folder, or the HF cache snapshot's blob store
# ---------------------------------------------------------------------------------------------------


def make_hf_cache(tmp_path: Path, sharded: bool = True) -> Path:
    """tmp/hub/models--org--name/{blobs/<sha>, snapshots/<rev>/<file> -> ../../blobs/<sha>}."""
    plain = copy_fixture(tmp_path / "plain")
    if sharded:
        shard_fixture(plain)
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in sorted(plain.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(f"../../blobs/{digest}")
    return snap


def test_sharded_hf_cache_snapshot_converts_like_the_plain_folder(tmp_path):
    snap = make_hf_cache(tmp_path)
    before = tree_hash(tmp_path / "hub")
    rc, out = run("convert", snap, tmp_path / "from-cache", "--verify")
    assert rc == 0 and "verify: OK" in out, out
    rc, out = run("convert", tmp_path / "plain", tmp_path / "from-plain")
    assert rc == 0, out
    a, b = output_tensors(tmp_path / "from-cache"), output_tensors(tmp_path / "from-plain")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "from-cache" / "tokenizer.json").is_symlink()
    tok = (tmp_path / "from-cache" / "tokenizer.json").read_bytes()
    assert tok == (tmp_path / "plain" / "tokenizer.json").read_bytes()
    assert tree_hash(tmp_path / "hub") == before


@pytest.mark.parametrize("what", ["side-file", "unindexed-shard", "indexed-shard", "hf-outside-blobs"])
def test_symlinks_out_of_the_folder_are_refused_and_nothing_is_copied(tmp_path, what):
    secret = tmp_path / "secret"
    secret.mkdir()
    if what == "hf-outside-blobs":
        src = make_hf_cache(tmp_path, sharded=False)
    else:
        src = copy_fixture(tmp_path / "src")
    if what == "side-file" or what == "hf-outside-blobs":
        (secret / "notes.txt").write_text("private")
        (src / "notes.txt").symlink_to(secret / "notes.txt")
        needle = "'notes.txt' is a symlink to"
    elif what == "unindexed-shard":
        shutil.move(src / "model.safetensors", secret / "model.safetensors")
        (src / "model.safetensors").symlink_to(secret / "model.safetensors")
        needle = "'model.safetensors' is a symlink to"
    else:
        shard_fixture(src)
        shutil.move(src / "model-00002-of-00002.safetensors", secret / "s2.safetensors")
        (src / "model-00002-of-00002.safetensors").symlink_to(secret / "s2.safetensors")
        needle = "'model-00002-of-00002.safetensors' is a symlink to"
    refuse_convert(tmp_path, src, needle, "outside the model folder")


def test_fifo_named_like_a_shard_does_not_hang(tmp_path):
    src = copy_fixture(tmp_path / "src")
    (src / "model.safetensors").unlink()
    os.mkfifo(src / "model.safetensors")
    rc, out = run_subprocess("convert", src, tmp_path / "out", timeout=120)  # the old code blocked forever
    assert_refused(rc, out, "model.safetensors: 'model.safetensors' is not a regular file")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# 7. One line instead of a traceback
# ---------------------------------------------------------------------------------------------------


def _header_edit(fn):
    def damage(src: Path) -> None:
        header, data = read_st(src / "model.safetensors")
        fn(header)
        write_st(src / "model.safetensors", header, data)
    return damage


def _cfg_edit(fn):
    return lambda src: edit_config(src, fn)


def _raw_config(text: bytes):
    return lambda src: (src / "config.json").write_bytes(text)


ONE_LINE_CASES = {
    "data_offsets-strings": (_header_edit(lambda h: h[f"{Q}.scales"].update(data_offsets=["0", "256"])),
                             f"corrupted header entry for '{Q}.scales': 'data_offsets' must be two"),
    "data_offsets-float": (_header_edit(lambda h: h[f"{Q}.scales"].update(
        data_offsets=[float(h[f"{Q}.scales"]["data_offsets"][0]), h[f"{Q}.scales"]["data_offsets"][1]])),
        "'data_offsets' must be two non-negative integers"),
    "not_convert-int": (_cfg_edit(lambda q: q.update(modules_to_not_convert=5)),
                        "field 'modules_to_not_convert' must be a list of module names, got 5"),
    "not_convert-string": (_cfg_edit(lambda q: q.update(modules_to_not_convert="lm_head")),
                           "field 'modules_to_not_convert' must be a list"),
    "in_block-int": (_cfg_edit(lambda q: q.update(modules_in_block_to_quantize=7)),
                     "field 'modules_in_block_to_quantize' must be a list"),
    "in_block-dict": (_cfg_edit(lambda q: q.update(modules_in_block_to_quantize={"a": 1})),
                      "field 'modules_in_block_to_quantize' must be a list"),
    "config-latin1": (_raw_config('{"model_type": "qwen3", "name": "caf\xe9"}'.encode("latin-1")),
                      "config.json: not UTF-8"),
    "config-deep": (_raw_config(b"[" * 100000 + b"]" * 100000), "config.json: JSON nested too deeply"),
    "qweight-0d": (_header_edit(lambda h: (h[f"{Q}.qweight"].update(
        shape=[], data_offsets=[h[f"{Q}.qweight"]["data_offsets"][0], h[f"{Q}.qweight"]["data_offsets"][0] + 4]))),
        f"{Q}.qweight: expected a 2-D int32 tensor, got int32 ()"),
    "qweight-1d": (_header_edit(lambda h: h[f"{Q}.qweight"].update(
        shape=[h[f"{Q}.qweight"]["shape"][0] * h[f"{Q}.qweight"]["shape"][1]])),
        f"{Q}.qweight: expected a 2-D int32 tensor, got int32 (2048,)"),
    "config-list": (_raw_config(b"[1, 2]"), "config.json: expected a JSON object, got a JSON list"),
}


@pytest.mark.parametrize("case", sorted(ONE_LINE_CASES))
def test_bad_input_gives_one_line_not_a_traceback(tmp_path, case):
    damage, needle = ONE_LINE_CASES[case]
    src = copy_fixture(tmp_path / "src")
    damage(src)
    refuse_convert(tmp_path, src, needle)
    before = tree_hash(src)
    rc, out = run("inspect", src)  # inspect reads the same files: the same verdict, one line
    assert_refused(rc, out, needle)
    assert tree_hash(src) == before


def test_per_channel_layer_with_k_0_is_refused(tmp_path):
    src = copy_fixture(tmp_path / "src", PER_CHANNEL)
    header, data = read_st(src / "model.safetensors")
    for part in ("qweight", "g_idx"):
        e = header[f"{Q}.{part}"]
        e.update(shape=[0] + e["shape"][1:], data_offsets=[e["data_offsets"][0]] * 2)
    write_st(src / "model.safetensors", header, data)
    refuse_convert(tmp_path, src, f"{Q}.qweight: in_features must be in [1, ")


@pytest.mark.parametrize("size", ["nanGB", "infGB", "-infMB", "1e400GB", "0.0000001B"])
def test_bad_max_shard_size_names_the_flag(tmp_path, size):
    rc, out = run("convert", ACT_ORDER, tmp_path / "out", f"--max-shard-size={size}")
    assert_refused(rc, out, f"--max-shard-size: cannot read {size!r}")


def test_destination_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    rc, out = run("convert", ACT_ORDER, tmp_path / "file" / "out")
    assert_refused(rc, out, f"{tmp_path / 'file'}: not a directory (the destination would be inside it)")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the read-only case "
                                               "needs an unprivileged user")
def test_read_only_destination(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        rc, out = run("convert", ACT_ORDER, parent / "out")
        assert_refused(rc, out, "Permission denied")
    finally:
        parent.chmod(0o755)


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG, like a full disk: the same OSError path as ENOSPC
    on a real file system (this process only, for the duration; the hard limit is left alone)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


# The output's one shard is ~854 KB: fill the "disk" at its header, mid-shard and at its last bytes;
# "side-file": the shard, index and config.json fit, the copy of a 2 MB notes file does not.
@pytest.mark.parametrize("limit", [0, 100, 300_000, 853_000, "side-file"])
def test_disk_full_at_any_fill_level(tmp_path, limit):
    """A write that cannot complete ends with one line and no partial output, wherever it happens."""
    src = ACT_ORDER
    if limit == "side-file":
        src = copy_fixture(tmp_path / "src")
        (src / "notes.txt").write_bytes(b"n" * 2_000_000)
        limit = 1_000_000
    dst = tmp_path / "out"
    with file_size_limit(limit):
        rc, out = run("convert", src, dst)
    assert_refused(rc, out, "File too large", "nothing was written")
    assert not dst.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# 8. Each header is parsed once
# ---------------------------------------------------------------------------------------------------


def test_each_header_is_parsed_once(tmp_path, monkeypatch):
    src = copy_fixture(tmp_path / "src")
    edit_tensors(src, lambda t: t.update({f"extra.{i}": torch.zeros(1, dtype=torch.bfloat16)
                                           for i in range(2000)}))
    calls: list[Path] = []
    real = ckpt_mod.read_safetensors_header

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(ckpt_mod, "read_safetensors_header", counting)
    rc, out = run("convert", src, tmp_path / "out")
    assert rc == 0, out
    source_reads = [p for p in calls if Path(p).parent == src.resolve()]
    assert len(source_reads) == 1, f"{len(source_reads)} parses of the source header for 2067 tensors"


# ---------------------------------------------------------------------------------------------------
# 9. Smaller items
# ---------------------------------------------------------------------------------------------------


def test_bias_of_the_wrong_shape_is_refused(tmp_path):
    src = copy_fixture(tmp_path / "src")
    edit_tensors(src, lambda t: t.update({f"{Q}.bias": torch.zeros(7, dtype=torch.bfloat16)}))
    refuse_convert(tmp_path, src, f"{Q}.bias: expected shape (128,) (out_features), got (7,)",
                   extra=("--verify",))


def test_huge_config_is_refused_without_reading_it(tmp_path):
    src = copy_fixture(tmp_path / "src")
    with open(src / "config.json", "r+b") as f:  # sparse: 1 GB on paper, nothing on disk
        f.truncate(10**9)
    refuse_convert(tmp_path, src, "config.json: 1000000000 bytes; JSON files over 64 MiB are refused")


def test_header_over_the_cap_names_the_cap(tmp_path):
    src = copy_fixture(tmp_path / "src")
    with open(src / "model.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 200_000_000))
    refuse_convert(tmp_path, src, "claims 200000000 bytes, over the 100000000-byte limit")


def test_negative_offset_names_the_field(tmp_path):
    src = copy_fixture(tmp_path / "src")
    _header_edit(lambda h: h[f"{Q}.scales"].update(
        data_offsets=[-256, h[f"{Q}.scales"]["data_offsets"][1] - h[f"{Q}.scales"]["data_offsets"][0] - 256]))(src)
    refuse_convert(tmp_path, src, f"'{Q}.scales': 'data_offsets' must be two non-negative integers")


def test_inspect_refuses_a_list_config_like_convert(tmp_path):
    src = copy_fixture(tmp_path / "src")  # quantize_config.json stays beside it
    (src / "config.json").write_text("[]")
    rc, out = run("inspect", src)
    assert_refused(rc, out, "config.json: expected a JSON object, got a JSON list")


# ---------------------------------------------------------------------------------------------------
# The property: any mutation of header or config -> exit 1 with one line, or a correct output
# ---------------------------------------------------------------------------------------------------

_SRC_BASE = None


def _pristine() -> Path:
    global _SRC_BASE
    if _SRC_BASE is None:
        _SRC_BASE = Path(tempfile.mkdtemp(prefix="gptq-hostile-"))
        copy_fixture(_SRC_BASE / "fixture")
    return _SRC_BASE / "fixture"


_ANY = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=6), lambda c: st.lists(c, max_size=3) | st.dictionaries(
                        st.text(max_size=4), c, max_size=2), max_leaves=6)
_DIM = st.one_of(st.integers(-3, 300), st.sampled_from([0, 1, 2**31, 10**12]), _ANY)
_CONFIG_FIELDS = ["bits", "group_size", "sym", "desc_act", "checkpoint_format", "format", "quant_method",
                  "lm_head", "dynamic", "modules_to_not_convert", "modules_in_block_to_quantize",
                  "pack_dtype"]


@st.composite
def mutations(draw):
    """A list of edits to a fixture's safetensors header or quantization config."""
    header, _ = read_st(_pristine() / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["dtype", "shape", "dim", "offsets", "shift", "drop", "entry", "config",
                                     "config-value", "length", "rename"]))
        name = draw(st.sampled_from(names))
        if kind == "dtype":
            edits.append((kind, name, draw(st.sampled_from(
                ["F32", "F16", "BF16", "I32", "I64", "I8", "U8", "BOOL", "F64", "F8_E4M3", "U32", "X", 7]))))
        elif kind == "shape":
            edits.append((kind, name, draw(st.lists(_DIM, max_size=3) | _ANY)))
        elif kind == "dim":
            edits.append((kind, name, draw(st.integers(0, 2)), draw(_DIM)))
        elif kind == "offsets":
            edits.append((kind, name, draw(st.lists(st.integers(-300, 600_000) | _ANY, max_size=3) | _ANY)))
        elif kind == "shift":
            edits.append((kind, name, draw(st.integers(-64, 64))))
        elif kind in ("drop", "rename"):
            edits.append((kind, name, draw(st.sampled_from(["weight", "qweight", "g_idx", "bias", "x"]))))
        elif kind == "entry":
            edits.append((kind, name, draw(_ANY)))
        elif kind == "length":
            edits.append((kind, draw(st.integers(-16, 16))))
        else:
            field = draw(st.sampled_from(_CONFIG_FIELDS))
            value = draw(st.sampled_from([2, 3, 4, 8, 5, -1, 0, 32, 64, 127, True, False, None, "gptq",
                                          "gptq_v2", [], ["lm_head"], {}, {".*": {"bits": 2}},
                                          {"-:.*q_proj": {}}]) | _ANY) if kind == "config-value" else None
            edits.append(("config", field, value, kind == "config"))
    return edits


def _apply(src: Path, edits) -> None:
    header, data = read_st(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    length_delta = 0
    for e in edits:
        kind = e[0]
        if kind == "config":
            _, field, value, delete = e
            if delete:
                cfg["quantization_config"].pop(field, None)
            else:
                cfg["quantization_config"][field] = value
            continue
        if kind == "length":
            length_delta = e[1]
            continue
        name = e[1]
        if name not in header:
            continue
        entry = header[name]
        if kind == "dtype" and isinstance(entry, dict):
            entry["dtype"] = e[2]
        elif kind == "shape" and isinstance(entry, dict):
            entry["shape"] = e[2]
        elif kind == "dim" and isinstance(entry, dict) and isinstance(entry.get("shape"), list):
            if e[2] < len(entry["shape"]):
                entry["shape"][e[2]] = e[3]
        elif kind == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = e[2]
        elif kind == "shift" and isinstance(entry, dict):
            off = entry.get("data_offsets")
            if isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) for o in off):
                entry["data_offsets"] = [off[0] + e[2], off[1] + e[2]]
        elif kind == "drop":
            del header[name]
        elif kind == "rename":
            header[name.rpartition(".")[0] + "." + e[2]] = header.pop(name)
        elif kind == "entry":
            header[name] = e[2]
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "quantize_config.json").unlink(missing_ok=True)
    blob = json.dumps(header).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", max(0, len(blob) + length_delta)) + blob + data)


def check_one_draw(edits, verify: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="draw-", dir=_pristine().parent))
    try:
        src = work / "src"
        shutil.copytree(_pristine(), src)
        _apply(src, edits)
        before = tree_hash(src)
        dst = work / "out" / "dst"
        args = ["convert", src, dst] + (["--verify"] if verify else [])
        rc, out = run(*args)
        assert rc in (0, 1), f"{edits}\n{out}"
        assert "Traceback" not in out, f"{edits}\n{out}"
        assert tree_hash(src) == before, edits
        if rc == 1:
            lines = [line for line in out.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("gptq-ascend convert: error: "), f"{edits}\n{out}"
            assert not (work / "out").exists(), edits  # no DST, no .partial-, no parent it created
        else:
            check_output_is_correct(src, dst, edits)
        rc, iout = run("inspect", src)
        assert rc in (0, 1) and "Traceback" not in iout, f"{edits}\n{iout}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_output_is_correct(src: Path, dst: Path, edits) -> None:
    """An output that exited 0: finite everywhere, and every tensor equal to the float64 reference of
    the (mutated) source: format.dequantize for layers, the source value cast for the rest."""
    config = fmt.GPTQConfig.load(src)
    source = Checkpoint.open(src)
    got = output_tensors(dst)
    layers = source.quantized_layers()
    expected_names = {f"{p}.weight" for p in layers} | {
        n for n in source.names() if n.rpartition(".")[0] not in layers
        or n.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx")}
    assert set(got) == expected_names, edits
    for name, t in got.items():
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), f"{name}: Inf/NaN in an output that exited 0; {edits}"
        prefix = name[: -len(".weight")]
        if prefix in layers and name.endswith(".weight"):
            spec = config.spec_for(prefix)
            lt = source.layer_tensors(prefix)
            ref = fmt.dequantize(lt, spec, lt.in_features(spec), torch.float64).t()
            fi = torch.finfo(t.dtype)  # one ulp, or one subnormal step where the value underflows
            assert torch.allclose(t.double(), ref, rtol=fi.eps, atol=fi.tiny * fi.eps), (name, edits)
        else:
            s = source.get(name)
            ref = s.to(t.dtype) if s.is_floating_point() else s
            assert torch.equal(t, ref), (name, edits)


_PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                 derandomize=True)


@settings(max_examples=40, **_PROPERTY)
@given(edits=mutations(), verify=st.booleans())
def test_any_header_or_config_mutation_is_refused_in_one_line_or_converted_exactly(edits, verify):
    check_one_draw(edits, verify)


@pytest.mark.slow
@settings(max_examples=1500, **{**_PROPERTY, "derandomize": False})
@given(edits=mutations(), verify=st.booleans())
def test_any_mutation_long_run(edits, verify):
    check_one_draw(edits, verify)


def teardown_module() -> None:
    if _SRC_BASE is not None:
        shutil.rmtree(_SRC_BASE, ignore_errors=True)


