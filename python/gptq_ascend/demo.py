"""`make demo`: serve a real GPTQ-Int8 model online, then its offline conversion, and compare.

1. ``vllm serve models/qwen3-pydoc-gptq-int8 --quantization gptq_ascend``; a completion request and a
   system + user chat request shaped like the original deployment's (completions: max_tokens 20,
   temperature 0.6, top_p 0.95, top_k 20; chat through the ``openai`` client, max_tokens 50).
2. ``gptq-ascend convert`` to FP16, served by plain ``vllm serve`` (no quantization flag); same requests.
3. A table: tokens/s, time to first token, weight bytes, start-up time, and whether the greedy outputs
   of the two modes agree.

The demo model (models/README.md) is a 4-layer Qwen3 trained on Python's own documentation, so its
answers are recognisably about Python when decoding is right. Servers are stopped on exit, Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import requests

from . import interrupts
from .checkpoint import Checkpoint
from .convert import convert
from .server_process import VllmServer
from .units import human_bytes

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "qwen3-pydoc-gptq-int8"
COMPLETION_PROMPT = "The for statement"
CHAT = [{"role": "system", "content": "You are a helpful assistant that knows the Python documentation."},
        {"role": "user", "content": 'What is the "for" statement?'}]
# Prompts whose greedy continuations do not hinge on a near-tie (models/README.md), so agreement
# between the modes measures the weights, not the float type.
GREEDY_PROMPTS = ['The "try" statement specifies', 'The "with" statement', "The for statement",
                  'The "if" statement', "The assert statement"]
SERVE_ARGS = ["--dtype", "float16", "--max-model-len", "1024", "--max-num-seqs", "8", "--served-model-name",
              "demo"]


def stream_completion(url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s, tokens) of one greedy streamed completion."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    first = last = None
    chunks = 0
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            if json.loads(line[6:])["choices"][0]["text"] is not None:
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    ttft = first - start
    rate = (chunks - 1) / (last - first) if chunks > 1 and last > first else float("nan")
    return ttft, rate, chunks


def exercise(server: VllmServer, label: str) -> dict:
    from openai import OpenAI

    url = server.url
    print(f"\n== {label}: {server.url} (ready after {server.ready_after:.1f} s)")
    r = requests.post(url + "/v1/completions", timeout=300, json={
        "model": "demo", "prompt": COMPLETION_PROMPT, "max_tokens": 20, "temperature": 0.6, "top_p": 0.95,
        "top_k": 20, "seed": 0})
    r.raise_for_status()
    print(f"/v1/completions  {COMPLETION_PROMPT!r} ->\n    {COMPLETION_PROMPT}{r.json()['choices'][0]['text']}")
    client = OpenAI(base_url=url + "/v1", api_key="EMPTY")
    chat = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=50, seed=0)
    print(f"/v1/chat/completions  {CHAT[1]['content']!r} ->\n    {chat.choices[0].message.content}")

    greedy = {}
    for p in GREEDY_PROMPTS:
        out = requests.post(url + "/v1/completions", timeout=300, json={
            "model": "demo", "prompt": p, "max_tokens": 24, "temperature": 0}).json()
        greedy[p] = out["choices"][0]["text"]
    stream_completion(url, COMPLETION_PROMPT, 8)  # warm-up
    runs = [stream_completion(url, COMPLETION_PROMPT, 128) for _ in range(3)]
    return {"greedy": greedy, "ttft_s": statistics.median(r[0] for r in runs),
            "tok_s": statistics.median(r[1] for r in runs), "startup_s": server.ready_after}


def weight_bytes(folder: Path) -> int:
    ckpt = Checkpoint.open(folder)
    return sum(ckpt.nbytes(name) for name in ckpt.names())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL, help="GPTQ checkpoint to demo")
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "demo", help="converted model and logs")
    args = ap.parse_args(argv)
    interrupts.install_handlers()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    try:
        print(f"$ vllm serve {args.model} --quantization gptq_ascend {' '.join(SERVE_ARGS)}")
        with VllmServer(args.model, ["--quantization", "gptq_ascend", *SERVE_ARGS],
                        args.workdir / "online.log") as server:
            server.wait_ready()
            results["online (GPTQ-Int8)"] = exercise(server, "online: GPTQ-Int8 through gptq_ascend")
        results["online (GPTQ-Int8)"]["weights"] = weight_bytes(args.model)

        fp16 = args.workdir / "qwen3-pydoc-fp16"
        print(f"\n$ gptq-ascend convert {args.model} {fp16} --force --verify")
        res = convert(args.model, fp16, force=True, verify=True)
        print(res.verify.summary())
        print(f"$ vllm serve {fp16} {' '.join(SERVE_ARGS)}")
        with VllmServer(fp16, SERVE_ARGS, args.workdir / "offline.log") as server:
            server.wait_ready()
            results["offline (FP16)"] = exercise(server, "offline: converted FP16, plain vLLM")
        results["offline (FP16)"]["weights"] = weight_bytes(fp16)
    except KeyboardInterrupt:
        print("\ndemo: interrupted; servers stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"\ndemo: {e}\n(logs in {args.workdir})", file=sys.stderr)
        return 1

    online, offline = results["online (GPTQ-Int8)"], results["offline (FP16)"]
    agree = sum(online["greedy"][p] == offline["greedy"][p] for p in GREEDY_PROMPTS)
    print("\n== greedy continuations (online | offline)")
    for p in GREEDY_PROMPTS:
        same = "same" if online["greedy"][p] == offline["greedy"][p] else "DIFFERENT"
        print(f"  [{same}] {p!r}\n      online : {online['greedy'][p]!r}\n      offline: {offline['greedy'][p]!r}")
    print(f"\n{'mode':<20} {'tok/s':>8} {'TTFT':>8} {'weights':>10} {'start-up':>9}")
    for name, r in results.items():
        print(f"{name:<20} {r['tok_s']:>8.1f} {r['ttft_s'] * 1000:>6.0f}ms {human_bytes(r['weights']):>10} "
              f"{r['startup_s']:>8.1f}s")
    print(f"greedy outputs agree: {agree}/{len(GREEDY_PROMPTS)} prompts")
    print(f"\n(figures from one run on this machine, {time.strftime('%Y-%m-%d')}; tok/s = median of 3 streamed "
          "128-token greedy completions at batch 1. This model is tiny: for speed, see "
          "`python -m benchmarks.e2e`.)")
    print("\nnext: `make test`; `gptq-ascend verify models/qwen3-pydoc models/qwen3-pydoc-gptq-int8`; "
          "`python -m benchmarks.dequant`; the README's serve and client examples.")
    (args.workdir / "demo.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if agree == len(GREEDY_PROMPTS) else 3


if __name__ == "__main__":
    sys.exit(main())
