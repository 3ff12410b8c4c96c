"""End-to-end: online (GPTQ-Int8 through gptq_ascend) vs offline (converted BF16) in vLLM on this CPU.

    python -m benchmarks.e2e [--workdir DIR] [--layers 28] [--json out.json] [--plot out.png]

Makes (once, cached in --workdir) a full-size Qwen3-1.7B-shaped GPTQ-Int8 checkpoint with synthetic
weights (tools/make_synthetic_gptq.py) and its `gptq-ascend convert --dtype bfloat16` form, then runs
each mode in its own process (so peak RSS and start-up are that mode's alone) with the engine kept in-
process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Per mode: start-up time, weight memory (bytes of the model's
parameters and buffers), peak RSS, time to first token for a 128-token prompt, and decode tokens/s at
batch 1 and 8 (greedy, ignore_eos, prompt token ids: the synthetic model has no tokenizer). Weight
memory counts parameters and buffers, plus the weights vLLM's CPU path moved into oneDNN handles (same
size as the weight they packed). Decode rate = extra tokens / extra time between a 1-token and an
N-token generation, the median of --repeats runs. The two modes run one after the other in the same
invocation, so their ratio is the figure to quote; absolute numbers move with the load on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "online-int8": {"model": "gptq-int8", "quantization": "gptq_ascend"},
    "offline-bf16": {"model": "bf16", "quantization": None},
}


def prepare(workdir: Path, layers: int, vocab: int | None) -> dict[str, Path]:
    tag = f"qwen3-1.7b-l{layers}" + (f"-v{vocab}" if vocab else "")
    gptq = workdir / f"{tag}-gptq-int8"
    bf16 = workdir / f"{tag}-bf16"
    if not gptq.exists():
        cmd = [sys.executable, str(ROOT / "tools" / "make_synthetic_gptq.py"), str(gptq),
               "--preset", "qwen3-1.7b", "--layers", str(layers)]
        if vocab:
            cmd += ["--vocab", str(vocab)]
        subprocess.run(cmd, check=True)
    if not bf16.exists():
        subprocess.run([sys.executable, "-m", "gptq_ascend", "convert", str(gptq), str(bf16),
                        "--dtype", "bfloat16"], check=True)
    return {"gptq-int8": gptq, "bf16": bf16}


def worker(args: argparse.Namespace) -> None:
    """One mode, in this process: print a JSON line with its figures."""
    t0 = time.perf_counter()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    mode = MODES[args.worker]
    llm = LLM(model=args.model, quantization=mode["quantization"], dtype="bfloat16",
              skip_tokenizer_init=True, enforce_eager=args.enforce_eager, max_model_len=1024,
              max_num_seqs=16, seed=0)
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
        return total

    weights = sum(llm.apply_model(weight_bytes))
    prompt_len = 128
    prompts = [TokensPrompt(prompt_token_ids=[(17 * i + 31 * j) % 1000 + 10 for j in range(prompt_len)])
               for i in range(8)]

    def timed(batch: int, tokens: int) -> float:
        sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        out = llm.generate(prompts[:batch], sp, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == tokens for o in out)
        return elapsed

    timed(1, 4)  # warm-up
    result = {"mode": args.worker, "startup_s": startup, "weight_bytes": weights}
    ttft = [timed(1, 1) for _ in range(args.repeats)]
    result["ttft_s"] = statistics.median(ttft)
    for batch in (1, 8):
        rates = []
        for _ in range(args.repeats):
            short, long = timed(batch, 1), timed(batch, args.decode_tokens)
            rates.append(batch * (args.decode_tokens - 1) / (long - short))
        result[f"decode_tok_s_b{batch}"] = statistics.median(rates)
        result[f"decode_tok_s_b{batch}_runs"] = rates
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("E2E_RESULT " + json.dumps(result), flush=True)


def run_mode(mode: str, model: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    cmd = [sys.executable, "-m", "benchmarks.e2e", "--worker", mode, "--model", str(model),
           "--repeats", str(args.repeats), "--decode-tokens", str(args.decode_tokens)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("E2E_RESULT "):
            return json.loads(line[len("E2E_RESULT "):])
    sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
    raise SystemExit(f"benchmarks.e2e: mode {mode} failed (exit {proc.returncode})")


def table(results: list[dict]) -> str:
    base = next(r for r in results if r["mode"] == "offline-bf16")
    rows = [f"{'mode':<14} {'decode b1':>10} {'decode b8':>10} {'TTFT':>8} {'weights':>9} {'peak RSS':>9} "
            f"{'start-up':>8}  {'b1 vs BF16':>10}"]
    for r in results:
        rows.append(f"{r['mode']:<14} {r['decode_tok_s_b1']:>8.2f}/s {r['decode_tok_s_b8']:>8.2f}/s "
                    f"{r['ttft_s'] * 1000:>6.0f}ms {r['weight_bytes'] / 1e9:>7.2f}GB "
                    f"{r['peak_rss_bytes'] / 1e9:>7.2f}GB {r['startup_s']:>7.1f}s "
                    f"{r['decode_tok_s_b1'] / base['decode_tok_s_b1']:>9.2f}x")
    return "\n".join(rows)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["mode"] for r in results]
    for ax, key, label in ((axes[0], "decode_tok_s_b1", "decode tok/s, batch 1"),
                           (axes[1], "decode_tok_s_b8", "decode tok/s, batch 8"),
                           (axes[2], "weight_bytes", "weight memory (GB)")):
        values = [r[key] / (1e9 if key == "weight_bytes" else 1) for r in results]
        ax.bar(names, values, color=["tab:orange", "tab:blue"][: len(names)])
        ax.set_title(label)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.suptitle("Qwen3-1.7B-shaped model on vLLM CPU: GPTQ-Int8 online vs converted BF16")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "e2e")
    ap.add_argument("--layers", type=int, default=28, help="transformer layers (Qwen3-1.7B has 28)")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary (default 151936)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--enforce-eager", action="store_true", help="skip torch.compile in vLLM")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--plot", type=Path, help="write a PNG chart here")
    ap.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = prepare(args.workdir, args.layers, args.vocab)
    results = []
    for mode in args.modes.split(","):
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        results.append(run_mode(mode, models[MODES[mode]["model"]], args))
    print(f"benchmarks.e2e {time.strftime('%Y-%m-%d')}: {args.layers} layers, repeats {args.repeats}, "
          f"{args.decode_tokens} decode tokens, enforce_eager={args.enforce_eager}")
    if len(results) == len(MODES):
        print(table(results))
    else:
        print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "args": {
            k: str(v) for k, v in vars(args).items() if k not in ("worker", "model")}, "results": results},
            indent=2) + "\n")
    if args.plot and len(results) == len(MODES):
        plot(results, args.plot)


if __name__ == "__main__":
    main()
