// sparse_attn._cuda_emu: the CUDA backend with the SIMT emulator in place of a GPU, for tests.
// "Device memory" is host memory, so the same Python dispatch (sparse_attn._device) and the same
// kernel source (emu_forward_*.cpp) run on a machine without a GPU. Also holds the emulator's
// controls (thread order, context switcher) and small kernels that test the layer itself.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "compat.h"
#include "device_backend.h"

namespace sparse_attn::cuda {
namespace {

constexpr size_t kAlignment = 256;  // as cudaMalloc

int device_count(std::string* why) {
  if (why != nullptr) why->clear();
  return 1;
}

void* allocate(size_t bytes) {
  return ::operator new((bytes + kAlignment - 1) / kAlignment * kAlignment,
                        std::align_val_t(kAlignment));
}

void release(void* ptr) noexcept { ::operator delete(ptr, std::align_val_t(kAlignment)); }

void copy(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }

int device_of(const void* ptr) {
  if (ptr == nullptr) throw std::invalid_argument("null device address");
  return 0;  // every host address stands for memory of the one emulated device
}

int current_device() { return 0; }

void set_device(int device) {
  if (device != 0) throw std::runtime_error("the emulator has one device (0)");
}

void forward(const ForwardParams& p, ElementType type, uintptr_t) {
  const cudaError_t err = launch_forward(p, type, nullptr);
  if (err != cudaSuccess) {
    throw std::runtime_error("emulated forward launch failed: invalid configuration (error " +
                             std::to_string(static_cast<int>(err)) + ")");
  }
}

void stream_synchronize(uintptr_t) {}  // emulated launches finish before they return

const Runtime kEmulatedRuntime{&device_count, &allocate, &release,       &copy,
                               &copy,         &device_of, &current_device, &set_device,
                               &forward,      &stream_synchronize};

// ---- a DLPack capsule over host memory that claims to live on a device (tests of parsing) ----

struct FakeTensor {
  dlpack::ManagedTensor managed;
  std::vector<int64_t> shape, strides;
  PyObject* owner;
};

void fake_tensor_deleter(dlpack::ManagedTensor* self) {
  auto* fake = static_cast<FakeTensor*>(self->manager_ctx);
  Py_XDECREF(fake->owner);
  delete fake;
}

void fake_capsule_destructor(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, "dltensor")) return;  // consumed: the consumer frees it
  auto* managed = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  managed->deleter(managed);
}

py::capsule fake_dlpack(const py::array& array, int code, int bits, int device_type) {
  auto* fake = new FakeTensor;
  for (py::ssize_t d = 0; d < array.ndim(); ++d) {
    fake->shape.push_back(array.shape(d));
    fake->strides.push_back(array.strides(d) / array.itemsize());
  }
  fake->owner = array.ptr();
  Py_INCREF(fake->owner);
  dlpack::Tensor& t = fake->managed.dl_tensor;
  t.data = const_cast<void*>(array.data());
  t.device = {device_type, 0};
  t.ndim = static_cast<int32_t>(array.ndim());
  t.dtype = {static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1};
  t.shape = fake->shape.data();
  t.strides = fake->strides.data();
  t.byte_offset = 0;
  fake->managed.manager_ctx = fake;
  fake->managed.deleter = &fake_tensor_deleter;
  PyObject* capsule = PyCapsule_New(&fake->managed, "dltensor", &fake_capsule_destructor);
  if (capsule == nullptr) {
    fake_tensor_deleter(&fake->managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(capsule);
}

// ---- kernels that test the emulation layer itself ---------------------------------------------

struct WarpSums {
  float warp_sum[32];
};

// out[block] = sum of the block's inputs: shuffles within warps, shared memory across them,
// then only warp 0 shuffles again (warps run different numbers of shuffles).
__global__ void block_sum_kernel(const float* in, float* out) {
  WarpSums& sh = shared_tiles<WarpSums>();
  const unsigned t = threadIdx.x, warps = blockDim.x / 32;
  float x = in[blockIdx.x * blockDim.x + t];
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  if (t % 32 == 0) sh.warp_sum[t / 32] = x;
  __syncthreads();
  if (t < 32) {
    float y = t < warps ? sh.warp_sum[t] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) y += __shfl_down_sync(0xffffffffu, y, offset);
    if (t == 0) out[blockIdx.x] = y;
  }
}

struct Neighbours {
  float value[1024];
};

// out[t] = in[t + 1] (cyclic within the block) through shared memory, with or without the
// barrier between the write and the read.
__global__ void neighbour_kernel(const float* in, float* out, int with_barrier) {
  Neighbours& sh = shared_tiles<Neighbours>();
  const unsigned t = threadIdx.x, base = blockIdx.x * blockDim.x;
  sh.value[t] = in[base + t];
  if (with_barrier) __syncthreads();
  out[base + t] = sh.value[(t + 1) % blockDim.x];
}

// Warp w shuffles w + 1 times, then the block meets at a barrier: out[t] = lane sums.
__global__ void uneven_shuffles_kernel(float* out) {
  const unsigned t = threadIdx.x, warp = t / 32;
  float x = static_cast<float>(t % 32);
  for (unsigned round = 0; round <= warp; ++round) {
    x = __shfl_sync(0xffffffffu, x, (t % 32 + 1) % 32);
  }
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = x + static_cast<float>(__ballot_sync(0xffffffffu, t % 2) != 0);
}

__global__ void read_unwritten_kernel(float* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = shared_tiles<Neighbours>().value[threadIdx.x];
}

__global__ void count_kernel(unsigned long long* counter) {
  atomicAdd(counter, 1ull);
}

__global__ void deadlock_kernel() {
  if (threadIdx.x == 0) {
    __syncwarp();  // lane 0 waits for its warp, the rest of the block for a barrier
  } else {
    __syncthreads();
  }
}

__global__ void early_exit_kernel() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void partial_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}

