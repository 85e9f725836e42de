// The one header the CUDA kernels include: CUDA itself under nvcc, the SIMT emulation layer
// (simt_emu.h) under the host compiler. It also holds the few shims both sides share: the
// shared-memory struct accessor, the launch helper's core and the fp16/bf16 conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define SA_DEVICE __device__ __forceinline__
#define SA_DEVICE_NOINLINE static __device__ __noinline__  // a real call; one copy per file
#define SA_PRAGMA(x) _Pragma(#x)
#define SA_UNROLL SA_PRAGMA(unroll)
#define SA_UNROLL_BY(n) SA_PRAGMA(unroll n)
#else
#include "simt_emu.h"
#define SA_DEVICE inline
#define SA_DEVICE_NOINLINE inline
#define SA_UNROLL
#define SA_UNROLL_BY(n)
#endif

namespace sparse_attn::cuda {

// The block's dynamic shared memory viewed as one struct (launched with sizeof(Tiles) bytes).
template <typename Tiles>
SA_DEVICE Tiles& shared_tiles() {
#if defined(__CUDACC__)
  extern __shared__ __align__(16) unsigned char sa_dynamic_shared[];
  return *reinterpret_cast<Tiles*>(sa_dynamic_shared);
#else
  return *sa_emu::dynamic_shared<Tiles>();
#endif
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...) on the GPU; the emulator's launch on
// the host (which runs the whole grid before returning and ignores the stream).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                          cudaStream_t stream, Args... args) {
#if defined(__CUDACC__)
  if (shared_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
  return cudaGetLastError();
#else
  (void)stream;
  sa_emu::launch(grid, block, shared_bytes, kernel, args...);
  return cudaSuccess;
#endif
}

// Element conversions: kernels compute in float32 whatever the storage type.
SA_DEVICE float to_float(float x) { return x; }
SA_DEVICE float to_float(__half x) { return __half2float(x); }
SA_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
SA_DEVICE T from_float(float x);
template <>
SA_DEVICE float from_float<float>(float x) {
  return x;
}
template <>
SA_DEVICE __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
SA_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace sparse_attn::cuda
