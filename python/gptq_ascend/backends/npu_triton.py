"""The Ascend NPU backend on Triton only ("npu_triton"): the Triton dequant kernel + the NPU matmul.

The same dequant path the "npu" backend takes when the AscendC library was not built, offered as its own
backend so it can be chosen (``prefer="npu_triton"``) and tested on its own. It needs triton-ascend and
torch_npu; without them ``available()`` says which one is missing. The kernel
(``ascend/triton_dequant.py``) is checked without hardware under Triton's interpreter and compiled for
Ascend910B up to the last stage (tests/ascend); it has not run on an NPU unless a hardware report says so.
"""

from __future__ import annotations

from .. import format as fmt
from ..ops import PackedWeight, register_backend
from .ascend import device, tiling
from .npu import NpuBackend, repack_npu


class NpuTritonBackend(NpuBackend):
    name = "npu_triton"

    def available(self) -> tuple[bool, str]:
        return device.npu_triton_status()

    def can_implement(self, spec: fmt.QuantSpec, in_features: int, out_features: int) -> tuple[bool, str]:
        if spec.bits not in (4, 8):
            return False, f"{spec.bits}-bit weights: the Triton dequant kernel takes int8 and int4 only"
        try:
            tiling.plan_tiling(in_features, out_features, spec.bits, spec.group_size,
                               ub_bytes=tiling.TRITON_UB_BYTES)
        except tiling.TilingError as e:
            return False, str(e)
        return True, ""

    def mode(self) -> str:
        return "triton"

    def dequant_impl(self) -> str:
        return "triton"

    def repack(self, t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int) -> PackedWeight:
        # mode="triton" raises (instead of falling back to dense) when the kernel cannot take the layer.
        return repack_npu(t, spec, in_features, mode="triton", backend_name=self.name)


register_backend(NpuTritonBackend())
