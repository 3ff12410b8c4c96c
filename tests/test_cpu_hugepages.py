"""The packed codes of a real-sized layer sit in transparent huge pages where the kernel allows them.

What the kernel allows comes from /sys/kernel/mm/transparent_hugepage/enabled and what the process got
from /proc/self/smaps (AnonHugePages of the mapping that holds the codes), both read here, not through
the backend. Under [never] nothing is asserted about pages (the layer must still compute right).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from gptq_ascend import format as fmt

cpu_mod = pytest.importorskip("gptq_ascend.backends.cpu")
BACKEND = cpu_mod.CPUBackend()
_OK, _WHY = BACKEND.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"CPU backend unavailable: {_WHY}")

HUGE = 2 << 20


def thp_mode_from_sysfs() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            m = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return ""
    return m.group(1) if m else ""


def anon_huge_bytes(t: torch.Tensor) -> int:
    """AnonHugePages of the /proc/self/smaps mappings that overlap t's bytes."""
    lo_t, hi_t = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo < hi_t and hi > lo_t
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total


def real_layer(k: int = 2048, n: int = 2048, bits: int = 8, group_size: int = 128):
    """A symmetric v1 GPTQ layer of a 2048-wide model, as a checkpoint stores it (4 MiB of int8 codes)."""
    g = torch.Generator().manual_seed(12)
    spec = fmt.QuantSpec(bits=bits, group_size=group_size, sym=True, desc_act=False, checkpoint_format="gptq")
    q = torch.randint(0, 2**bits, (k, n), dtype=torch.int32, generator=g)
    z = torch.full((spec.num_groups(k), n), spec.sym_zero, dtype=torch.int32)
    scales = (torch.rand(spec.num_groups(k), n, generator=g) * 0.01 + 0.001).to(torch.float16)
    t = fmt.GPTQTensors(fmt.pack(q, bits, 0), fmt.pack_zeros(z, spec), scales, fmt.default_g_idx(k, group_size))
    return t, spec, k


def check_gemm(t, spec, k, packed) -> None:
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(3))
    ref = x.double() @ fmt.dequantize(t, spec, k, torch.float64)
    got = BACKEND.gemm(x, packed).double()
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err < 1e-5, f"gemm through the huge-page codes differs from the float64 reference by {err:.2e}"


def test_packed_codes_are_in_huge_pages_when_thp_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPTQ_ASCEND_HUGEPAGES", raising=False)
    t, spec, k = real_layer()
    packed = BACKEND.repack(t, spec, k)
    codes = packed.tensors["codes"]
    assert codes.numel() >= 2 * HUGE
    mode = thp_mode_from_sysfs()
    if mode in ("always", "madvise"):
        got = anon_huge_bytes(codes)
        # The codes start on a 2 MiB boundary, so their whole huge pages are numel // 2 MiB.
        assert got >= HUGE, f"THP is [{mode}] but the packed codes' mapping has {got} bytes of AnonHugePages"
    check_gemm(t, spec, k, packed)


@pytest.mark.skipif(thp_mode_from_sysfs() != "madvise" or os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
                    reason="only under THP [madvise] (and torch's own THP allocation off) must an ordinary "
                           "allocation stay in 4 KiB pages")
def test_hugepages_off_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTQ_ASCEND_HUGEPAGES", "0")
    t, spec, k = real_layer()
    packed = BACKEND.repack(t, spec, k)
    assert anon_huge_bytes(packed.tensors["codes"]) == 0
    check_gemm(t, spec, k, packed)
