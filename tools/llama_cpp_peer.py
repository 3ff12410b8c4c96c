"""llama.cpp as the peer of the end-to-end benchmark: built from PyPI's llama-cpp-python source, cached.

    python tools/llama_cpp_peer.py build [--version 0.3.36] [--tier avx2]  # download the sdist, build the tools
    python tools/llama_cpp_peer.py gguf HF_DIR OUT.gguf              # a dense Qwen3 checkpoint -> GGUF
    python tools/llama_cpp_peer.py quantize IN.gguf OUT.gguf Q8_0    # llama.cpp's own llama-quantize

The sdist (`pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`) vendors llama.cpp and
its gguf-py; nothing is installed into any environment. Everything lives under
``$XDG_CACHE_HOME/gptq-ascend`` (default ~/.cache/gptq-ascend): ``sdist/`` the downloaded archive,
``llama.cpp-VERSION/src`` the unpacked source, ``llama.cpp-VERSION/build`` the cmake build (Release,
GGML_NATIVE=ON so ggml compiles for this CPU, static, no network code; ``build-noamx`` on AMX CPUs, see
NO_AMX; ``build-avx2`` for ``--tier avx2``, an AVX2-only CPU's build). A build takes ~7 minutes on 2
cores and is reused as long as its binaries exist.

The GGUF writer copies a dense (unquantized) Hugging Face checkpoint tensor for tensor, bit for bit (BF16
stays BF16, FP16 stays F16, FP32 stays F32; 1-D norm weights become F32 as llama.cpp's own converter
writes them), with tensor names from gguf-py's own name map. It writes no tokenizer (vocabulary type
"none" with the model's vocabulary size): llama-bench and llama-batched-bench feed random token ids, so
speed needs none, but llama.cpp cannot tokenize text with these files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

DEFAULT_VERSION = "0.3.36"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF")
# ggml's AMX matmul (compiled in by GGML_NATIVE on AMX CPUs) died with SIGSEGV in ggml_backend_amx_mul_mat
# on every Q8_0/Q4_0 file at llama.cpp 0c1e570 on this project's AMX Xeon (KVM). Turning the extra buffer
# types off at run time (--repack 0) also drops the repacked Q4_0/Q8_0 layouts, ggml's fastest AVX-512
# paths (Q4_0 1.2-1.4x slower without them there), so on AMX CPUs the AMX code is compiled out instead
# (explicit -mno-* win over -march=native in GCC and Clang) into its own build directory.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# Tiers the peer can be built for. "native" is GGML_NATIVE (this CPU's best, AMX compiled out as above);
# "avx2" is ggml's own non-native default set (SSE4.2, AVX, AVX2, BMI2, FMA, F16C; no AVX-512), i.e. what
# an AVX2-only CPU such as Zen 1 builds natively, so that an AVX-512 host can stand in for one (next to
# GPTQ_ASCEND_CPU_ISA=avx2 on the plugin's side).
TIERS = ("native", "avx2")


def cpu_has_amx() -> bool:
    try:
        return any(line.startswith("flags") and "amx_int8" in line.split()
                   for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


def cmake_flags(amx_cpu: bool, tier: str = "native") -> list[str]:
    if tier == "avx2":
        return [f if f != "-DGGML_NATIVE=ON" else "-DGGML_NATIVE=OFF" for f in CMAKE_FLAGS]
    return list(CMAKE_FLAGS) + ([f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"] if amx_cpu else [])


# Architectures the writer knows: the Hugging Face class and gguf-py's MODEL_ARCH member. Qwen3 is the only
# one the benchmarks need; a new one needs its own hyper-parameter keys checked against llama.cpp's loader.
ARCHS = {"Qwen3ForCausalLM": "QWEN3"}


class LlamaCppError(RuntimeError):
    """A one-line reason the peer cannot be set up or run."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptq-ascend"


@dataclass(frozen=True)
class LlamaCpp:
    version: str
    root: Path  # llama.cpp-VERSION
    tier: str = "native"  # of TIERS

    @property
    def source(self) -> Path:
        return self.root / "src" / "vendor" / "llama.cpp"

    @property
    def build_dir(self) -> Path:
        if self.tier == "avx2":
            return self.root / "build-avx2"
        return self.root / ("build-noamx" if cpu_has_amx() else "build")

    def tool(self, name: str) -> Path:
        return self.build_dir / "bin" / name

    @property
    def built(self) -> bool:
        return all(os.access(self.tool(t), os.X_OK) for t in TOOLS)

    def commit(self) -> str:
        """The llama.cpp commit the build reports (``llama-bench --version``), or "unknown"."""
        try:
            out = subprocess.run([str(self.tool("llama-bench")), "--version"], capture_output=True,
                                 text=True, timeout=60)
        except OSError:
            return "unknown"
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("version:"):
                return line.split(":", 1)[1].strip()
        return "unknown"


