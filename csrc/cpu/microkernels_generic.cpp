// The portable micro-kernels: compiled with the baseline flags of the target (SSE2 on x86-64).
#define SA_SIMD_NAMESPACE generic
#include "microkernels_impl.h"
