"""Does backing the packed CPU weights with transparent huge pages speed up the streaming GEMV?

One process, two copies of the same packed codes per layer: one in a 2 MiB-aligned anonymous mapping
advised MADV_HUGEPAGE before the first touch, one advised MADV_NOHUGEPAGE (4 KiB pages). A rotation
of ``--layers`` layers (more than the L3) is streamed through ``torch.ops.gptq_ascend.cpu_gemm`` at
M = ``--m``, the two variants interleaved round by round (order alternating), and the per-round ratio
4K / THP is reported with its median. /proc/self/smaps shows how much of each copy really got huge
pages (AnonHugePages), so a "no difference" cannot come from the kernel having refused them.

    python -m benchmarks.hugepages --k 4096 --n 4096 --bits 4 --layers 24
"""

from __future__ import annotations

import argparse
import mmap
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from benchmarks.dequant import random_layer


def anon_huge_kib(ptrs: list[tuple[int, int]]) -> tuple[int, int]:
    """(AnonHugePages, Rss) in KiB summed over the smaps mappings that overlap the [ptr, ptr+n) ranges."""
    huge = rss = 0
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                cur = any(p < hi and p + n > lo for p, n in ptrs)
            elif cur and head == "AnonHugePages:":
                huge += int(line.split()[1])
            elif cur and head == "Rss:":
                rss += int(line.split()[1])
    return huge, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=24, help="rotation length (make it exceed the L3)")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--passes", type=int, default=3, help="rotations per variant per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--alloc", choices=("mmap", "backend"), default="mmap",
                    help="mmap: both copies advised here (NOHUGEPAGE vs HUGEPAGE); backend: the backend's own "
                         "huge-page copy vs an ordinary torch clone")
    args = ap.parse_args()

    from gptq_ascend import ops
    from gptq_ascend.backends import cpu as cpu_mod

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t, spec = random_layer(args.k, args.n, args.bits, args.group_size)
    backend, _ = ops.choose_backend("cpu", spec, args.k, args.n, prefer="cpu")
    packed = backend.repack(t, spec, args.k)
    codes = packed.tensors["codes"]
    nb = codes.numel()

    variants: dict[str, list[dict]] = {"thp": [], "4k": []}
    for _ in range(args.layers):
        for name in variants:
            if args.alloc == "backend":
                c = cpu_mod._in_huge_pages(codes) if name == "thp" else codes.clone()
            else:  # both copies advised (the first touch comes after the advice)
                c = cpu_mod.advised_copy(codes, mmap.MADV_HUGEPAGE if name == "thp" else mmap.MADV_NOHUGEPAGE)
            d = {k: v.clone() for k, v in packed.tensors.items()}
            d["codes"] = c
            variants[name].append(d)
    pages = {}
    for name, ls in variants.items():
        h, r = anon_huge_kib([(d["codes"].data_ptr(), nb) for d in ls])
        pages[name] = (h, r)

    x = torch.randn(args.m, args.k).to(torch.bfloat16)
    clock = time.thread_time if args.threads == 1 else time.perf_counter

    def stream(ls: list[dict]) -> float:
        t0 = clock()
        for _ in range(args.passes):
            for d in ls:
                torch.ops.gptq_ascend.cpu_gemm(x, d["codes"], d["scales"], d.get("zeros"), d["row_map"],
                                               d["group_ptr"], None, spec.bits, float(spec.sym_zero),
                                               args.k, args.n)
        return (clock() - t0) / (args.passes * len(ls))

    for name in variants:  # warm-up: page tables, code paths
        stream(variants[name])
    per: dict[str, list[float]] = {"thp": [], "4k": []}
    ratios = []
    for r in range(args.rounds):
        order = ("thp", "4k") if r % 2 == 0 else ("4k", "thp")
        got = {name: stream(variants[name]) for name in order}
        for name in got:
            per[name].append(got[name])
        ratios.append(got["4k"] / got["thp"])

    layer_mib = nb / 2**20
    print(f"date {datetime.now(timezone.utc).isoformat(timespec='minutes')}  host {platform.node()}  "
          f"THP mode [{cpu_mod.thp_mode()}]  threads {args.threads}  clock {clock.__name__}  alloc {args.alloc}")
    print(f"layer K={args.k} N={args.n} int{args.bits} g{args.group_size} M={args.m}: codes {layer_mib:.2f} MiB, "
          f"rotation {args.layers} layers = {layer_mib * args.layers:.0f} MiB per variant")
    for name, (h, r) in pages.items():
        print(f"  {name:3s}: AnonHugePages {h / 1024:.0f} MiB of Rss {r / 1024:.0f} MiB in the code mappings")
    for name in ("4k", "thp"):
        med = statistics.median(per[name])
        print(f"  {name:3s}: median {med * 1e6:.1f} us/layer = {nb / med / 1e9:.2f} GB/s of codes "
              f"(runs: {' '.join(f'{v * 1e6:.0f}' for v in per[name])})")
    print(f"  4K/THP time ratio per round: {' '.join(f'{v:.3f}' for v in ratios)}; "
          f"median {statistics.median(ratios):.3f} over {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
