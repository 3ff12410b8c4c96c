"""The AscendC kernel's host tiling (csrc/ascend/tiling.cpp), compiled and run here with plain CMake/g++.

* ``test_tiling`` (csrc/ascend/tests/test_tiling.cpp): UB capacity 192 KB and smaller, 32-byte alignment,
  N/K tails, ragged last groups, core counts 1..40, and a CPU emulation of the kernel's tile loop
  against a naive dequant.
* ``tiling_plan`` vs ``tiling.plan_tiling``: the Triton kernel (the executable specification)
  is planned by the very same algorithm, field for field.
No CANN is involved: this is host code only.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from gptq_ascend.backends.ascend import tiling

ROOT = Path(__file__).resolve().parents[2]
ASCEND = ROOT / "csrc" / "ascend"


@pytest.fixture(scope="module")
def tiling_bins(tmp_path_factory) -> dict[str, Path]:
    build = tmp_path_factory.mktemp("ascend-host")
    if shutil.which("cmake"):
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *gen],
                       check=True, capture_output=True, text=True)
        subprocess.run(["cmake", "--build", str(build), "--target", "test_tiling", "tiling_plan"],
                       check=True, capture_output=True, text=True)
    elif shutil.which("g++"):
        for name in ("test_tiling", "tiling_plan"):
            subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(build / name),
                            str(ASCEND / "tests" / f"{name}.cpp"), str(ASCEND / "tiling.cpp")],
                           check=True, capture_output=True, text=True)
    else:
        pytest.skip("neither cmake nor g++ is installed: cannot build the host tiling test")
    return {name: build / name for name in ("test_tiling", "tiling_plan")}


def test_host_tiling_unit_test(tiling_bins):
    r = subprocess.run([str(tiling_bins["test_tiling"])], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " 0 failed" in r.stdout


def test_tiling_compiles_warning_free():
    if not shutil.which("g++"):
        pytest.skip("g++ is not installed")
    r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Wconversion", "-Werror",
                        "-Wno-sign-conversion", str(ASCEND / "tiling.cpp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _queries() -> list[tuple[int, int, int, int, int, int, int]]:
    rng = random.Random(42)
    q = [(6144, 2048, 8, 128, 2, 40, 196608), (2048, 6144, 4, 128, 2, 40, 196608),
         (2048, 151936, 8, 128, 2, 40, 196608), (128, 64, 3, 32, 2, 8, 196608), (0, 64, 8, 32, 2, 8, 196608),
         (128, 64, 4, 36, 2, 8, 196608), (128, 64, 8, 32, 2, 0, 196608), (128, 64, 8, 32, 2, 8, 100),
         (128, 64, 8, 32, 4, 8, 196608), (1, 1, 4, -1, 2, 1, 196608)]
    for _ in range(3000):
        bits = rng.choice((4, 8))
        group = rng.choice((-1, 32, 64, 128, 256, 36, 40, 1000))
        k = rng.choice((rng.randint(1, 300), rng.randint(1, 20000)))
        n = rng.choice((rng.randint(1, 100), rng.randint(1, 70000)))
        ub = rng.choice((196608, 131072, 65536, 16384, 4096, 1024))
        q.append((k, n, bits, group, 2, rng.randint(1, 48), ub))
    return q


def test_python_plan_matches_host_tiling(tiling_bins):
    queries = _queries()
    stdin = "".join(" ".join(map(str, x)) + "\n" for x in queries)
    r = subprocess.run([str(tiling_bins["tiling_plan"])], input=stdin, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(queries)
    statuses = set()
    for query, line in zip(queries, lines, strict=True):
        host = json.loads(line)
        statuses.add(host["status"])
        try:
            plan = tiling.plan_tiling(*query)
        except tiling.TilingError as e:
            assert host["status"] == e.status, (query, host, str(e))
            assert host["message"] in str(e)
            continue
        assert host["status"] == 0, (query, host, plan)
        assert plan.as_dict() == {k: v for k, v in host.items() if k != "status"}, query
    assert statuses >= {0, 1, 2, 3, 4, 5, 6}   # every status was exercised


SOCS = ("Ascend910B1", "Ascend910B3", "Ascend910B4", "Ascend910_9391", "Ascend910_9392", "Ascend910",
        "Ascend910A", "Ascend310P3", "Ascend310B1", "Ascend950PR", "", "ascend910b3")


def test_ub_per_soc_python_matches_host(tiling_bins):
    """UbBytesForSoc (tiling.h, what the AscendC launcher plans with) == tiling.ub_bytes_for_soc (what the
    Triton path plans with): 192 KiB on Atlas A2/A3, 0 (not covered) elsewhere."""
    r = subprocess.run([str(tiling_bins["tiling_plan"]), "--soc", *SOCS], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    host = {d["soc"]: d["ub"] for d in map(json.loads, r.stdout.splitlines())}
    assert host == {s: tiling.ub_bytes_for_soc(s) for s in SOCS}
    assert {s for s, ub in host.items() if ub} == {"Ascend910B1", "Ascend910B3", "Ascend910B4", "Ascend910_9391",
                                                   "Ascend910_9392"}
    assert set(host.values()) == {0, 192 * 1024}


def test_python_tile_walk_covers_output_once():
    """tile_at / core_range (the Python twins of TileAt / CoreRange) on one ragged plan."""
    plan = tiling.plan_tiling(200, 70, 4, 64, 2, 7, 4096)
    seen = set()
    for core in range(8):
        first, count = tiling.core_range(plan, core)
        for t in range(first, first + count):
            w0, rows, group, c0, cols = tiling.tile_at(plan, t)
            for w in range(w0, w0 + rows):
                assert all((w * plan.pack_factor + j) // plan.group_size == group
                           for j in range(plan.pack_factor) if w * plan.pack_factor + j < plan.k)
                for c in range(c0, c0 + cols):
                    assert (w, c) not in seen
                    seen.add((w, c))
    assert len(seen) == plan.packed_rows * plan.n


# ---------------------------------------------------------------------------------------------------
# Syntax-only checks of the CANN-side sources against declaration stubs (csrc/ascend/tests/stubs).
# They catch C++ mistakes in our code; they are NOT a CANN build (see the stubs' README.md).
# ---------------------------------------------------------------------------------------------------

STUBS = ASCEND / "tests" / "stubs"


def test_ascendc_kernel_syntax_against_api_stubs():
    if not shutil.which("g++"):
        pytest.skip("g++ is not installed")
    r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                        "-DGPTQ_ASCEND_SYNTAX_CHECK", f"-I{STUBS}", str(ASCEND / "kernels" / "gptq_dequant.cpp")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_torch_binding_syntax_against_torch_and_npu_stubs():
    if not shutil.which("g++"):
        pytest.skip("g++ is not installed")
    from torch.utils.cpp_extension import include_paths

    torch_inc = [arg for p in include_paths() for arg in ("-isystem", p)]
    r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{STUBS}",
                        '-DGPTQ_ASCEND_SOC="Ascend910B3"', *torch_inc, str(ASCEND / "host" / "torch_binding.cpp")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
