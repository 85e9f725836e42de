// The AVX2 + FMA micro-kernels: the one source of microkernels_impl.h compiled with -mavx2
// -mfma (set on this file alone). Nothing here runs unless dispatch.cpp found both features.
#define SA_SIMD_NAMESPACE avx2
#define SA_VEC_BYTES 32
#include "microkernels_impl.h"