def ensure_source(version: str = DEFAULT_VERSION, gguf_only: bool = False, tier: str = "native") -> LlamaCpp:
    """Download (once) and unpack llama-cpp-python's sdist; with ``gguf_only`` just its gguf-py."""
    if tier not in TIERS:
        raise LlamaCppError(f"unknown llama.cpp build tier {tier!r}; expected one of {', '.join(TIERS)}")
    lc = LlamaCpp(version, cache_root() / f"llama.cpp-{version}", tier)
    marker = lc.source / "CMakeLists.txt"
    if (lc.source / "gguf-py" / "gguf" / "__init__.py").exists() and (gguf_only or marker.exists()):
        return lc
    sdist_dir = cache_root() / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                               "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}",
                               "-d", str(sdist_dir)], capture_output=True, text=True)
        if proc.returncode != 0 or not sdist.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LlamaCppError(f"pip download of llama-cpp-python=={version} failed: {tail[0]}")
    prefix = f"llama_cpp_python-{version}/"
    keep = prefix + "vendor/llama.cpp/gguf-py/" if gguf_only else prefix
    tmp = lc.root / "src.partial"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(keep)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(tmp, members=members, filter="data")
    if (lc.root / "src").exists():
        # A gguf-only unpack being upgraded to the full source: replace it whole.
        subprocess.run(["rm", "-rf", str(lc.root / "src")], check=True)
    tmp.rename(lc.root / "src")
    return lc


def ensure_built(version: str = DEFAULT_VERSION, jobs: int | None = None, log=sys.stderr,
                 tier: str = "native") -> LlamaCpp:
    """Build llama-bench, llama-batched-bench and llama-quantize once for this CPU (or, with ``tier``
    "avx2", for an AVX2-only one); return the handle."""
    lc = ensure_source(version, tier=tier)
    if lc.built:
        return lc
    jobs = jobs or len(os.sched_getaffinity(0))
    print(f"building llama.cpp from llama-cpp-python {version} in {lc.build_dir} "
          f"(~7 min on 2 cores) ...", file=log, flush=True)
    steps = [["cmake", "-S", str(lc.source), "-B", str(lc.build_dir), *cmake_flags(cpu_has_amx(), lc.tier)]
             # A configured directory keeps its generator (cmake refuses to switch it).
             + (["-G", "Ninja"] if _which("ninja") and not (lc.build_dir / "CMakeCache.txt").exists() else []),
             ["cmake", "--build", str(lc.build_dir), "-j", str(jobs), "--target", *TOOLS]]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            (lc.root / "build-error.log").write_text(proc.stdout + proc.stderr)
            raise LlamaCppError(f"{' '.join(step[:2])} failed (exit {proc.returncode}); log in "
                                f"{lc.root / 'build-error.log'}")
    if not lc.built:
        raise LlamaCppError(f"the build finished but {', '.join(TOOLS)} are not all in {lc.build_dir / 'bin'}")
    return lc


def _which(name: str) -> bool:
    return any(os.access(Path(p) / name, os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep))


def import_gguf(lc: LlamaCpp) -> ModuleType:
    """The gguf-py package that ships inside the sdist (no pip install, no dependency)."""
    path = str(lc.source / "gguf-py")
    # Only while importing: gguf-py also holds a top-level `tests` package, which would shadow this
    # project's tests/ for every later import (and for vLLM's spawned workers, which inherit sys.path).
    sys.path.insert(0, path)
    try:
        import gguf
    finally:
        sys.path.remove(path)

    if not str(Path(gguf.__file__).resolve()).startswith(str(Path(path).resolve())):
        raise LlamaCppError(f"an installed gguf package ({gguf.__file__}) shadows the one in {path}")
    return gguf


