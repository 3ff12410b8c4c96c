"""The pure-torch backend: format.dequantize + matmul. Slow, exact, runs anywhere.

It is the fallback when no native kernel takes a layer, and the behaviour every other backend must
reproduce.
"""

from __future__ import annotations

import torch

from .. import format as fmt
from ..ops import Backend, PackedWeight, check_gemm_args, register_backend


class ReferenceBackend(Backend):
    name = "reference"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def can_implement(self, spec: fmt.QuantSpec, in_features: int, out_features: int) -> tuple[bool, str]:
        return True, ""

    def repack(self, t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int) -> PackedWeight:
        fmt.validate_layer("layer", t, spec, in_features)
        # Keep the checkpoint tensors as they are: dequant is the definition itself.
        tensors = {"qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales}
        if t.g_idx is not None:
            tensors["g_idx"] = t.g_idx
        return PackedWeight(self.name, spec, in_features, t.out_features, tensors)

    def dequant(self, packed: PackedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        p = packed.tensors
        t = fmt.GPTQTensors(p["qweight"], p["qzeros"], p["scales"], p.get("g_idx"))
        return fmt.dequantize(t, packed.spec, packed.in_features, dtype)

    def gemm(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        check_gemm_args(x, packed, bias, (torch.float32, torch.float16, torch.bfloat16), x.device.type)
        w = self.dequant(packed, torch.float32).to(x.device)
        y = x.to(torch.float32) @ w
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype)


register_backend(ReferenceBackend())
