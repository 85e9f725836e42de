// The AVX2 + FMA micro-kernels. Only this file is compiled with -mavx2 -mfma, and nothing in
// it runs unless dispatch.cpp found both features on the CPU.
#define SA_SIMD_NAMESPACE avx2
#include "microkernels_impl.h"
