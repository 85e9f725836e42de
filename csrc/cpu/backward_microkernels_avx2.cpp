// The AVX2 + FMA backward micro-kernels: the one source of backward_microkernels_impl.h compiled
// with -mavx2 -mfma (set on this file alone). Nothing here runs unless dispatch.cpp found both.
#define SA_SIMD_NAMESPACE avx2
#define SA_VEC_BYTES 32
#include "backward_microkernels_impl.h"
