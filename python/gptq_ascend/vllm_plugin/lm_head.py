"""The opt-in int8 lm_head on CPU (``GPTQ_ASCEND_LM_HEAD_INT8=1``).

GPTQ checkpoints leave the lm_head dense (Qwen3-1.7B ties it to its 151936 x 2048 embedding: 0.62 GB of
BF16, about a third of the bytes a decoded token reads). With the flag, the plugin quantizes it once at
load, per output row (symmetric 8-bit, one fp32 scale per vocabulary entry: the "group -1" GPTQ layout),
and runs it through the CPU backend's fused int8 kernel, which reads ~1 byte per weight instead of 2. The
embedding lookup keeps the checkpoint's weights (a tied embedding is not changed). This changes the
numerics of the logits, so it is off by default; its cost is measured in docs/cpu-kernel.md.
"""

from __future__ import annotations

import logging
import os

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from .. import format as fmt

LM_HEAD_INT8_ENV = "GPTQ_ASCEND_LM_HEAD_INT8"
logger = logging.getLogger("vllm.gptq_ascend")
_ROWS_PER_CHUNK = 8192  # bounds the fp32 temporary of the quantization (8192 x H x 4 bytes)


def lm_head_int8_requested() -> bool:
    v = os.environ.get(LM_HEAD_INT8_ENV, "")
    return bool(v) and v != "0"


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [V, H] -> (codes uint8 [V, H] = round(w / s) + 128, scales fp32 [V] = max|w_v| / 127)."""
    v, h = w.shape
    codes = torch.empty(v, h, dtype=torch.uint8)
    scales = torch.empty(v, dtype=torch.float32)
    for r0 in range(0, v, _ROWS_PER_CHUNK):
        rows = w[r0:r0 + _ROWS_PER_CHUNK].float()
        s = rows.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale, its codes are 128
        codes[r0:r0 + len(rows)] = (torch.round(rows / s[:, None]).clamp(-127, 127) + 128).to(torch.uint8)
        scales[r0:r0 + len(rows)] = s
    return codes, scales


class Int8LMHeadMethod(UnquantizedEmbeddingMethod):
    """vLLM's dense lm_head method with ``apply`` through the CPU kernel on per-row int8 weights."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        from ..backends.cpu import CPUBackend

        backend = CPUBackend()
        ok, why = backend.available()
        if not ok:
            logger.warning("gptq_ascend: %s=1 ignored: %s", LM_HEAD_INT8_ENV, why)
            self._packed = None
            return
        w = layer.weight.data
        codes, scales = quantize_rows_int8(w)
        v, h = w.shape
        spec = fmt.QuantSpec(8, -1, True, False, "gptq_v2")
        self._packed = backend.pack_codes(codes.t(), torch.full((1, v), 128, dtype=torch.int32),
                                          torch.zeros(h, dtype=torch.int64), scales[None, :], spec)
        self._backend = backend
        logger.info("gptq_ascend: lm_head %d x %d quantized to int8 per row at load (%s=1); the embedding "
                    "keeps its weights", v, h, LM_HEAD_INT8_ENV)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(self, "_packed", None) is None:
            return super().apply(layer, x, bias)
        return self._backend.gemm(x, self._packed, bias)
