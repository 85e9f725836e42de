// The portable backward micro-kernels: the one source of backward_microkernels_impl.h compiled
// with the target's baseline flags and four-float vectors.
#define SA_SIMD_NAMESPACE generic
#define SA_VEC_BYTES 16
#include "backward_microkernels_impl.h"
