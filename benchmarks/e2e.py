"""End-to-end: online GPTQ (gptq_ascend) vs the dense model in vLLM, and llama.cpp on the same weights.

    python -m benchmarks.e2e [--layers 28] [--modes ...] [--peer] [--dtype auto] [--rounds 1]
                             [--model GPTQ_DIR] [--device cpu|npu] [--json out.json] [--plot out.png]

Without --model it makes (once, cached in --workdir) a Qwen3-1.7B-shaped GPTQ checkpoint with synthetic
weights (tools/make_synthetic_gptq.py; int8 and, for online-int4, int4) and the int8 one's
`gptq-ascend convert --dtype bfloat16` form. With --model it takes a user's GPTQ checkpoint and converts
it once (cached in --workdir, keyed by the checkpoint's path, sizes and mtimes) for the offline modes.

Modes, each in its own process (so peak RSS and start-up are that mode's alone), one after the other:
  online-int8, online-int4  vLLM, --quantization gptq_ascend, activations in --dtype
  online-int8-head8, -int4-head8  the same with the opt-in int8 lm_head (GPTQ_ASCEND_LM_HEAD=int8),
                            like llama.cpp's quantized files, whose output matrix is quantized too
  online-int8-a8, -int4-a8 (and -a8-head8)  the same with the opt-in int8 activations
                            (GPTQ_ASCEND_CPU_W8A8=1: llama.cpp's Q8_0 / Q4_0 arithmetic)
  offline-bf16, -fp16, -fp32  vLLM, the converted dense checkpoint loaded in that dtype
  llama-bf16, -q8_0, -q4_0  llama.cpp (tools/llama_cpp_peer.py: built from PyPI's llama-cpp-python source,
                            cached): the converted checkpoint written as a BF16 GGUF bit for bit, then
                            llama.cpp's own llama-quantize to Q8_0 / Q4_0; timed with llama-bench
                            (batch 1, TTFT = its prompt-processing time) and llama-batched-bench (batch 8)
  llama-q8_0-head16, -q4_0-head16  the same with the embedding / output matrix kept in F16
                            (llama-quantize --token-embedding-type / --output-tensor-type F16), as our
                            exact lm_head keeps the checkpoint's: the like-for-like peer of online-int8 /
                            -int4 (the plain llama files quantize it to Q8_0 / Q6_K, like our -head8)
--peer adds the five llama modes; `make bench-e2e-peer` runs a 12-layer model with them.

Per vLLM mode: start-up, weight memory (parameters and buffers, plus the weights vLLM's CPU path moved
into oneDNN handles), peak RSS, time to first token for a 128-token prompt, and decode tokens/s at each
batch size (greedy, ignore_eos, prefix caching off). Decode rate = extra tokens / extra time between a
1-token and an N-token generation, the median of --repeats runs. Prompts: a model with a tokenizer gets
text encoded by its own tokenizer (special tokens included, so BOS is there when the tokenizer adds
one) cut to 128 tokens; the synthetic model has no tokenizer and gets fixed token ids. --rounds N runs
the whole list N times, interleaved, and reports each figure's median over the rounds (the machine is
shared: compare modes only within one invocation).

--device npu: online gptq_ascend vs offline FP16 on vLLM-Ascend, each in eager and graph mode (eager
only with --enforce-eager), decode at batch 1, 8 and 64. It needs an Ascend NPU, torch_npu and
vllm-ascend, and refuses to start without them; no figure of it has been measured yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
SHORT = {v: k for k, v in DTYPES.items()}
VLLM_MODES = ("online-int8", "online-int4", "online-int8-head8", "online-int4-head8", "online-int8-a8",
              "online-int4-a8", "online-int8-a8-head8", "online-int4-a8-head8", "offline-bf16", "offline-fp16",
              "offline-fp32")
# `-head8`: the same online mode with the opt-in int8 lm_head (GPTQ_ASCEND_LM_HEAD=int8). llama.cpp's
# Q8_0 / Q4_0 files quantize the tied output matrix too (Q8_0 / Q6_K), so this is the like-for-like
# column against them; the plain online modes keep the checkpoint's dense lm_head.
HEAD8 = "-head8"
LM_HEAD_ENV, LM_HEAD_INT8_ENV = "GPTQ_ASCEND_LM_HEAD", "GPTQ_ASCEND_LM_HEAD_INT8"
# `-a8`: the opt-in int8-activation kernels (GPTQ_ASCEND_CPU_W8A8=1; docs/cpu-kernel.md states their
# accuracy cost), the arithmetic of llama.cpp's Q8_0 / Q4_0 dot products. Only these modes get the switch.
A8, W8A8_ENV = "-a8", "GPTQ_ASCEND_CPU_W8A8"
LLAMA_MODES = {"llama-bf16": None, "llama-q8_0": "Q8_0", "llama-q4_0": "Q4_0", "llama-q8_0-head16": "Q8_0",
               "llama-q4_0-head16": "Q4_0"}
# `-head16`: llama-quantize told to keep the (tied) embedding / output matrix in F16, as the checkpoint and
# our default online modes keep it; the like-for-like column for our exact lm_head, where the plain Q8_0 /
# Q4_0 files quantize it (Q8_0 / Q6_K) as our opt-in -head8 does.
HEAD16, HEAD16_TYPE = "-head16", "F16"
ALL_MODES = VLLM_MODES + tuple(LLAMA_MODES)
DEFAULT_CPU_MODES = ("online-int8", "online-int4", "offline-bf16", "offline-fp32")
PROMPT_LEN = 128
# --cpu-tier avx2 stands an AVX-512 host in for an AVX2-only CPU (Zen 1, Haswell): the plugin's kernels
# forced to their AVX2 tier, oneDNN and MKL (vLLM's and torch's dense paths) capped at AVX2, llama.cpp
# built with ggml's AVX2 set instead of -march=native, and the default activation dtype such a CPU gets.
# vLLM's own kernels (attention, norms) keep the host's ISA: they have no run-time cap.
TIER_ENV = {"native": {}, "avx2": {"GPTQ_ASCEND_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                   "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
TIER_FLAGS = {"avx2": {"avx2", "fma", "f16c"}}


def base_mode(mode: str) -> str:
    """The checkpoint a mode runs: ``online-int8-a8-head8`` runs ``online-int8``'s."""
    return mode.removesuffix(HEAD8).removesuffix(A8)