def write_gguf(hf_dir: Path, out: Path, gguf: ModuleType) -> dict:
    """Write ``hf_dir`` (a dense Qwen3 safetensors checkpoint) as one GGUF file; return a summary.

    Streams one tensor at a time (header and tensor table first, then the data), so memory stays at
    one tensor. Writes to ``out.partial`` and renames, so a failure leaves no file that looks finished.
    """
    import numpy as np
    import torch
    from safetensors import safe_open

    cfg_path = hf_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise LlamaCppError(f"{cfg_path}: cannot read the model config ({e})") from None
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHS:
        raise LlamaCppError(f"{cfg_path}: architecture {arch!r} is not one the GGUF writer knows "
                            f"(expected one of {', '.join(ARCHS)})")
    if "quantization_config" in cfg:
        raise LlamaCppError(f"{cfg_path}: has a quantization_config; the GGUF writer takes a dense "
                            "checkpoint (convert it first: gptq-ascend convert)")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise LlamaCppError(f"{hf_dir}: no *.safetensors files")
    # transformers 5 keeps rope_theta in rope_parameters; older configs at the top level.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta"))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if theta is None or rope_type != "default":
        raise LlamaCppError(f"{cfg_path}: rope {rope_type!r} with theta {theta}; the GGUF writer handles only "
                            "the default rope with a rope_theta")
    if cfg.get("use_sliding_window"):
        raise LlamaCppError(f"{cfg_path}: use_sliding_window is on; the GGUF writer handles full attention only")
    model_arch = getattr(gguf.MODEL_ARCH, ARCHS[arch])
    n_layers = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(model_arch, n_layers)

    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    plan = []  # (hf name, gguf name, torch dtype kept, ggml type)
    file_dtype = None
    for key in where:
        if key.startswith("lm_head.") and cfg.get("tie_word_embeddings"):
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise LlamaCppError(f"{hf_dir}: tensor {key} has no GGUF name in gguf-py's map for {arch}")
        sl = where[key].get_slice(key)
        dtype = sl.get_dtype()
        shape = sl.get_shape()
        if len(shape) == 1:
            kept, ggml = torch.float32, gguf.GGMLQuantizationType.F32
        elif dtype == "BF16":
            kept, ggml = torch.bfloat16, gguf.GGMLQuantizationType.BF16
        elif dtype == "F16":
            kept, ggml = torch.float16, gguf.GGMLQuantizationType.F16
        elif dtype == "F32":
            kept, ggml = torch.float32, gguf.GGMLQuantizationType.F32
        else:
            raise LlamaCppError(f"{hf_dir}: tensor {key} has dtype {dtype}; expected BF16, F16 or F32")
        if len(shape) > 1:
            file_dtype = file_dtype or ggml
        plan.append((key, gname, kept, ggml, tuple(shape)))

    ftype = {gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
             gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
             gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32}[file_dtype]
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[model_arch])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_name(hf_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(int(ftype))
    w.add_tokenizer_model("none")
    itemsize = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
    np_view = {torch.bfloat16: (torch.int16, np.uint16), torch.float16: (torch.float16, np.float16),
               torch.float32: (torch.float32, np.float32)}
    for _, gname, kept, ggml, shape in plan:
        n = 1
        for s in shape:
            n *= s
        w.add_tensor_info(gname, shape, np.dtype(np_view[kept][1]), n * itemsize[kept], raw_dtype=ggml)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = 0
    for key, _, kept, _, _ in plan:
        t = where[key].get_tensor(key).to(kept).contiguous()
        view, npt = np_view[kept]
        arr = t.view(view).numpy().view(npt)
        w.write_tensor_data(arr)
        total += arr.nbytes
    w.close()
    partial.rename(out)
    return {"path": str(out), "tensors": len(plan), "bytes": total, "arch": gguf.MODEL_ARCH_NAMES[model_arch],
            "file_type": ftype.name}


def quantize(lc: LlamaCpp, src: Path, out: Path, qtype: str, threads: int | None = None,
             head_type: str | None = None) -> Path:
    """``llama-quantize src out QTYPE`` (llama.cpp's own choices per tensor), via ``out.partial``.
    ``head_type`` (e.g. ``F16``) keeps the token embedding and the output matrix in that type instead
    (``--token-embedding-type`` / ``--output-tensor-type``; a tied embedding is both)."""
    partial = out.with_name(out.name + ".partial")
    head = ["--token-embedding-type", head_type, "--output-tensor-type", head_type] if head_type else []
    cmd = [str(lc.tool("llama-quantize")), *head, str(src), str(partial), qtype,
           str(threads or len(os.sched_getaffinity(0)))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise LlamaCppError(f"llama-quantize {qtype} of {src} failed (exit {proc.returncode}): {' | '.join(tail)}")
    partial.rename(out)
    return out


def bench(lc: LlamaCpp, model: Path, threads: int, repeats: int, prompt: int, gen: int,
          batch: int = 8, repack: bool = True) -> dict:
    """Batch-1 decode and prefill with llama-bench; batch-``batch`` decode with llama-batched-bench.

    llama-bench: ``-p PROMPT -n GEN -r REPEATS`` (pp and tg are separate tests, tg from an empty
    context); TTFT is taken as the pp time (prefill of PROMPT tokens). llama-batched-bench: PROMPT
    tokens per sequence then GEN tokens in each of ``batch`` sequences, run REPEATS times (it has no
    repetition option; ``-c 0`` = the model's context length: in this llama.cpp an explicit ``-c`` made
    it skip every batch). Its last result line is often lost at exit (the log is written by a thread
    that is not flushed), so a batch-1 run follows the measured one and is discarded. Medians of the
    per-run rates. ``repack`` off = no extra buffer types (ggml's AMX and repacked-weight layouts).
    """
    base = [str(model), "-t", str(threads)]
    proc = subprocess.run([str(lc.tool("llama-bench")), "-m", *base, "-p", str(prompt), "-n", str(gen),
                           "-r", str(repeats), "-o", "json", "--repack", str(int(repack))],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise LlamaCppError(f"llama-bench on {model} failed (exit {proc.returncode}): "
                            f"{proc.stderr.strip().splitlines()[-1:] or ''}")
    rows = json.loads(proc.stdout)
    tg = next(r for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0)
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    pp_ms = statistics.median(pp["samples_ns"]) / 1e6
    result = {"decode_tok_s_b1": statistics.median(tg["samples_ts"]), "decode_tok_s_b1_runs": tg["samples_ts"],
              "ttft_s": pp_ms / 1000, "prefill_tok_s": statistics.median(pp["samples_ts"]),
              "weight_bytes": int(tg["model_size"]), "n_params": int(tg["model_n_params"]),
              "llama_cpp_commit": tg.get("build_commit", "unknown"), "threads": threads,
              "cpu_info": tg.get("cpu_info", ""), "repack": repack}
    if batch == 1:  # llama-bench's figure is the batch-1 one; batched-bench would overwrite it
        return result
    rates = []
    for _ in range(repeats):
        proc = subprocess.run([str(lc.tool("llama-batched-bench")), "-m", *base, "-c", "0",
                               "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(gen),
                               "-npl", f"{batch},1", "--output-format", "jsonl",
                               "--repack" if repack else "--no-repack"],
                              capture_output=True, text=True)
        line = next((r for r in map(_json_or_none, proc.stdout.splitlines()) if r and r.get("pl") == batch), None)
        if proc.returncode != 0 or line is None:
            raise LlamaCppError(f"llama-batched-bench on {model} gave no result (exit {proc.returncode}; it "
                                f"skips a batch whose {batch} x {prompt + gen} tokens exceed the model's "
                                f"context): {proc.stderr.strip().splitlines()[-1:] or ''}")
        rates.append(float(line["speed_tg"]))
    result[f"decode_tok_s_b{batch}"] = statistics.median(rates)
    result[f"decode_tok_s_b{batch}_runs"] = rates
    return result


def _json_or_none(line: str) -> dict | None:
    try:
        return json.loads(line) if line.startswith("{") else None
    except ValueError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python release whose source to use")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the source and build the tools (cached)")
    b.add_argument("--tier", choices=TIERS, default="native",
                   help="native: GGML_NATIVE for this CPU; avx2: ggml's AVX2 set, as an AVX2-only CPU builds")
    g = sub.add_parser("gguf", help="write a dense Qwen3 checkpoint as GGUF")
    g.add_argument("hf_dir", type=Path)
    g.add_argument("out", type=Path)
    q = sub.add_parser("quantize", help="run llama-quantize")
    q.add_argument("src", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("qtype")
    args = ap.parse_args()
    try:
        if args.cmd == "build":
            lc = ensure_built(args.version, tier=args.tier)
            print(f"llama.cpp {lc.commit()} in {lc.build_dir / 'bin'}")
        elif args.cmd == "gguf":
            if args.out.exists():
                raise LlamaCppError(f"{args.out}: exists; not overwriting")
            print(json.dumps(write_gguf(args.hf_dir, args.out, import_gguf(ensure_source(args.version, True)))))
        else:
            print(quantize(ensure_built(args.version), args.src, args.out, args.qtype))
    except LlamaCppError as e:
        raise SystemExit(f"llama_cpp_peer: {e}") from None


if __name__ == "__main__":
    main()
