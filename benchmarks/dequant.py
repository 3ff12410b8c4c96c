"""GPTQ dequant-GEMM kernels against dense BF16, vLLM's CPU paths and the memory floor.

    python -m benchmarks.dequant [--shapes qwen3-1.7b|qwen2.5-7b|KxN,...] [--m 1,4,16,64,256,1024]
                                 [--bits 8,4] [--dtype bf16] [--json FILE] [--plot FILE.png]
                                 [--device cpu|npu] [--quick]

Per layer shape, bit width and M, in one run:

* ``ours``     the backend's fused op (``gptq_ascend`` CPU kernel: ``torch.ops.gptq_ascend.cpu_gemm``);
* ``linear``   dense BF16 ``F.linear`` on the dequantized weight (what the offline-converted model runs);
* ``lin32``    dense fp32 ``F.linear`` on the same weight in fp32 (on CPUs without native BF16 -- AVX2 --
               fp32 is often the faster dense path; ``--no-f32-linear`` skips it);
* ``onednn``   vLLM's unquantized CPU GEMM on the same BF16 weight (``ops.create_onednn_mm`` /
               ``ops.onednn_mm``: what vLLM really runs for a BF16 linear on CPU);
* ``wna16``    (4-bit) vLLM's own GPTQ CPU kernel ``cpu_gemm_wna16`` on the same weights, repacked the
               way ``CPUWNA16LinearKernel._process_gptq_weights_w4a16`` does;
* ``w8a8``     our op with the opt-in int8-activation mode (GPTQ_ASCEND_CPU_W8A8=1), timed only at the M
               where the kernel then takes int8 activations (it says where: backends.cpu.int8_activations;
               the rule: docs/cpu-kernel.md, "Which calls take int8 x"): x rounded to int8 per
               row and group, AVX512-VNNI / AVX2 vpmaddwd, vpmaddubsw for nibbles; not the default
               (changes numerics);
* ``ref``      the pure-torch reference backend (``format.dequantize`` + matmul), for scale;
* ``floor``    the memory floor: the time to stream-read as many bytes as the GPTQ layer holds (qweight +
               scales + qzeros; ``torch.sum`` over fp32 buffers in rotation), measured per point in the
               same rounds as the methods.

Every method cycles through distinct copies of its weights totalling more than ``--rotate-mib``
(default: 3x this machine's L3 as sysfs reports it, at least 64 MiB; 320 MiB when sysfs has no L3): each
timed call reads weights no call has touched for more than an L3 of traffic, i.e. from DRAM, as in a
real model. Per
point: one warm-up pass over all copies, then rounds that call every method once in turn (at least one
call per copy, at least ``--repeats``, ``--budget`` seconds per method), median reported; interleaving
makes load changes on a shared host hit every method alike. Threads: ``torch.set_num_threads(cpu
count)``. Timings on a shared machine move with its load; ratios within one run are the figures to
quote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

SHAPES = {
    # name: [(label, in_features K, out_features N)]
    "qwen3-1.7b": [("qkv", 2048, 4096), ("o", 2048, 2048), ("gate_up", 2048, 12288), ("down", 6144, 2048)],
    "qwen2.5-7b": [("qkv", 3584, 4608), ("o", 3584, 3584), ("gate_up", 3584, 37888), ("down", 18944, 3584)],
    "quick": [("tiny", 256, 512)],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIB = 1 << 20


# ------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------


def setup_device(name: str) -> tuple[torch.device, callable]:
    """The torch device and a synchronize function; a clear error when the device is missing."""
    if name == "cpu":
        return torch.device("cpu"), lambda: None
    if name == "npu":
        try:
            import torch_npu  # noqa: F401
        except ImportError as e:
            raise SystemExit(
                f"--device npu needs torch_npu (the Ascend PyTorch adapter) and CANN; here: {e}. "
                "Run this on an Ascend host with `pip install torch_npu` matching torch "
                f"{torch.__version__}, and the CANN toolkit sourced (set_env.sh).") from None
        if not torch.npu.is_available():
            raise SystemExit("--device npu: torch_npu imports but reports no NPU (torch.npu.is_available() "
                             "is False): check the driver and ASCEND_RT_VISIBLE_DEVICES.")
        return torch.device("npu"), torch.npu.synchronize
    raise SystemExit(f"--device must be cpu or npu, got {name!r}")


def npu_methods(t, spec, k: int, dev: torch.device, rotate) -> dict[str, tuple]:
    """--device npu: every NPU path as its own column (fused, AscendC, Triton) and dense FP16
    ``torch.matmul``; a path that cannot run here is printed with its reason."""
    from gptq_ascend import format as fmt
    from gptq_ascend import ops
    from gptq_ascend.backends.ascend import bench

    methods = {}
    for path, packed in bench.pack_every_path(t, spec, k, dev).items():
        if isinstance(packed, str):
            print(f"  ({path} path unavailable: {packed})", file=sys.stderr)
            continue
        nb = sum(v.numel() * v.element_size() for v in packed.tensors.values())
        copies = [ops.PackedWeight(packed.backend, packed.spec, k, packed.out_features, d, packed.perm)
                  for d in rotate(packed.tensors, nb)]
        methods[path] = (len(copies), lambda x, c=copies, p=path: lambda i: bench.run_path(p, x, c[i]))
    w16 = [d["w"] for d in rotate({"w": fmt.dequantize(t, spec, k, torch.float16)}, k * t.out_features * 2)]
    methods["dense_fp16"] = (len(w16), lambda x: lambda i: torch.matmul(x.to(torch.float16), w16[i]))
    return methods


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------


def measure_bandwidth(mib: int = 1024, repeats: int = 5) -> list[float]:
    """Read bandwidth in GB/s: torch.sum over a buffer far larger than any L3, once per repeat."""
    buf = torch.ones(mib * MIB // 4, dtype=torch.float32)
    buf.sum()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        out.append(buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return out


# The clock every call is timed with: wall time by default; ``--cpu-time`` switches to the process's CPU
# time (time.process_time), which on a host with more runnable jobs than cores leaves out the time the
# benchmark spends preempted (with 1 thread it is the call's own run time; with more it sums the threads).
CLOCK = time.perf_counter


def time_interleaved(methods: dict[str, tuple], sync, repeats: int, budget: float) -> dict[str, tuple[float, int]]:
    """Median seconds per call of each method, timed in interleaved rounds: {name: (median, calls)}.

    ``methods`` maps a name to ``(fn, copies, mode)``: ``fn(i)`` runs on copy ``i`` (copies in rotation,
    so consecutive calls of one method read different weights), ``mode`` is a context manager entered
    around each call, outside the timer (the W8A8 switch). One round calls every method once, in turn, so
    a change in the machine's load or memory bandwidth -- large on shared hosts -- hits every method
    alike and the ratios between them hold; timing the methods one after another let a noisy minute
    move one column by 30%. Rounds continue to at least ``repeats`` and every copy of every method,
    then until ``budget`` seconds per method have passed (at least 3 rounds).
    """
    def call(name, i):
        fn, copies, mode = methods[name]
        with mode:
            t0 = CLOCK()
            fn(i % copies)
            sync()
            return CLOCK() - t0

    # Warm-up: every copy once (first touch, primitive caches, ...) when calls are cheap; a couple of
    # calls when they are long (compute-bound points, where the copies are not what is measured).
    for name, (_, copies, _) in methods.items():
        first = call(name, 0)
        for i in range(1, copies if first < 0.005 else 2):
            call(name, i)
    times: dict[str, list[float]] = {name: [] for name in methods}
    need = max([repeats] + [c for _, c, _ in methods.values()])
    start = time.perf_counter()
    r = 0
    while True:
        for name in methods:
            times[name].append(call(name, r))
        r += 1
        if r >= need or (r >= 3 and time.perf_counter() - start > budget * len(methods)):
            break
    return {name: (statistics.median(t), len(t)) for name, t in times.items()}


def l3_bytes() -> int | None:
    """The largest L3 of this machine (bytes) from sysfs, or None where sysfs has none (not Linux, VMs
    that hide it)."""
    best = None
    base = "/sys/devices/system/cpu"
    try:
        cpus = [d for d in os.listdir(base) if d.startswith("cpu") and d[3:].isdigit()]
    except OSError:
        return None
    for cpu in cpus:
        cache = os.path.join(base, cpu, "cache")
        try:
            entries = os.listdir(cache)
        except OSError:
            continue
        for idx in entries:
            try:
                with open(os.path.join(cache, idx, "level")) as f:
                    if f.read().strip() != "3":
                        continue
                with open(os.path.join(cache, idx, "size")) as f:
                    size = f.read().strip().upper()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            digits = size.rstrip("KMG")
            if digits.isdigit():
                best = max(best or 0, int(digits) * mult)
        break  # cpu0's caches; every core sees the same L3 on the machines this runs on
    return best


def default_rotate_mib() -> tuple[int, str]:
    l3 = l3_bytes()
    if l3 is None:
        return 320, "no L3 size in sysfs: assumed 320 MiB"
    return max(64, 3 * l3 // MIB), f"3x the L3 of {l3 // MIB} MiB (sysfs)"


def copies_for(bytes_per_copy: int, rotate_bytes: int) -> int:
    return max(2, math.ceil(rotate_bytes / max(bytes_per_copy, 1)))


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------


def random_layer(k: int, n: int, bits: int, group_size: int):
    """A random symmetric GPTQ layer as a v1 checkpoint stores it (qweight, qzeros, scales, g_idx)."""
    from gptq_ascend import format as fmt

    spec = fmt.QuantSpec(bits=bits, group_size=group_size, sym=True, desc_act=False, checkpoint_format="gptq")
    g = spec.num_groups(k)
    q = torch.randint(0, 2**bits, (k, n), dtype=torch.int32)
    z = torch.full((g, n), spec.sym_zero, dtype=torch.int32)
    scales = (torch.rand(g, n) * 0.01 + 0.001).to(torch.float16)
    t = fmt.GPTQTensors(fmt.pack(q, bits, 0), fmt.pack_zeros(z, spec), scales, fmt.default_g_idx(k, group_size))
    return t, spec


def gptq_bytes(t) -> int:
    return sum(x.numel() * x.element_size() for x in (t.qweight, t.qzeros, t.scales))


def wna16_repack(t, spec):
    """vLLM's CPUWNA16 repack of a symmetric 4-bit GPTQ layer (mixed_precision/cpu.py, w4a16)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        pack_quantized_values_into_int32,
        unpack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    wtype = scalar_types.uint4b8
    pack_factor = 32 // spec.bits
    input_size = t.qweight.shape[0] * pack_factor
    weight = unpack_quantized_values_into_int32(t.qweight, wtype, 0)
    weight = pack_quantized_values_into_int32(weight, wtype, 1)
    weight = (weight.view(input_size, -1, 16 // pack_factor).permute(1, 0, 2)
              .reshape(-1, input_size * 16 // pack_factor).contiguous())
    return weight


def int8_activation_ms(bits: int, ms: list[int], dtype: torch.dtype) -> list[int]:
    """The M of `ms` at which the opt-in mode gives this layer int8 activations: the kernel's own
    dispatch rule (backends.cpu.int8_activations), asked with the mode on; the other M would time
    the exact kernel again under the w8a8 label."""
    from gptq_ascend.backends.cpu import int8_activations

    with w8a8_mode(True):
        return [m for m in ms if int8_activations(bits, m, dtype)]


class w8a8_mode:
    """Switch the CPU kernel's opt-in int8-activation mode on for a block (no-op when off; reusable)."""

    def __init__(self, on: bool):
        self.on = on
        self.was = False

    def __enter__(self):
        if self.on:
            from gptq_ascend.backends.cpu import kernel_config, kernel_settings

            self.was = kernel_settings()["w8a8"] != "0"  # GPTQ_ASCEND_CPU_W8A8=1 stays on after the block
            kernel_config(w8a8=True)

    def __exit__(self, *exc):
        if self.on:
            from gptq_ascend.backends.cpu import kernel_config

            kernel_config(w8a8=self.was)


@dataclass
class Point:
    shape: str
    k: int
    n: int
    bits: int
    m: int
    ms: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    floor_ms: float = 0.0
    gptq_mib: float = 0.0
    agreement: dict[str, float] = field(default_factory=dict)  # relative difference from ours, M=4


def run_shape(label, k, n, bits, ms, args, dev, sync, rotate_bytes) -> list[Point]:
    from gptq_ascend import ops
    from gptq_ascend.backends.reference import ReferenceBackend

    act = DTYPES[args.dtype]
    t, spec = random_layer(k, n, bits, args.group_size)
    backend, _ = ops.choose_backend(dev.type, spec, k, n, prefer=args.backend)
    packed = backend.repack(t, spec, k)
    nbytes = gptq_bytes(t)

    def rotate(tensors: dict, nb: int) -> list[dict]:
        c = copies_for(nb, rotate_bytes)
        return [{name: v.clone().to(dev) for name, v in tensors.items()} for _ in range(c)]

    ours_nb = sum(v.numel() * v.element_size() for v in packed.tensors.values())
    ours = [ops.PackedWeight(packed.backend, packed.spec, k, n, d, packed.perm)
            for d in rotate(packed.tensors, ours_nb)]
    w_kn = backend.dequant(packed, torch.bfloat16)                  # [K, N]
    dense = [d["w"] for d in rotate({"w": w_kn.t().contiguous()}, k * n * 2)]  # [N, K] like nn.Linear
    methods = {
        "ours": (len(ours), lambda x: lambda i: backend.gemm(x, ours[i])),
        "linear": (len(dense), lambda x: lambda i: F.linear(x.to(torch.bfloat16), dense[i])),
    }
    if not args.no_f32_linear:
        dense32 = [d["w"] for d in rotate({"w": w_kn.t().float().contiguous()}, k * n * 4)]
        methods["lin32"] = (len(dense32), lambda x: lambda i: F.linear(x.float(), dense32[i]))
    # the opt-in int8-activation mode: same op, timed with the mode switched on, at the M where the
    # kernel then takes int8 activations (the kernel says where: int8_activation_ms)
    w8a8_ms = (int8_activation_ms(bits, ms, act)
               if dev.type == "cpu" and backend.name == "cpu" and not args.no_w8a8 else [])
    if w8a8_ms:
        methods["w8a8"] = methods["ours"]
    if dev.type == "cpu" and not args.no_vllm:
        try:
            from vllm import _custom_ops as vops

            handlers = [vops.create_onednn_mm(w.t(), 32) for w in dense]
            methods["onednn"] = (len(handlers),
                                 lambda x: lambda i: vops.onednn_mm(handlers[i], x.to(torch.bfloat16), None))
            if bits == 4 and k % 32 == 0 and n % 32 == 0:
                qw = wna16_repack(t, spec)
                sc = t.scales.to(torch.bfloat16)
                wq = rotate({"q": qw, "s": sc}, qw.numel() * 4 + sc.numel() * 2)
                methods["wna16"] = (len(wq), lambda x: lambda i: vops.cpu_gemm_wna16(
                    x.to(torch.bfloat16), wq[i]["q"], wq[i]["s"], None, None, 8, "vec"))
        except Exception as e:  # vLLM missing or its CPU ops unavailable: say so, keep going
            print(f"  (vLLM CPU ops unavailable: {type(e).__name__}: {e})", file=sys.stderr)
    if dev.type == "npu":
        methods.update(npu_methods(t, spec, k, dev, rotate))
    if not args.no_ref:
        ref = ReferenceBackend()
        rp = ref.repack(t, spec, k)
        methods["ref"] = (1, lambda x: lambda i: ref.gemm(x, rp))

    # Same weights, same product: every method against ours on one input, before timing anything.
    agree = {}
    x = torch.randn(16, k, dtype=torch.float32).to(act).to(dev)
    y_ours = methods["ours"][1](x)(0).float().cpu()
    for name, (_, make) in methods.items():
        if name != "ours":
            with w8a8_mode(name == "w8a8"):
                y = make(x)(0).float().cpu()
            agree[name] = float((y - y_ours).norm() / y_ours.norm())
            if agree[name] > 2e-2:
                print(f"  WARNING: {name} differs from ours by {agree[name]:.2e} (relative) on {label} int{bits}",
                      file=sys.stderr)

    # The memory floor, measured in the same rounds: a streaming read (torch.sum) of as many bytes as
    # the GPTQ layer holds, over copies in rotation like every method's weights.
    floor_bufs = rotate({"b": torch.ones(max(nbytes // 4, 1), dtype=torch.float32)}, nbytes)
    methods["floor"] = (len(floor_bufs), lambda x: lambda i: floor_bufs[i]["b"].sum())

    points = []
    for m in ms:
        x = torch.randn(m, k, dtype=torch.float32).to(act).to(dev)
        p = Point(label, k, n, bits, m, gptq_mib=nbytes / MIB, agreement=agree)
        timed = {}
        for name, (copies, make) in methods.items():
            if name == "ref" or (name == "w8a8" and m not in w8a8_ms):
                continue
            timed[name] = (make(x), copies, w8a8_mode(name == "w8a8"))
        results = time_interleaved(timed, sync, args.repeats, args.budget)
        if "ref" in methods and m <= args.ref_max_m:  # slow: timed on its own, a few calls
            copies, make = methods["ref"]
            results["ref"] = time_interleaved({"ref": (make(x), copies, w8a8_mode(False))}, sync, 2,
                                              args.budget / 4)["ref"]
        for name, (sec, calls) in results.items():
            if name == "floor":
                p.floor_ms = sec * 1e3
                continue
            p.ms[name] = sec * 1e3
            p.calls[name] = calls
        points.append(p)
        print(format_row(p), flush=True)
    return points


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

COLUMNS = ("ours", "w8a8", "linear", "lin32", "onednn", "wna16", "ref")
# --device npu adds one column per NPU path (gptq_ascend.backends.ascend.bench) and dense FP16.
NPU_COLUMNS = ("fused", "ascendc", "triton", "dense_fp16")
EXTRA_COLUMNS: tuple[str, ...] = ()


def dense_best(p: Point) -> float | None:
    vals = [p.ms[c] for c in ("linear", "lin32", "onednn") if c in p.ms]
    return min(vals) if vals else None


def format_header() -> str:
    head = f"{'shape':<8}{'K':>6}{'N':>7}{'bits':>5}{'M':>6} |"
    head += "".join(f"{c + ' ms':>11}" for c in COLUMNS + EXTRA_COLUMNS)
    head += f"{'floor ms':>10} |{'x linear':>9}{'x lin32':>9}{'x onednn':>9}{'x wna16':>9}"
    head += f"{'floor/ours':>11}{'w8a8 x':>8}"
    return head


def format_row(p: Point) -> str:
    def cell(v, w=11, fmt_="{:.3f}"):
        return f"{fmt_.format(v):>{w}}" if v is not None else f"{'-':>{w}}"

    row = f"{p.shape:<8}{p.k:>6}{p.n:>7}{p.bits:>5}{p.m:>6} |"
    row += "".join(cell(p.ms.get(c)) for c in COLUMNS + EXTRA_COLUMNS)
    row += cell(p.floor_ms, 10)
    ours = p.ms["ours"]
    row += " |" + cell(p.ms["linear"] / ours if "linear" in p.ms else None, 9, "{:.2f}")
    row += cell(p.ms["lin32"] / ours if "lin32" in p.ms else None, 9, "{:.2f}")
    row += cell(p.ms["onednn"] / ours if "onednn" in p.ms else None, 9, "{:.2f}")
    row += cell(p.ms["wna16"] / ours if "wna16" in p.ms else None, 9, "{:.2f}")
    row += cell(100 * p.floor_ms / ours, 10, "{:.0f}") + "%"
    d = dense_best(p)
    row += cell(d / p.ms["w8a8"] if "w8a8" in p.ms and d else None, 8, "{:.2f}")
    return row


def targets(points: list[Point]) -> list[str]:
    """The issue's targets, checked against the faster of the two dense BF16 paths (both are shown: the
    issue names F.linear, vLLM's CPU build runs BF16 linears through its oneDNN handles)."""
    out = []

    def check(name, ok, detail):
        out.append(f"{'PASS' if ok else 'MISS'}  {name}: {detail}")

    def both(p: Point, t: float) -> str:  # speed-up of time t over each dense path
        return ", ".join(f"{p.ms[c] / t:.2f}x {label}" for c, label in
                         (("onednn", "oneDNN"), ("linear", "F.linear"), ("lin32", "F.linear fp32")) if c in p.ms)

    for p in points:
        d = dense_best(p)
        ours = p.ms["ours"]
        if d is None:
            continue
        if p.bits == 8 and p.m == 1:
            check(f"int8 M=1 {p.shape} >= 2.5x dense", d / ours >= 2.5, both(p, ours))
            check(f"int8 M=1 {p.shape} <= 1.3x floor", ours <= 1.3 * p.floor_ms, f"{ours / p.floor_ms:.2f}x floor")
        if p.bits == 8 and p.m == 16:
            check(f"int8 M=16 {p.shape} >= 2x dense", d / ours >= 2.0, both(p, ours))
            if "w8a8" in p.ms:
                check(f"int8 M=16 {p.shape} >= 2x dense, opt-in W8A8", d / p.ms["w8a8"] >= 2.0, both(p, p.ms["w8a8"]))
        if p.m >= 256:
            check(f"int{p.bits} M={p.m} {p.shape} <= 1.1x dense", ours <= 1.1 * d,
                  ", ".join(f"{ours / p.ms[c]:.2f}x {label} time" for c, label in
                            (("onednn", "oneDNN"), ("linear", "F.linear")) if c in p.ms))
        if p.bits == 4 and p.m == 1:
            ours8 = next((q.ms["ours"] for q in points if q.bits == 8 and q.m == 1 and q.shape == p.shape), None)
            check(f"int4 M=1 {p.shape} <= 1.6x floor", ours <= 1.6 * p.floor_ms, f"{ours / p.floor_ms:.2f}x floor")
            if ours8 is not None:
                check(f"int4 M=1 {p.shape} faster than int8 M=1", ours < ours8, f"{ours8 / ours:.2f}x int8's speed")
        if p.bits == 4 and p.m == 1 and "wna16" in p.ms:
            check(f"int4 M=1 {p.shape} >= 1.3x wna16", p.ms["wna16"] / ours >= 1.3, f"{p.ms['wna16'] / ours:.2f}x")
    return out


def plot(points: list[Point], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(p.shape for p in points))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7.5), squeeze=False)
    for j, shape in enumerate(shapes):
        ax, ax2 = axes[0][j], axes[1][j]
        for bits, style in ((8, "-"), (4, "--")):
            pts = [p for p in points if p.shape == shape and p.bits == bits]
            if not pts:
                continue
            mm = [p.m for p in pts]
            for ref_name, color in (("linear", "C0"), ("onednn", "C1"), ("wna16", "C2")):
                ys = [p.ms[ref_name] / p.ms["ours"] if ref_name in p.ms else math.nan for p in pts]
                if not all(math.isnan(y) for y in ys):
                    ax.plot(mm, ys, style, color=color, marker="o", label=f"int{bits} vs {ref_name}")
            ax2.plot(mm, [100 * p.floor_ms / p.ms["ours"] for p in pts], style, marker="o", color="C3",
                     label=f"int{bits} ours")
            # dense BF16 against its own floor (16 bits per weight instead of `bits`, scales aside)
            ax2.plot(mm, [100 * p.floor_ms * (16 / bits) / dense_best(p) if dense_best(p) else math.nan
                          for p in pts], style, marker="x", color="C7",
                     label=f"dense bf16 (its own floor; int{bits} run)")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} ({pts[0].k}x{pts[0].n})")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup of ours (x)")
        ax.legend(fontsize=7)
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("M (tokens)")
        ax2.set_ylabel("% of memory-bandwidth floor")
        ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_shapes(spec: str) -> list[tuple[str, int, int]]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item in SHAPES:
            out.extend(SHAPES[item])
        elif "x" in item:
            k, n = item.lower().split("x")
            out.append((item, int(k), int(n)))
        else:
            raise SystemExit(f"--shapes: {item!r} is neither a preset ({', '.join(SHAPES)}) nor KxN")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dequant", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3-1.7b", help="preset names (qwen3-1.7b, qwen2.5-7b) or KxN, "
                    "comma separated")
    ap.add_argument("--m", default="1,4,16,64,256,1024", help="activation rows, comma separated")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="activation dtype of our op "
                    "(the dense paths always run BF16)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "npu"))
    ap.add_argument("--backend", default=None, help="force a gptq_ascend backend (default: the device's best)")
    ap.add_argument("--repeats", type=int, default=20, help="minimum timed calls per point")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per point before stopping early")
    ap.add_argument("--rotate-mib", type=int, default=None, help="weight MiB each method cycles through "
                    "(default: 3x the L3 from sysfs)")
    ap.add_argument("--ref-max-m", type=int, default=16, help="largest M the slow reference is timed at")
    ap.add_argument("--no-ref", action="store_true", help="skip the pure-torch reference")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's oneDNN and cpu_gemm_wna16")
    ap.add_argument("--no-w8a8", action="store_true", help="skip the opt-in int8-activation mode column")
    ap.add_argument("--no-f32-linear", action="store_true", help="skip the dense fp32 F.linear column")
    ap.add_argument("--small-m-max", type=int, default=-1, help="override the kernel's fused/GEMM switch-over")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cpu-time", action="store_true", help="time calls in process CPU time, not wall time "
                    "(for a host shared with more runnable jobs than cores; use with --threads 1)")
    ap.add_argument("--json", dest="json_path", help="write every figure to this file")
    ap.add_argument("--plot", dest="plot_path", help="write speedup and %%-of-floor plots (PNG)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (seconds): one small shape, no DRAM claims")
    args = ap.parse_args(argv)

    rotate_why = "--rotate-mib"
    if args.quick:
        args.shapes, args.m, args.repeats, args.budget = "quick", "1,16,64", 3, 0.2
        args.rotate_mib, args.no_ref, rotate_why = 4, False, "--quick"
    elif args.rotate_mib is None:
        args.rotate_mib, rotate_why = default_rotate_mib()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    dev, sync = setup_device(args.device)
    if dev.type == "npu":
        global EXTRA_COLUMNS
        EXTRA_COLUMNS = NPU_COLUMNS
    shapes = parse_shapes(args.shapes)
    ms = [int(v) for v in args.m.split(",")]
    bits_list = [int(v) for v in args.bits.split(",")]
    if args.small_m_max >= 0:
        from gptq_ascend.backends.cpu import kernel_config

        kernel_config(small_m_max=args.small_m_max)

    kernel = ""
    if dev.type == "cpu":
        try:
            from gptq_ascend.backends.cpu import kernel_config

            kernel = kernel_config()
        except Exception as e:
            kernel = f"unavailable ({e})"
    bw_before = measure_bandwidth(256 if args.quick else 1024, 3 if args.quick else 5)
    started = datetime.now(timezone.utc)
    title = (f"benchmarks.dequant {started:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
             f"{args.threads} threads, torch {torch.__version__}, act {args.dtype}, "
             f"{'CPU time' if args.cpu_time else 'wall time'}, kernel: {kernel}")
    print(title)
    print(f"read bandwidth (GB/s, 1 GiB sum): {', '.join(f'{b:.1f}' for b in bw_before)}")
    print(f"weights in rotation per method: {args.rotate_mib} MiB ({rotate_why})")
    print(format_header())
    points: list[Point] = []
    rotate_bytes = args.rotate_mib * MIB
    for bits in bits_list:
        for label, k, n in shapes:
            points += run_shape(label, k, n, bits, ms, args, dev, sync, rotate_bytes)
    bw_after = measure_bandwidth(256 if args.quick else 1024, 3 if args.quick else 5)
    print(f"read bandwidth after (GB/s): {', '.join(f'{b:.1f}' for b in bw_after)}; the floor column is a "
          "streaming read of each layer's bytes timed in the same rounds as the methods")
    print(f"took {(datetime.now(timezone.utc) - started).total_seconds():.0f} s")
    checks = [] if args.quick else targets(points)
    for line in checks:
        print(line)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"title": title, "argv": sys.argv, "started_utc": started.isoformat(),
                       "bandwidth_gbs_before": bw_before, "bandwidth_gbs_after": bw_after,
                       "kernel": kernel, "targets": checks,
                       "points": [p.__dict__ for p in points]}, f, indent=1)
    if args.plot_path:
        plot(points, args.plot_path, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
