// The launch helpers of the CUDA forward kernel, declared for host code: each instantiation
// is compiled in its own forward_<type>.cu (or emu_forward_<type>.cpp for the emulator), so
// this header must not define anything that names them. Includes no device code.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "forward_params.h"

namespace sparse_attn::cuda {

// Defined in forward_kernel.h: kColsPerThread = 8 serves dim_v <= 64 in one block column
// slice, 16 serves dim_v <= 128 (larger dim_v takes several slices).
template <typename T, int kColsPerThread>
cudaError_t launch_forward_kernel(const ForwardParams& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_hard_kernel(const ForwardParams& p, cudaStream_t stream);

}  // namespace sparse_attn::cuda

// One translation unit per element type instantiates its kernels (builds run in parallel).
// Used at global scope.
#define SA_INSTANTIATE_FORWARD(T)                                        \
  template cudaError_t sparse_attn::cuda::launch_forward_kernel<T, 8>(   \
      const sparse_attn::cuda::ForwardParams&, cudaStream_t);            \
  template cudaError_t sparse_attn::cuda::launch_forward_kernel<T, 16>(  \
      const sparse_attn::cuda::ForwardParams&, cudaStream_t);            \
  template cudaError_t sparse_attn::cuda::launch_hard_kernel<T>(         \
      const sparse_attn::cuda::ForwardParams&, cudaStream_t);
