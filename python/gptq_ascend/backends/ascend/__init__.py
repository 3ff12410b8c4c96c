"""The Ascend NPU pieces behind the ``npu`` and ``npu_triton`` backends, one job per module.

* :mod:`.device`: what the machine has -- torch_npu, an NPU, the SoC and its family, vector cores,
  the Unified Buffer per SoC, triton-ascend -- each answered with a reason when missing.
* :mod:`.tiling`: the dequant kernels' tile plan, shared by the AscendC kernel (its C++ twin is
  csrc/ascend/tiling.h) and the Triton kernel.
* :mod:`.fused`: the vendor-op contract -- every torch_npu op call (``npu_weight_quant_batchmatmul``,
  ``npu_convert_weight_to_int4pack``), its documented limits and the arguments built for it.
* :mod:`.dequant`: the dequant path -- its arguments, the AscendC op library (csrc/ascend) and the choice
  between the AscendC and the Triton kernel.
* :mod:`.triton_dequant`: the Triton kernel, the executable specification of the AscendC kernel.
* :mod:`.bench`: the timed cases of ``python -m benchmarks.dequant --device npu`` (one column per path).

The backends themselves are ``gptq_ascend.backends.npu`` (``NpuBackend``: per-layer path choice, gemm,
dequant) and ``gptq_ascend.backends.npu_triton`` (its Triton-only subclass). Nothing here has run on an
NPU unless a hardware report (``python -m gptq_ascend.validate``) says so.
"""
