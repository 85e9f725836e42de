// The portable micro-kernels: the one source of microkernels_impl.h compiled with the target's
// baseline flags, with four-float vectors (SSE2 on x86-64, NEON on Arm, plain code elsewhere).
#define SA_SIMD_NAMESPACE generic
#define SA_VEC_BYTES 16
#include "microkernels_impl.h"
