"""The dense lm_head on CPU: vLLM's own GEMM, our dense BF16 / FP16 GEMV, or the opt-in int8 lm_head.

GPTQ checkpoints leave the lm_head dense (Qwen3-1.7B ties it to its 151936 x 2048 embedding: 0.62 GB of
BF16, about a third of the bytes a decoded token reads). ``GPTQ_ASCEND_LM_HEAD`` picks how it runs:

* ``auto`` (default): our dense GEMV (``cpu_dense_gemm``, csrc/cpu/dense_bf16.cpp; BF16 or FP16 weights)
  for M <= ``DENSE_MAX_M`` rows where vLLM's own dense path is the ``torch.nn.functional.linear`` fallback
  (AVX2-only CPUs, where oneDNN cannot create its matmul primitive and torch's BF16 GEMM has no native dot
  product: ours measured 2.1-3.5x faster at M = 1-8), and for M <= ``DENSE_MAX_M_ONEDNN`` where vLLM's
  path is oneDNN, the weight BF16 and the kernel tier has AVX512-BF16 (ours measured 1.7-2.6x faster at M
  = 1 and 4, about even at M = 8; docs/notes/issue-11-lm-head.md); vLLM's path otherwise. The numerics are
  the checkpoint's either way (a correct GEMM's: fp32 sums, one rounding of the output, dense_bf16.h; only
  the summation order differs). With float32 activations vLLM builds the lm_head in float32 (twice the
  checkpoint's bytes, 1.24 GB for Qwen3-1.7B, read by every token); when every value of it is exactly a
  BF16 number (a BF16 checkpoint widened) or else exactly an FP16 number (an FP16 checkpoint widened), our
  GEMV gets a 16-bit copy instead: the same weights, half the bytes per token (the float32 tensor stays
  for the embedding lookup and vLLM's path at larger M). The copy is made only once ours is chosen.
* ``ours``: our GEMV whenever the weight is BF16 / FP16 (or float32 holding only such values; M <=
  DENSE_MAX_M), whatever vLLM would use (for tests and A/Bs on machines where oneDNN works).
* ``vllm``: vLLM's method untouched.
* ``int8``: quantized once at load, per output row (symmetric 8-bit, one fp32 scale per vocabulary entry:
  the "group -1" GPTQ layout), run through the fused int8 kernel (~1 byte per weight instead of 2). This
  changes the logits, so it is opt-in; its cost is measured in docs/cpu-kernel.md. The embedding lookup
  keeps the checkpoint's weights (a tied embedding is not changed). ``GPTQ_ASCEND_LM_HEAD_INT8=1`` (the
  older switch) still selects it when ``GPTQ_ASCEND_LM_HEAD`` is unset.

The choice and its reason are logged once per lm_head at load.
"""

from __future__ import annotations

import logging
import os

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from .. import format as fmt
from ..errors import ConfigError
from . import compat

LM_HEAD_ENV = "GPTQ_ASCEND_LM_HEAD"
LM_HEAD_INT8_ENV = "GPTQ_ASCEND_LM_HEAD_INT8"
LM_HEAD_MODES = ("auto", "ours", "vllm", "int8")
# Largest number of rows (tokens) our GEMV takes; more go to vLLM's path. The GEMV streams the weight
# once and re-reads it from cache per 4 (AVX-512) / 2 (AVX2) rows, so its cost grows with M where a
# blocked GEMM's does not (measured: docs/notes/issue-11-lm-head.md); decode batches are far below it.
DENSE_MAX_M = 16
# Where vLLM's path is oneDNN: ours streams the weight at the memory floor at M = 1 and stays below it
# to M = 4 with vdpbf16ps, where oneDNN ran 1.7-2.6x slower; at M = 8 the two were even.
DENSE_MAX_M_ONEDNN = 4
logger = logging.getLogger("vllm.gptq_ascend")
_ROWS_PER_CHUNK = 8192  # bounds the fp32 temporary of the quantization (8192 x H x 4 bytes)
W16_DTYPES = (torch.bfloat16, torch.float16)  # the weight dtypes cpu_dense_gemm reads


