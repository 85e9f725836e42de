// SA_HD: marks the inline functions that the CPU code, the CUDA kernels and the layout compiler
// share (predicates.h, random.h). Holds nothing else.
#pragma once

#if defined(__CUDACC__)
#define SA_HD __host__ __device__ __forceinline__
#else
#define SA_HD inline
#endif
