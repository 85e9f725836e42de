// The real CUDA backend of sparse_attn._core: the CUDA runtime (linked statically, so libcuda
// is only loaded when first needed and the module imports without a driver) behind the Runtime
// interface of device_backend.h, registered as the submodule _core.cuda.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <mutex>
#include <stdexcept>
#include <string>

#include "device_backend.h"

namespace sparse_attn::cuda {
namespace {

std::string error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls start clean
    throw std::runtime_error(std::string("CUDA ") + what + " failed (" + error_text(err) + ")");
  }
}

// Why cudaGetDeviceCount found nothing, in words a user can act on.
std::string explain(cudaError_t err) {
  switch (err) {
    case cudaErrorInsufficientDriver:
      return "no usable NVIDIA driver: the driver is missing or older than the CUDA runtime "
             "this build uses (" + error_text(err) + ")";
    case cudaErrorNoDevice:
      return "no CUDA device is present (" + error_text(err) + ")";
    default:
      return "the CUDA runtime could not list devices (" + error_text(err) + ")";
  }
}

int device_count(std::string* why) {
  static std::once_flag once;
  static int count = 0;  // any error means no GPU; cudaGetDeviceCount may not write it
  static std::string reason;
  std::call_once(once, [] {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      cudaGetLastError();
      n = 0;
      reason = explain(err);
    } else if (n < 1) {
      n = 0;
      reason = "no CUDA device is present";
    }
    count = n;
  });
  if (why != nullptr) *why = reason;
  return count;
}

void* allocate(size_t bytes) {
  void* ptr = nullptr;
  const cudaError_t err = cudaMalloc(&ptr, bytes);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    throw std::bad_alloc();
  }
  check(err, "cudaMalloc");
  return ptr;
}

void release(void* ptr) noexcept { cudaFree(ptr); }

void copy_to_device(void* dst, const void* src, size_t bytes) {
  check(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "copy to the device");
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "copy to the host");
}

int device_of(const void* ptr) {
  cudaPointerAttributes attributes{};
  check(cudaPointerGetAttributes(&attributes, ptr), "cudaPointerGetAttributes");
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
    throw std::invalid_argument("the array's data is not in CUDA device memory");
  }
  return attributes.device;
}

int current_device() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

void set_device(int device) { check(cudaSetDevice(device), "cudaSetDevice"); }

void forward(const ForwardParams& p, ElementType type, uintptr_t stream_handle) {
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  check(launch_forward(p, type, stream), "forward kernel launch");
  check(cudaStreamSynchronize(stream), "forward kernel");
}

void stream_synchronize(uintptr_t stream) {
  check(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)), "stream synchronize");
}

const Runtime kCudaRuntime{&device_count, &allocate,   &release, &copy_to_device,
                           &copy_to_host, &device_of,  &current_device,
                           &set_device,   &forward,    &stream_synchronize};

}  // namespace

void register_cuda_backend(py::module_& core) {
  py::module_ m = core.def_submodule("cuda", "the CUDA backend (private: use sparse_attn)");
  register_backend(m, kCudaRuntime);
  int runtime_version = 0;
  cudaRuntimeGetVersion(&runtime_version);  // answers without a driver
  m.attr("runtime_version") = runtime_version;
  m.attr("architectures") = SPARSE_ATTN_CUDA_ARCHITECTURES;
}

}  // namespace sparse_attn::cuda