def _exact_copy(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    out = torch.empty(w.shape, dtype=dtype)
    for r0 in range(0, w.shape[0], _ROWS_PER_CHUNK):
        rows = w[r0:r0 + _ROWS_PER_CHUNK]
        b = rows.to(dtype)
        if not torch.equal(b.float(), rows):  # NaN never compares equal: no copy of a head holding NaN
            return None
        out[r0:r0 + len(rows)] = b
    return out


def exact_16bit(w: torch.Tensor) -> torch.Tensor | None:
    """A BF16, else an FP16, copy of the float32 matrix ``w`` if every value of it is a number of that
    format (the copy is then the same weights), else None. Checked in row chunks, so the temporaries
    stay small; an FP16 check fails on values out of its range (they round to inf)."""
    for dtype in W16_DTYPES:
        out = _exact_copy(w, dtype)
        if out is not None:
            return out
    return None


def lm_head_mode(environ: dict | None = None) -> str:
    """The requested lm_head mode: GPTQ_ASCEND_LM_HEAD, else "int8" if GPTQ_ASCEND_LM_HEAD_INT8 is set
    (and not 0), else "auto"."""
    env = os.environ if environ is None else environ
    mode = env.get(LM_HEAD_ENV, "").strip().lower()
    if mode:
        if mode not in LM_HEAD_MODES:
            raise ConfigError(f"gptq_ascend: {LM_HEAD_ENV}={env[LM_HEAD_ENV]!r} is not one of "
                              f"{', '.join(LM_HEAD_MODES)}")
        return mode
    v = env.get(LM_HEAD_INT8_ENV, "")
    return "int8" if v and v != "0" else "auto"


def lm_head_int8_requested() -> bool:
    return lm_head_mode() == "int8"


def lm_head_method() -> UnquantizedEmbeddingMethod | None:
    """The quant method for a dense ParallelLMHead on CPU (None: vLLM's own, unchanged)."""
    mode = lm_head_mode()
    if mode == "int8":
        return Int8LMHeadMethod()
    if mode == "vllm":
        logger.info("gptq_ascend: lm_head: vLLM's own dense path (%s=vllm)", LM_HEAD_ENV)
        return None
    return DenseLMHeadMethod(mode)


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


def _kernel_name(settings: dict, weight: torch.dtype, read: torch.dtype) -> str:
    """The instructions our GEMV runs on this tier (for the load-time log line): ``weight`` is the dtype
    vLLM holds the head in (also the activations' dtype), ``read`` the one our GEMV reads (its copy's)."""
    isa = settings["isa"]
    if not (isa == "avx2" or isa.startswith("avx512")):
        return "portable"
    if read == torch.float16:
        return "F16C + fp32 FMA"
    dot = isa.startswith("avx512") and settings.get("bf16_dot") == "1" and weight == torch.bfloat16
    return "vdpbf16ps" if dot else "fp32 FMA"  # vdpbf16ps needs bf16 activations, not a widened head's fp32


class DenseLMHeadMethod(UnquantizedEmbeddingMethod):
    """vLLM's dense lm_head method; ``apply`` through ``cpu_dense_gemm`` for M <= ``max_m`` rows when the
    mode (``auto`` / ``ours``), the weight and vLLM's own path make it the faster one (decided at load,
    see the module docstring)."""

    def __init__(self, mode: str = "auto") -> None:
        super().__init__()
        self.mode = mode
        self.ours = False
        self.max_m = DENSE_MAX_M
        self.w16: torch.Tensor | None = None  # the 16-bit copy of a float32 weight holding 16-bit values

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)  # vLLM's own dispatch: its path for M > DENSE_MAX_M
        from ..backends.cpu import dense_gemm_available, kernel_settings

        w = layer.weight
        vpath = compat.cpu_dense_gemm_path(layer)
        ok, why = dense_gemm_available()
        rowmajor = w.dim() == 2 and w.stride(-1) == 1
        widened = w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous()  # maybe 16-bit values
        if not ok:
            reason = why
        elif not (rowmajor and w.dtype in W16_DTYPES or widened):
            reason = f"the weight is {w.dtype} {tuple(w.shape)}, not a row-major BF16 / FP16 matrix"
        elif self.mode == "ours":
            self.ours, reason = True, f"{LM_HEAD_ENV}=ours"
        elif vpath == "torch":
            self.ours, reason = True, ("vLLM's dense path is the torch.nn.functional.linear fallback (oneDNN "
                                       "could not create its matmul primitive on this CPU)")
        elif vpath == "onednn" and widened:
            self.ours, self.max_m = True, DENSE_MAX_M_ONEDNN
            reason = "vLLM's dense path is oneDNN on the float32 weight; ours streams half the bytes at small M"
        elif vpath == "onednn" and w.dtype == torch.bfloat16 and kernel_settings().get("bf16_dot") == "1":
            self.ours, self.max_m = True, DENSE_MAX_M_ONEDNN
            reason = "vLLM's dense path is oneDNN, which ours outruns at small M with AVX512-BF16 (measured)"
        else:
            reason = f"vLLM's dense path is {vpath} ({LM_HEAD_ENV}=ours forces ours)"
        if self.ours and widened:  # only now: the check and the copy are one more pass over the weight
            self.w16 = exact_16bit(w.data)
            if self.w16 is None:
                self.ours, self.max_m = False, DENSE_MAX_M
                reason = "the float32 weight holds values that are not all BF16 (nor all FP16) numbers"
            else:
                name = "BF16" if self.w16.dtype == torch.bfloat16 else "FP16"
                reason += f"; the float32 weight holds only {name} values: ours reads a {name} copy of it"
        shape = " x ".join(map(str, w.shape))
        if self.ours:
            s = kernel_settings()
            kernel = _kernel_name(s, w.dtype, w.dtype if self.w16 is None else self.w16.dtype)
            logger.info("gptq_ascend: lm_head %s (%s): our dense GEMV (cpu_dense_gemm, tier %s, %s) for M <= %d, "
                        "vLLM's %s above: %s", shape, w.dtype, s["isa"], kernel, self.max_m, vpath, reason)
        else:
            logger.info("gptq_ascend: lm_head %s (%s): vLLM's own dense path (%s): %s", shape, w.dtype, vpath,
                        reason)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.ours and x.numel() <= self.max_m * x.shape[-1]:
            return torch.ops.gptq_ascend.cpu_dense_gemm(x, layer.weight if self.w16 is None else self.w16, bias)
        return super().apply(layer, x, bias)