__global__ void oversized_shared_kernel() { shared_tiles<Neighbours>().value[0] = 0.0f; }

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

FloatArray block_sum(const FloatArray& in, unsigned threads) {
  const auto blocks = static_cast<unsigned>(in.size() / threads);
  FloatArray out(blocks);
  launch_kernel(&block_sum_kernel, dim3(blocks), dim3(threads), sizeof(WarpSums), nullptr,
                in.data(), out.mutable_data());
  return out;
}

FloatArray neighbours(const FloatArray& in, unsigned threads, bool with_barrier) {
  FloatArray out(in.size());
  launch_kernel(&neighbour_kernel, dim3(static_cast<unsigned>(in.size() / threads)),
                dim3(threads), sizeof(Neighbours), nullptr, in.data(), out.mutable_data(),
                int{with_barrier});
  return out;
}

FloatArray uneven_shuffles(unsigned blocks, unsigned threads) {
  FloatArray out(blocks * threads);
  launch_kernel(&uneven_shuffles_kernel, dim3(blocks), dim3(threads), 0, nullptr,
                out.mutable_data());
  return out;
}

FloatArray read_unwritten(unsigned threads) {
  FloatArray out(threads);
  launch_kernel(&read_unwritten_kernel, dim3(1), dim3(threads), sizeof(Neighbours), nullptr,
                out.mutable_data());
  return out;
}

unsigned long long count_threads(unsigned blocks, unsigned threads) {
  unsigned long long counter = 0;
  launch_kernel(&count_kernel, dim3(blocks), dim3(threads), 0, nullptr, &counter);
  return counter;
}

// Kernels that break a rule of the execution model; each launch must raise.
void run_faulty(const std::string& name) {
  std::vector<float> out(64);
  if (name == "deadlock") {
    launch_kernel(&deadlock_kernel, dim3(1), dim3(64), 0, nullptr);
  } else if (name == "early_exit") {
    launch_kernel(&early_exit_kernel, dim3(1), dim3(64), 0, nullptr);
  } else if (name == "partial_mask") {
    launch_kernel(&partial_mask_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
  } else if (name == "oversized_shared") {
    launch_kernel(&oversized_shared_kernel, dim3(1), dim3(32), 16, nullptr);
  } else {
    throw std::invalid_argument("unknown faulty kernel " + name);
  }
}

void set_schedule(const std::string& order, uint64_t seed, const std::string& switcher) {
  sa_emu::Schedule s;
  if (order == "forward") {
    s.order = sa_emu::Order::Forward;
  } else if (order == "reverse") {
    s.order = sa_emu::Order::Reverse;
  } else if (order == "shuffled") {
    s.order = sa_emu::Order::Shuffled;
  } else {
    throw std::invalid_argument("order must be 'forward', 'reverse' or 'shuffled'");
  }
  s.seed = seed;
  if (switcher == "ucontext") {
    s.switcher = sa_emu::Switcher::Ucontext;
  } else if (switcher == "assembly") {
#if !defined(__x86_64__)
    throw std::invalid_argument("the assembly switcher exists on x86-64 only");
#endif
    s.switcher = sa_emu::Switcher::Assembly;
  } else if (switcher != "default") {
    throw std::invalid_argument("switcher must be 'default', 'assembly' or 'ucontext'");
  }
  sa_emu::set_schedule(s);
}

}  // namespace
}  // namespace sparse_attn::cuda

PYBIND11_MODULE(_cuda_emu, m) {
  using namespace sparse_attn::cuda;
  m.doc() = "The CUDA backend on the SIMT emulator (tests only; private)";
  py::register_exception<sa_emu::EmulationError>(m, "EmulationError", PyExc_RuntimeError);
  register_backend(m, kEmulatedRuntime);
  m.def("set_schedule", &set_schedule, py::arg("order") = "forward", py::arg("seed") = 0,
        py::arg("switcher") = "default",
        "Thread order (forward, reverse, shuffled with seed) and context switcher of later\n"
        "launches");
  m.def("last_launch_stats", [] {
    const sa_emu::Stats s = sa_emu::last_launch_stats();
    py::dict d;
    d["blocks"] = s.blocks;
    d["switches"] = s.switches;
    d["barriers"] = s.barriers;
    d["warp_syncs"] = s.warp_syncs;
    return d;
  });
  m.def("fake_dlpack", &fake_dlpack, py::arg("array"), py::arg("code"), py::arg("bits"),
        py::arg("device_type") = 2);
  py::module_ k = m.def_submodule("selftest", "kernels that test the emulation layer");
  const auto release = py::call_guard<py::gil_scoped_release>();
  k.def("block_sum", &block_sum);
  k.def("neighbours", &neighbours);
  k.def("uneven_shuffles", &uneven_shuffles);
  k.def("read_unwritten", &read_unwritten);
  k.def("count_threads", &count_threads, release);
  k.def("run_faulty", &run_faulty, release);
}
