"""Benchmarks: ``python -m benchmarks.dequant`` (GPTQ GEMM kernels), ``python -m benchmarks.e2e`` (vLLM)."""