# Long enough to give 128 tokens with any tokenizer; each prompt gets its own number first so that no
# two prompts of a batch share a prefix.
PROMPT_TEXT = ("The harbour was quiet that morning. Fishing boats rocked against the pier while the "
               "market opened its shutters, and a bell rang twice from the old tower above the square. "
               "Traders unloaded crates of oranges, salt cod and copper pans; a child chased pigeons "
               "between the stalls; and somewhere a radio played a song about the sea. By noon the "
               "tide had turned, the wind had risen from the west, and the ferry to the islands left "
               "forty minutes late with its deck full of bicycles, baskets and sleeping dogs. ") * 3


class E2EError(Exception):
    """A one-line refusal: printed as ``benchmarks.e2e: ...`` with exit status 2, no traceback."""


# ---- machine facts ---------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_dtype(flags: set[str] | None = None) -> str:
    """The activation dtype vLLM runs fastest on this CPU: bf16 where the CPU has a native BF16 dot
    product (AVX512-BF16 or AMX-BF16; vLLM's oneDNN path uses it), else fp32 (without it bf16 is
    emulated, and oneDNN's bf16 primitive may not even build, so vLLM falls back to torch)."""
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def machine() -> dict:
    info = {"cpu": platform.processor() or "", "cores": len(os.sched_getaffinity(0)),
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    info["isa_flags"] = sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                                        "avx512_bf16", "avx512vbmi", "avx512_fp16", "amx_bf16", "amx_int8"})
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (idx / "level").read_text().strip() == "3":
                info["l3"] = (idx / "size").read_text().strip()
        except OSError:
            pass
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    info["commit"] = proc.stdout.strip() or "unknown"
    for var in ("GPTQ_ASCEND_CPU_ISA", "GPTQ_ASCEND_CPU_W8A8", "VLLM_CPU_KVCACHE_SPACE", "ONEDNN_MAX_CPU_ISA",
                "MKL_ENABLE_INSTRUCTIONS", "GPTQ_ASCEND_LM_HEAD"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info


def probe_bandwidth(threads: int) -> float:
    """DRAM read GB/s right now (benchmarks.dequant's probe: torch.sum over 1 GiB, median of 5), in a
    process of its own so it neither disturbs nor is disturbed by a mode; recorded beside each mode, since
    a shared host's bandwidth moves between minutes (this project's Xeon read 6.8-19.9 GB/s within 25
    minutes on 2026-12-01, docs/notes/issue-11-e2e-peer.md "Session 6")."""
    code = (f"import statistics, torch; torch.set_num_threads({threads}); "
            "from benchmarks.dequant import measure_bandwidth; print(statistics.median(measure_bandwidth(1024, 5)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    try:
        return float(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise E2EError(f"the bandwidth probe failed (exit {proc.returncode}): "
                       f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}") from None


def llama_repack(choice: str) -> bool:
    """Whether llama.cpp may use its extra buffer types (the repacked Q4_0/Q8_0 layouts). ``auto`` = on:
    on AMX CPUs the peer's build has the crashing AMX path compiled out (tools/llama_cpp_peer.py), so the
    repacked layouts, its fastest CPU paths, can stay on everywhere."""
    return choice != "off"


def npu_status() -> tuple[bool, str]:
    """(usable, reason): an Ascend NPU visible through torch_npu, and vllm-ascend importable."""
    try:
        import torch
        import torch_npu  # noqa: F401
    except Exception as e:  # ImportError, or torch_npu's own errors without CANN
        return False, f"torch_npu does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        if not torch.npu.is_available() or torch.npu.device_count() == 0:
            return False, "torch_npu imports but sees no NPU device"
    except Exception as e:
        return False, f"torch.npu cannot query devices ({type(e).__name__}: {e})"
    try:
        import vllm_ascend  # noqa: F401
    except Exception as e:
        return False, f"vllm-ascend does not import ({type(e).__name__}: {e})"
    return True, "ok"


# ---- models --------------------------------------------------------------------------------------


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise E2EError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}")


def convert(src: Path, dst: Path, dtype: str) -> Path:
    if not dst.exists():
        _run([sys.executable, "-m", "gptq_ascend", "convert", str(src), str(dst), "--dtype", dtype],
             f"converting {src}")
    return dst


def read_quant(model: Path) -> dict:
    cfg_path = model / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise E2EError(f"{cfg_path}: cannot read the model config ({e})") from None
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "gptq" or "bits" not in q:
        raise E2EError(f"{cfg_path}: no GPTQ quantization_config (quant_method 'gptq' with 'bits'); "
                       "--model takes a GPTQ checkpoint")
    return cfg


def user_cache_key(model: Path) -> str:
    """The converted copy is reused while the checkpoint's path, file sizes and mtimes are unchanged."""
    h = hashlib.sha256(str(model.resolve()).encode())
    for f in sorted(model.glob("*")):
        if f.suffix in (".safetensors", ".json"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def prepare(args: argparse.Namespace, modes: list[str]) -> dict[str, Path]:
    """The model folder (or GGUF file) each mode runs, made once and cached in --workdir."""
    wd = args.workdir
    offline_dtype = "float16" if args.device == "npu" else "bfloat16"
    dense_needed = any(m.startswith(("offline-", "llama-")) for m in modes)
    paths: dict[str, Path] = {}
    if args.model:
        cfg = read_quant(args.model)
        bits = int(cfg["quantization_config"]["bits"])
        for m in modes:
            if m.startswith("online-") and base_mode(m) != f"online-int{bits}":
                raise E2EError(f"{args.model / 'config.json'}: a {bits}-bit checkpoint cannot run mode {m} "
                               f"(use online-int{bits})")
        paths[f"gptq-int{bits}"] = args.model
        if dense_needed:
            key = user_cache_key(args.model)
            paths["dense"] = convert(args.model, wd / f"{args.model.name}-{key}-{DTYPES[offline_dtype]}",
                                     offline_dtype)
    else:
        tag = f"qwen3-1.7b-l{args.layers}" + (f"-v{args.vocab}" if args.vocab else "")
        for bits in (8, 4):
            if f"online-int{bits}" in map(base_mode, modes) or (bits == 8 and dense_needed):
                out = wd / f"{tag}-gptq-int{bits}"
                if not out.exists():
                    cmd = [sys.executable, str(ROOT / "tools" / "make_synthetic_gptq.py"), str(out),
                           "--preset", "qwen3-1.7b", "--layers", str(args.layers), "--bits", str(bits)]
                    if args.vocab:
                        cmd += ["--vocab", str(args.vocab)]
                    _run(cmd, "making the synthetic checkpoint")
                paths[f"gptq-int{bits}"] = out
        if dense_needed:
            paths["dense"] = convert(paths["gptq-int8"], wd / f"{tag}-{DTYPES[offline_dtype]}", offline_dtype)
    if any(m in LLAMA_MODES for m in modes):
        paths.update(prepare_gguf(paths["dense"], [m for m in modes if m in LLAMA_MODES], args))
    return paths


def prepare_gguf(dense: Path, modes: list[str], args: argparse.Namespace) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tools"))
    import llama_cpp_peer as lcpp

    try:
        lc = lcpp.ensure_built(args.llama_cpp_version, tier=args.cpu_tier)
        src = dense.parent / f"{dense.name}.gguf"
        if not src.exists():
            print(f"writing {src} ...", file=sys.stderr, flush=True)
            lcpp.write_gguf(dense, src, lcpp.import_gguf(lc))
        out = {}
        for m in modes:
            qtype = LLAMA_MODES[m]
            if qtype is None:
                out[m] = src
                continue
            head = HEAD16_TYPE if m.endswith(HEAD16) else None
            dst = dense.parent / f"{dense.name}-{qtype.lower()}{HEAD16 if head else ''}.gguf"
            if not dst.exists():
                print(f"llama-quantize {qtype} -> {dst} ...", file=sys.stderr, flush=True)
                lcpp.quantize(lc, src, dst, qtype, head_type=head)
            out[m] = dst
        return out
    except lcpp.LlamaCppError as e:
        raise E2EError(f"llama.cpp peer: {e}") from None


def build_prompts(model: str, count: int, length: int) -> tuple[list[list[int]], str]:
    """Token-id prompts and how they were built.

    A model with a tokenizer: its own encode (``add_special_tokens`` on, as at serving time, so BOS
    is there exactly when the tokenizer adds it), the first ``length`` ids kept. Without one (the
    synthetic model) fixed ids, distinct per prompt.
    """
    folder = Path(model)
    if any(folder.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        prompts = []
        for i in range(count):
            ids = tok(f"{i + 1}. {PROMPT_TEXT}")["input_ids"]
            if len(ids) < length:
                raise E2EError(f"{model}: the tokenizer gives only {len(ids)} tokens for the built-in "
                               f"text; {length} needed")
            prompts.append(ids[:length])
        bos = tok.bos_token_id
        how = (f"tokenizer encode (special tokens on), BOS {bos} first" if bos is not None and
               all(p[0] == bos for p in prompts) else "tokenizer encode (special tokens on), no BOS added by it")
        return prompts, how
    return ([[(17 * i + 31 * j) % 1000 + 10 for j in range(length)] for i in range(count)],
            "fixed token ids (model has no tokenizer)")


# ---- workers -------------------------------------------------------------------------------------


def vllm_worker(args: argparse.Namespace) -> dict:
    """One vLLM mode, in this process."""
    t0 = time.perf_counter()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    mode = args.worker
    online = mode.startswith("online-")
    dtype = args.dtype if online else SHORT[mode.split("-")[1]]
    batches = [int(b) for b in args.batches.split(",")]
    prompts_ids, prompt_how = build_prompts(str(args.model), max(batches), PROMPT_LEN)
    max_pos = json.loads((Path(args.model) / "config.json").read_text()).get("max_position_embeddings", 1024)
    kwargs = dict(model=str(args.model), quantization="gptq_ascend" if online else None, dtype=dtype,
                  skip_tokenizer_init=True, enforce_eager=args.enforce_eager, max_model_len=min(1024, max_pos),
                  max_num_seqs=max(16, max(batches)), seed=0, enable_prefix_caching=False)
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0

    def weight_bytes(model) -> int:
        seen, total = set(), 0
        for t in list(model.parameters()) + list(model.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        # vLLM's CPU path moves unquantized linear weights into oneDNN handles and leaves an empty
        # `weight` behind; count what the handle holds (same shape and dtype as the weight it packed).
        for m in model.modules():
            w = getattr(m, "weight", None)
            if hasattr(m, "cpu_linear") and isinstance(w, torch.Tensor) and w.numel() == 0:
                n = getattr(m, "output_size_per_partition", getattr(m, "output_size", 0))
                k = getattr(m, "input_size_per_partition", getattr(m, "input_size", 0))
                total += n * k * w.element_size()
            # The opt-in int8 lm_head keeps its packed copy on the quant method, beside the dense weight
            # the tied embedding still reads; so does our dense GEMV its 16-bit copy of a float32 head.
            qm = getattr(m, "quant_method", None)
            extra = list(getattr(getattr(qm, "_packed", None), "tensors", {}).values())
            if isinstance(getattr(qm, "w16", None), torch.Tensor):
                extra.append(qm.w16)
            for t in extra:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    weights = sum(llm.apply_model(weight_bytes))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts_ids]

    def timed(batch: int, tokens: int) -> float:
        sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        out = llm.generate(prompts[:batch], sp, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == tokens for o in out)
        return elapsed

    timed(1, 4)  # warm-up
    result = {"mode": mode, "dtype": dtype, "device": args.device, "enforce_eager": args.enforce_eager,
              "startup_s": startup, "weight_bytes": weights, "prompt": prompt_how}
    if online:  # the method the plugin put on the lm_head (it logs why at load)
        result["lm_head"] = ",".join(sorted(set(llm.apply_model(
            lambda m: type(getattr(getattr(m, "lm_head", None), "quant_method", None)).__name__))))
    if online and args.device == "cpu":
        from gptq_ascend.backends.cpu import kernel_config

        result["kernel"] = kernel_config()
    ttft = [timed(1, 1) for _ in range(args.repeats)]
    result["ttft_s"] = statistics.median(ttft)
    for batch in batches:
        rates = []
        for _ in range(args.repeats):
            short, long = timed(batch, 1), timed(batch, args.decode_tokens)
            rates.append(batch * (args.decode_tokens - 1) / (long - short))
        result[f"decode_tok_s_b{batch}"] = statistics.median(rates)
        result[f"decode_tok_s_b{batch}_runs"] = rates
    if args.device == "npu":
        result["peak_device_bytes"] = torch.npu.max_memory_allocated()
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def llama_worker(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    import llama_cpp_peer as lcpp

    lc = lcpp.LlamaCpp(args.llama_cpp_version, lcpp.cache_root() / f"llama.cpp-{args.llama_cpp_version}",
                       args.cpu_tier)
    batch = max(int(b) for b in args.batches.split(","))
    try:
        result = lcpp.bench(lc, Path(args.model), args.threads, args.repeats, PROMPT_LEN, args.decode_tokens,
                            batch=batch, repack=llama_repack(args.llama_repack))
    except lcpp.LlamaCppError as e:
        raise E2EError(str(e)) from None
    # What llama-quantize chose per tensor (it keeps norms F32 and may give the tied embedding, which is
    # also the output matrix, a type of its own): the bytes per token differ from a uniform Q8_0 / Q4_0.
    from collections import Counter

    reader = lcpp.import_gguf(lc).GGUFReader(args.model)
    result["tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    result["token_embd_type"] = next(t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight")
    del reader
    result.update(mode=args.worker, dtype=args.worker.split("-")[1], device="cpu", startup_s=None,
                  prompt="llama-bench random token ids", llama_cpp_version=args.llama_cpp_version,
                  llama_build=lc.build_dir.name,
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    return result


def mode_env(mode: str, args: argparse.Namespace, environ: dict | None = None) -> dict:
    """The environment a mode's process gets (from ``environ``, default os.environ)."""
    env = dict(os.environ if environ is None else environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    # Only the -head8 modes run the int8 lm_head, whatever the shell says; another GPTQ_ASCEND_LM_HEAD
    # choice (auto / ours / vllm) is passed on to the other online modes.
    env.pop(LM_HEAD_INT8_ENV, None)
    if env.get(LM_HEAD_ENV) == "int8":
        env.pop(LM_HEAD_ENV)
    if mode.endswith(HEAD8):
        env[LM_HEAD_ENV] = "int8"
    env.pop(W8A8_ENV, None)
    if mode.removesuffix(HEAD8).endswith(A8):
        env[W8A8_ENV] = "1"
    if args.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")
        env.update(TIER_ENV[args.cpu_tier])
    return env


def run_mode(mode: str, model: Path, args: argparse.Namespace, enforce_eager: bool) -> dict:
    env = mode_env(mode, args)
    cmd = [sys.executable, "-m", "benchmarks.e2e", "--worker", mode, "--model", str(model),
           "--repeats", str(args.repeats), "--decode-tokens", str(args.decode_tokens), "--dtype", args.dtype,
           "--device", args.device, "--batches", args.batches, "--threads", str(args.threads),
           "--llama-cpp-version", args.llama_cpp_version, "--llama-repack", args.llama_repack,
           "--cpu-tier", args.cpu_tier]
    if enforce_eager:
        cmd.append("--enforce-eager")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("E2E_RESULT "):
            return json.loads(line[len("E2E_RESULT "):])
    sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
    raise E2EError(f"mode {mode} failed (exit {proc.returncode}); its output is above")


# ---- report --------------------------------------------------------------------------------------


def label(r: dict) -> str:
    if r.get("device") == "npu":
        return f"{r['mode']}-{'eager' if r['enforce_eager'] else 'graph'}"
    return r["mode"]


def combine(rounds: list[dict]) -> dict:
    """Median of every numeric figure over the rounds of one mode; the per-round values kept."""
    out = dict(rounds[0])
    for k, v in rounds[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and all(
                isinstance(r.get(k), (int, float)) for r in rounds):
            out[k] = statistics.median(r[k] for r in rounds)
            if len(rounds) > 1 and k.startswith(("decode_tok_s", "ttft_s", "dram_read_gbs")):
                out[f"{k}_rounds"] = [r[k] for r in rounds]
    out["rounds"] = len(rounds)
    out["started"] = [r.get("started") for r in rounds]
    return out


def ratio_text(a: dict, b: dict, key: str) -> str:
    """a / b of the medians, and with several rounds also the ratio inside each round (the two modes ran
    minutes apart there, under the same state of the host) and the median of those."""
    text = f"{a[key] / b[key]:.2f}x"
    ra, rb = a.get(f"{key}_rounds"), b.get(f"{key}_rounds")
    if ra and rb and len(ra) == len(rb):
        per = [x / y for x, y in zip(ra, rb, strict=True)]
        text += f" (per round {' / '.join(f'{v:.2f}' for v in per)}, median {statistics.median(per):.2f}x)"
    return text


def ratios(results: list[dict], batch: int = 1) -> list[str]:
    key = f"decode_tok_s_b{batch}"
    by = {label(r): r for r in results}
    dense = [r for r in results if r["mode"].startswith("offline-") and key in r]
    lines = []
    best = max(dense, key=lambda r: r[key]) if dense else None
    for r in results:
        if not r["mode"].startswith("online-") or key not in r:
            continue
        if best:
            lines.append(f"{label(r)} / {label(best)} (best dense vLLM): {ratio_text(r, best, key)}")
        peer = {"online-int8": "llama-q8_0", "online-int4": "llama-q4_0"}.get(base_mode(r["mode"]))
        # An exact-head mode also meets the llama file whose output matrix stays F16 (the same bytes); a
        # -head8 mode only the plain one (both heads quantized).
        for p in (peer, f"{peer}{HEAD16}") if peer and not r["mode"].endswith(HEAD8) else (peer,):
            if p in by:
                lines.append(f"{label(r)} / {p}: {ratio_text(r, by[p], key)}")
    return lines


def table(results: list[dict], batches: list[int]) -> str:
    def fmt(v, f, scale=1.0, unit=""):
        return "-" if v is None else f"{v / scale:{f}}{unit}"

    head = f"{'mode':<20} {'dtype':<8} " + " ".join(f"{'decode b' + str(b):>10}" for b in batches)
    rows = [head + f" {'TTFT':>8} {'weights':>8} {'peak RSS':>8} {'start-up':>8} {'DRAM':>9}"]
    for r in results:
        rows.append(f"{label(r):<20} {r.get('dtype', ''):<8} "
                    + " ".join(f"{fmt(r.get(f'decode_tok_s_b{b}'), '.2f', unit='/s'):>10}" for b in batches)
                    + f" {fmt(r.get('ttft_s'), '.0f', 1e-3, 'ms'):>8} {fmt(r['weight_bytes'], '.2f', 1e9, 'GB'):>8}"
                    f" {fmt(r.get('peak_rss_bytes'), '.2f', 1e9, 'GB'):>8}"
                    f" {fmt(r.get('startup_s'), '.1f', unit='s'):>8}"
                    f" {fmt(r.get('dram_read_gbs'), '.1f', unit='GB/s'):>9}")
    return "\n".join(rows)


def plot(results: list[dict], batches: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(f"decode_tok_s_b{b}", f"decode tok/s, batch {b}") for b in batches]
    keys.append(("weight_bytes", "weight memory (GB)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.2))
    names = [label(r) for r in results]
    colors = ["tab:orange" if r["mode"].startswith("online") else "tab:green" if r["mode"].startswith("llama")
              else "tab:blue" for r in results]
    for ax, (key, title_k) in zip(axes, keys, strict=True):
        values = [(r.get(key) or 0) / (1e9 if key == "weight_bytes" else 1) for r in results]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title_k)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "e2e")
    ap.add_argument("--model", type=Path, help="a GPTQ checkpoint to benchmark instead of the synthetic one")
    ap.add_argument("--device", choices=("cpu", "npu"), default="cpu")
    ap.add_argument("--layers", type=int, default=28, help="synthetic model's layers (Qwen3-1.7B has 28; "
                    "12 is already beyond any L3 here and quicker)")
    ap.add_argument("--vocab", type=int, default=None, help="synthetic model's vocabulary (default 151936)")
    ap.add_argument("--modes", help=f"comma-separated, of {', '.join(ALL_MODES)} (default on CPU: "
                    f"{','.join(DEFAULT_CPU_MODES)}; on NPU: online-intN,offline-fp16)")
    ap.add_argument("--peer", action="store_true", help="add the llama.cpp modes (builds llama.cpp once, ~7 min)")
    ap.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                    help="activation dtype of the online modes (auto: bfloat16 on CPUs with a native BF16 dot "
                    "product, else float32; float16 on NPU)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure inside one mode (median)")
    ap.add_argument("--rounds", type=int, default=1, help="run the whole mode list this many times, "
                    "interleaved; figures are medians over the rounds")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batches", default=None, help="decode batch sizes (default 1,8 on CPU, 1,8,64 on NPU)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama.cpp threads")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="skip torch.compile (CPU) / run only eager, no graph mode (NPU)")
    ap.add_argument("--llama-cpp-version", default="0.3.36", help="llama-cpp-python release to build from")
    ap.add_argument("--llama-repack", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's extra buffer types (repacked weights); auto = on (on AMX CPUs the peer is "
                    "built with ggml's crashing AMX matmul compiled out)")
    ap.add_argument("--cpu-tier", choices=tuple(TIER_ENV), default=None,
                    help="avx2: run as an AVX2-only CPU would (the plugin's AVX2 kernels, oneDNN/MKL capped at "
                    "AVX2, llama.cpp built without AVX-512, float32 activations by default); vLLM's own "
                    "attention/norm kernels keep this CPU's ISA (default: avx2 when GPTQ_ASCEND_CPU_ISA=avx2 "
                    "is set, else native)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--plot", type=Path, help="write a PNG chart here")
    ap.add_argument("--worker", choices=ALL_MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("repeats", "rounds", "decode_tokens", "layers", "threads"):
        if getattr(args, name) < 1 or (name == "decode_tokens" and args.decode_tokens < 2):
            ap.error(f"--{name.replace('_', '-')} must be at least {2 if name == 'decode_tokens' else 1}")
    if args.batches is None:
        args.batches = "1,8,64" if args.device == "npu" else "1,8"
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches {args.batches!r}: expected comma-separated integers, e.g. 1,8")
    if not batches or min(batches) < 1 or 1 not in batches:
        ap.error(f"--batches {args.batches!r}: batch sizes must be >= 1 and include 1")
    if args.cpu_tier is None:
        args.cpu_tier = "avx2" if os.environ.get("GPTQ_ASCEND_CPU_ISA") == "avx2" else "native"
    if args.cpu_tier != "native":
        if args.device != "cpu":
            ap.error(f"--cpu-tier {args.cpu_tier} is a CPU setting; not with --device {args.device}")
        lacking = TIER_FLAGS[args.cpu_tier] - cpu_flags()
        if lacking:
            ap.error(f"--cpu-tier {args.cpu_tier}: this CPU lacks {', '.join(sorted(lacking))}")
    if args.dtype == "auto":
        args.dtype = ("float16" if args.device == "npu" else
                      default_dtype(TIER_FLAGS.get(args.cpu_tier)))
    if args.worker:
        return args
    if args.model is not None and not (args.model / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there (expected a GPTQ checkpoint folder)")
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in ALL_MODES]
        if bad or not modes:
            ap.error(f"--modes: unknown mode(s) {', '.join(bad) or '(none given)'}; expected of {', '.join(ALL_MODES)}")
    elif args.device == "npu":
        modes = ["online-int8", "offline-fp16"]
    else:
        modes = list(DEFAULT_CPU_MODES)
    if args.model is not None and not args.modes:
        bits = read_quant(args.model)["quantization_config"]["bits"]
        modes = [f"online-int{bits}"] + [m for m in modes if not m.startswith("online-")]
    if args.peer:
        modes += [m for m in LLAMA_MODES if m not in modes]
    if args.device == "npu":
        # the int8 lm_head and int8 activations are CPU-backend features: no -head8 / -a8 modes there
        wrong = [m for m in modes if m not in ("online-int8", "online-int4", "offline-fp16", "offline-bf16")]
        if wrong:
            ap.error(f"--device npu runs online-intN and offline-fp16/bf16 only, not {', '.join(wrong)}")
    args.mode_list = list(dict.fromkeys(modes))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = llama_worker(args) if args.worker in LLAMA_MODES else vllm_worker(args)
        print("E2E_RESULT " + json.dumps(result), flush=True)
        return
    if args.device == "npu":
        ok, why = npu_status()
        if not ok:
            raise E2EError(f"--device npu needs an Ascend NPU with torch_npu and vllm-ascend: {why}; "
                           "nothing was measured")
    modes = args.mode_list
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(args, modes)
    model_for = {m: paths[m] if m in LLAMA_MODES else
                 paths[base_mode(m).replace("online-", "gptq-")] if m.startswith("online-") else paths["dense"]
                 for m in modes}
    # enforce_eager values to run: on CPU the one asked for; on NPU eager and graph unless told eager only.
    graph_variants = [args.enforce_eager] if args.device == "cpu" or args.enforce_eager else [True, False]
    runs: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for mode in modes:
            for eager in graph_variants if mode not in LLAMA_MODES else [True]:
                tag = f"{mode}{'' if args.device == 'cpu' else '-eager' if eager else '-graph'}"
                print(f"[{time.strftime('%H:%M:%S')}] round {rnd + 1}/{args.rounds}: {tag} ...",
                      file=sys.stderr, flush=True)
                started = time.strftime("%H:%M:%S UTC", time.gmtime())
                bandwidth = probe_bandwidth(args.threads) if args.device == "cpu" else None
                result = run_mode(mode, model_for[mode], args, eager)
                result["started"] = started
                if bandwidth is not None:
                    result["dram_read_gbs"] = bandwidth
                runs.setdefault(tag, []).append(result)
                if args.json:  # what is done so far survives an interrupted run; not a result file
                    partial = args.json.with_name(args.json.name + ".partial")
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    partial.write_text(json.dumps({"complete": False, "runs": runs}, indent=2) + "\n")
    results = [combine(r) for r in runs.values()]
    batches = [int(b) for b in args.batches.split(",")]
    info = machine()
    info["cpu_tier"] = args.cpu_tier
    source = str(args.model) if args.model else f"synthetic Qwen3-1.7B shape, {args.layers} layers"
    emulated = ""
    if args.cpu_tier != "native":
        caps = ", ".join(f"{k}={v}" for k, v in TIER_ENV[args.cpu_tier].items())
        emulated = (f"{args.cpu_tier.upper()} TIER EMULATED on this CPU ({caps}; llama.cpp GGML_NATIVE=OFF; "
                    "vLLM's own kernels keep this CPU's ISA), ")
    header = (f"benchmarks.e2e {info['date_utc']} on {info['cpu']} ({info['cores']} cores, "
              f"{' '.join(info['isa_flags'])}), commit {info['commit']}: {source}, device {args.device}, "
              f"{emulated}online dtype {args.dtype}, {args.rounds} round(s) x {args.repeats} repeats, "
              f"{args.decode_tokens} decode tokens, enforce_eager={args.enforce_eager}")
    print(header)
    print(table(results, batches))
    for line in ratios(results):
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": info["date_utc"], "machine": info, "args": {
            k: str(v) for k, v in vars(args).items() if k != "worker"}, "results": results}, indent=2) + "\n")
        args.json.with_name(args.json.name + ".partial").unlink(missing_ok=True)
    if args.plot:
        plot(results, batches, args.plot, header[:160])


def cli(argv: list[str] | None = None) -> None:
    try:
        main(argv)
    except E2EError as e:
        print(f"benchmarks.e2e: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
