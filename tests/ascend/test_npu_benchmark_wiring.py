"""``python -m benchmarks.dequant --device npu`` has one column per NPU path (fused, AscendC, Triton) plus
dense FP16, built by gptq_ascend.backends.ascend.bench. Timing needs an NPU; the wiring is checked here on
CPU tensors: every path is either packed for the benchmark or reported with the reason it cannot run.
"""

from __future__ import annotations

import torch

from gptq_ascend import format as fmt
from gptq_ascend.backends.ascend import bench, dequant

from .vendor_model import random_layer


def test_every_path_is_packed_or_says_why():
    layer = random_layer(8, 256, 64, 128, True, "gptq", False, seed=5)
    packs = bench.pack_every_path(layer.tensors, layer.spec, 256, torch.device("cpu"))
    assert set(packs) == set(bench.PATH_COLUMNS) == {"fused", "ascendc", "triton"}
    # The fused path's int8 arguments are built without torch_npu; the kernels need it (or triton-ascend).
    assert not isinstance(packs["fused"], str)
    for path in ("ascendc", "triton"):
        ok, why = dequant.impl_status(path)
        if not ok:
            assert isinstance(packs[path], str) and why in packs[path], (path, packs[path])


def test_benchmark_columns_cover_every_path():
    from benchmarks import dequant as bd

    assert set(bench.PATH_COLUMNS) | {"dense_fp16"} == set(bd.NPU_COLUMNS)
    layer = random_layer(8, 256, 64, 128, True, "gptq", False, seed=6)

    def rotate(tensors, nb):   # the benchmark's weight rotation, one copy (no DRAM claims here)
        return [dict(tensors)]

    methods = bd.npu_methods(layer.tensors, layer.spec, 256, torch.device("cpu"), rotate)
    available = {p for p in bench.PATH_COLUMNS if p == "fused" or dequant.impl_status(p)[0]}
    assert set(methods) == available | {"dense_fp16"}
    x = torch.randn((3, 256)).to(torch.float16)
    y = methods["dense_fp16"][1](x)(0)
    ref = x.double() @ fmt.dequantize(layer.tensors, layer.spec, 256, torch.float64)
    assert y.dtype == torch.float16 and torch.allclose(y.double(), ref, rtol=1e-2, atol=1e-2)
