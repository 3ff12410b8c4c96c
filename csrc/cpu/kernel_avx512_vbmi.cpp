// The AVX-512 kernels compiled a second time with AVX512-VBMI (see the note at the top of
// kernel_avx512.cpp): only the direct int8 x BF16 kernel, whose decode uses VBMI byte tables.
// ops.cpp calls it only when the CPU reports avx512vbmi.
#define GPTQ_CPU_VBMI 1
#include "kernel_avx512.cpp"
