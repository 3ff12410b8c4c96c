"""The NPU dequant path without an NPU: load-time arguments + the Triton kernel under Triton's interpreter.

``triton_dequant.dequant_triton`` runs CPU tensors through Triton's interpreter (what TRITON_INTERPRET=1
does), so the very kernel the npu_triton backend launches on an NPU -- its tile loop, masks, shifts and
rounding -- is compared here with the ground truth of random GPTQ layers. It runs with any Triton
(the project venv's, or triton-ascend in .venv-ascend); it is not a hardware result.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from gptq_ascend import format as fmt
from gptq_ascend import ops
from gptq_ascend.backends import npu
from gptq_ascend.backends.ascend import dequant, tiling, triton_dequant
from gptq_ascend.backends.npu_triton import NpuTritonBackend
from gptq_ascend.errors import BackendError

from .vendor_model import random_layer

TRITON_OK, TRITON_WHY = triton_dequant.available()
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"Triton interpreter unavailable: {TRITON_WHY}")


def _random_cases(count: int, seed: int):
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        bits = rng.choice((4, 8))
        pf = 32 // bits
        group = rng.choice((32, 64, 128, -1))
        act = rng.random() < 0.3 and group != -1
        if group == -1:
            k = rng.randint(1, 300)                          # any K, last word may be partial
        else:
            k = group * rng.randint(1, 4) + rng.choice((0, pf, 2 * pf, group // 2))   # ragged last group
        n = rng.choice((1, 7, 16, 17, 33, 64, 100, 130))
        cases.append((bits, k, n, group, rng.random() < 0.5, rng.choice(("gptq", "gptq_v2")), act,
                      rng.choice((torch.float16, torch.bfloat16)), 1000 + i))
    return cases


CASES = _random_cases(24, seed=2026)


def _id(c):
    bits, k, n, group, sym, f, act, dtype, seed = c
    return f"int{bits}-{k}x{n}-g{group}-{'sym' if sym else 'asym'}-{f}{'-act' if act else ''}-{str(dtype)[6:]}"


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_triton_dequant_path_is_exact(case):
    bits, k, n, group, sym, f, act, dtype, seed = case
    layer = random_layer(bits, k, n, group, sym, f, act, seed=seed)
    args = dequant.prepare_dequant_args(layer.tensors, layer.spec, k)
    assert args.qweight.dtype == torch.int32 and args.zeros.dtype == args.scales.dtype
    packed = dequant.pack_dequant(args, layer.spec, k, n, torch.device("cpu"), backend_name="npu_triton")
    assert npu.packed_path(packed) == "dequant" and NpuTritonBackend().dequant_impl() == "triton"
    # What the vLLM plugin does on every call: a plain PackedWeight rebuilt from the stored tensors.
    packed = ops.PackedWeight(packed.backend, packed.spec, k, n, dict(packed.tensors), packed.perm)
    # (q - z) * s in float32 is exact; the kernel rounds once, like the reference: bit-exact.
    w = npu.NpuBackend().dequant(packed, dtype)
    assert torch.equal(w, layer.truth.to(dtype))
    x = torch.randn((3, k), generator=torch.Generator().manual_seed(seed)).to(dtype)
    y = npu.gemm_packed(x, packed)
    ref = x.to(torch.float64) @ layer.truth
    bound = x.to(torch.float64).abs() @ layer.truth.abs()
    assert y.dtype == dtype and y.shape == (3, n)
    assert bool(((y.to(torch.float64) - ref).abs() <= 2.0**-6 * bound + 1e-3).all())


@needs_triton
@pytest.mark.parametrize("cores", (1, 3, 40))
@pytest.mark.parametrize("ub", (tiling.TRITON_UB_BYTES, 4 * 1024))
def test_triton_kernel_over_core_counts_and_tile_sizes(cores, ub):
    """Small UB budgets force many small tiles per program: the per-core tile loop, as in AscendC."""
    layer = random_layer(4, 384, 100, 128, False, "gptq", False, seed=cores)
    args = dequant.prepare_dequant_args(layer.tensors, layer.spec, 384)
    plan = tiling.plan_tiling(384, 100, 4, 128, 2, cores, ub)
    out = triton_dequant.dequant_triton(args.qweight, args.zeros, args.scales, 4, 128, 384, torch.float16,
                                        core_num=cores, ub_bytes=ub)
    assert torch.equal(out, layer.truth.to(torch.float16)), plan


def test_dequant_args_refusals():
    layer = random_layer(8, 256, 32, 64, False, "gptq", False, seed=9)
    with pytest.raises(BackendError, match="int8 and int4"):
        dequant.prepare_dequant_args(layer.tensors, fmt.QuantSpec(bits=3, group_size=64), 256)
    fp32 = fmt.GPTQTensors(layer.tensors.qweight, layer.tensors.qzeros, layer.tensors.scales.float(),
                           layer.tensors.g_idx)
    with pytest.raises(BackendError, match="float16/bfloat16"):
        dequant.prepare_dequant_args(fp32, layer.spec, 256)
    odd = random_layer(4, 72, 16, 36, False, "gptq", False, seed=10)   # int4, group 36: not a multiple of 8
    with pytest.raises(tiling.TilingError, match="multiple of 32/bits"):
        dequant.prepare_dequant_args(odd.tensors, odd.spec, 72)


def test_dequant_args_act_order_repacks_rows():
    layer = random_layer(8, 256, 16, 64, False, "gptq_v2", True, seed=11)
    args = dequant.prepare_dequant_args(layer.tensors, layer.spec, 256)
    assert args.perm is not None
    codes = fmt.unpack(args.qweight, 8, 256, 0)
    original = fmt.unpack_weight_codes(layer.tensors, layer.spec, 256)
    assert torch.equal(codes, original[args.perm])
    assert torch.equal(layer.tensors.g_idx.long()[args.perm], torch.arange(256) // 64)


def test_modules_import_without_triton_and_say_why():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "from gptq_ascend import ops\n"
        "from gptq_ascend.backends import npu\n"
        "from gptq_ascend.backends.ascend import tiling, triton_dequant\n"
        "ok, why = triton_dequant.available(); assert not ok and 'triton' in why, why\n"
        "b = ops.backends()['npu_triton']; ok, why = b.available(); assert not ok and why, why\n"
        "print(tiling.plan_tiling(2048, 2048, 8, 128).tile_rows)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "16"
