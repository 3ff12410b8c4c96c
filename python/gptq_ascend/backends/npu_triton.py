"""The Ascend NPU backend on Triton only ("npu_triton"): the Triton dequant kernel + the NPU matmul.

The same dequant path as the "npu" backend takes when the AscendC library was not built, offered as its
own backend so it can be chosen (``prefer="npu_triton"``) and tested on its own. It needs triton-ascend
and torch_npu; without them ``available()`` says which one is missing. The kernel itself
(``triton_dequant``) is checked without hardware under ``TRITON_INTERPRET=1`` and compiled for Ascend910B
up to the last stage (tests/ascend); it has not run on an NPU unless ``pytest -m npu`` was run on one.
"""

from __future__ import annotations

import torch

from .. import format as fmt
from ..ops import Backend, PackedWeight, register_backend
from . import npu


class NpuTritonBackend(Backend):
    name = "npu_triton"

    def available(self) -> tuple[bool, str]:
        return npu.npu_triton_status()

    def can_implement(self, spec: fmt.QuantSpec, in_features: int, out_features: int) -> tuple[bool, str]:
        if spec.bits not in (4, 8):
            return False, f"{spec.bits}-bit weights: the Triton dequant kernel takes int8 and int4 only"
        try:
            npu.triton_dequant.plan_tiling(in_features, out_features, spec.bits, spec.group_size,
                                           ub_bytes=npu.triton_dequant.TRITON_UB_BYTES)
        except npu.triton_dequant.TilingError as e:
            return False, str(e)
        return True, ""

    def repack(self, t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int) -> PackedWeight:
        # mode="triton" raises (instead of falling back to dense) when the kernel cannot take the layer.
        return npu.repack_npu(t, spec, in_features, mode="triton", backend_name=self.name)

    def gemm(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        return npu.NpuBackend.gemm(self, x, packed, bias)

    def dequant(self, packed: PackedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return npu.NpuBackend.dequant(self, packed, dtype)


register_backend(NpuTritonBackend())
