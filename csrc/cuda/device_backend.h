// The host side of a CUDA backend and its Python bindings, shared by the real backend
// (sparse_attn._core.cuda: the CUDA runtime) and the emulated one (sparse_attn._cuda_emu: host
// memory and the SIMT emulator). Device memory, device copies of layouts, DLPack parsing and
// the forward call: conversions and checks only; the attention itself is in forward_kernel.h.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/layout.h"
#include "../core/params.h"
#include "../problem_fields.h"
#include "forward_launch.h"
#include "forward_params.h"

namespace sparse_attn::cuda {

namespace py = pybind11;

static_assert(static_cast<uint8_t>(TileKind::Partial) == kPartialTile, "tile kinds disagree");
static_assert(static_cast<int32_t>(Mode::Softmax) == kModeSoftmax &&
                  static_cast<int32_t>(Mode::Hard) == kModeHard,
              "modes disagree");
static_assert(static_cast<int32_t>(ScoreKind::Dot) == kScoreDot &&
                  static_cast<int32_t>(ScoreKind::Cosine) == kScoreCosine,
              "score kinds disagree");

// What a backend provides. Every function but device_count throws std::runtime_error on failure.
struct Runtime {
  // Usable devices; 0 with *why set when there are none or the query failed. Never throws.
  int (*device_count)(std::string* why);
  void* (*allocate)(size_t bytes);
  void (*release)(void* ptr) noexcept;
  void (*copy_to_device)(void* dst, const void* src, size_t bytes);
  void (*copy_to_host)(void* dst, const void* src, size_t bytes);
  // The device that holds ptr; throws when ptr is not device memory this backend can read.
  int (*device_of)(const void* ptr);
  int (*current_device)();
  void (*set_device)(int device);
  // Launches the forward kernel on stream and waits for it.
  void (*forward)(const ForwardParams& p, ElementType type, uintptr_t stream);
  void (*stream_synchronize)(uintptr_t stream);
};

// Device memory owned by Python objects (freed with the last reference).
class DeviceBuffer {
 public:
  DeviceBuffer(const Runtime& rt, size_t bytes)
      : rt_(&rt), bytes_(bytes), ptr_(bytes ? rt.allocate(bytes) : nullptr) {}
  ~DeviceBuffer() {
    if (ptr_ != nullptr) rt_->release(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  uintptr_t ptr() const { return reinterpret_cast<uintptr_t>(ptr_); }
  size_t bytes() const { return bytes_; }
  // Copies bytes from host memory at address into the buffer at offset.
  void upload(uintptr_t address, size_t bytes, size_t offset = 0) {
    check_range(bytes, offset);
    if (bytes) rt_->copy_to_device(static_cast<char*>(ptr_) + offset,
                                   reinterpret_cast<const void*>(address), bytes);
  }
  void download(uintptr_t address, size_t bytes, size_t offset = 0) const {
    check_range(bytes, offset);
    if (bytes) rt_->copy_to_host(reinterpret_cast<void*>(address),
                                 static_cast<const char*>(ptr_) + offset, bytes);
  }
  template <typename T>
  static std::unique_ptr<DeviceBuffer> from_host(const Runtime& rt, const T* data, size_t count) {
    auto buffer = std::make_unique<DeviceBuffer>(rt, count * sizeof(T));
    buffer->upload(reinterpret_cast<uintptr_t>(data), count * sizeof(T));
    return buffer;
  }

 private:
  void check_range(size_t bytes, size_t offset) const {
    if (offset > bytes_ || bytes > bytes_ - offset) {
      throw std::invalid_argument("device buffer: copy outside the buffer");
    }
  }
  const Runtime* rt_;
  size_t bytes_;
  void* ptr_;
};

// A compiled layout copied to one device: its tables and its program with the nodes' data.
class DeviceLayoutCopy {
 public:
  DeviceLayoutCopy(const Runtime& rt, const Layout& layout) : spec_(layout.spec()) {
    const int64_t q_tiles = layout.num_q_tiles(), listed = layout.num_listed();
    std::vector<int64_t> row_start(q_tiles + 1);
    for (int64_t qt = 0; qt <= q_tiles; ++qt) row_start[qt] = layout.row_start(qt);
    std::vector<uint8_t> kinds(listed);
    for (int64_t e = 0; e < listed; ++e) kinds[e] = static_cast<uint8_t>(layout.kinds()[e]);
    const PatternProgram program = layout.program();
    std::vector<PatternNode> nodes(program.nodes, program.nodes + program.size);
    for (PatternNode& node : nodes) {  // node data moves to the device, pointers follow
      if (node.data_len == 0 || node.data == nullptr) continue;
      const size_t bytes = static_cast<size_t>(node.data_len) *
                           (node_data_is_int64(node.op) ? sizeof(int64_t) : sizeof(uint8_t));
      keep(DeviceBuffer::from_host(rt, static_cast<const uint8_t*>(node.data), bytes));
      node.data = reinterpret_cast<const void*>(buffers_.back()->ptr());
    }
    view_.row_start = keep(DeviceBuffer::from_host(rt, row_start.data(), row_start.size()));
    view_.key_tiles = keep(DeviceBuffer::from_host(rt, layout.key_tiles(), size_t(listed)));
    view_.kinds = keep(DeviceBuffer::from_host(rt, kinds.data(), kinds.size()));
    view_.q_tiles_by_cost =
        keep(DeviceBuffer::from_host(rt, layout.q_tiles_by_cost(), size_t(q_tiles)));
    view_.program = {keep(DeviceBuffer::from_host(rt, nodes.data(), nodes.size())),
                     static_cast<int32_t>(nodes.size())};
    view_.len_q = spec_.len_q;
    view_.len_k = spec_.len_k;
    view_.q0 = spec_.q0;
    view_.k0 = spec_.k0;
  }
  const DeviceLayout& view() const { return view_; }
  const LayoutSpec& spec() const { return spec_; }

 private:
  // Keeps the buffer and returns its device address, typed for the view.
  struct Address {
    uintptr_t value;
    template <typename T>
    operator const T*() const {
      return reinterpret_cast<const T*>(value);
    }
  };
  Address keep(std::unique_ptr<DeviceBuffer> buffer) {
    buffers_.push_back(std::move(buffer));
    return {buffers_.back()->ptr()};
  }
  LayoutSpec spec_;
  DeviceLayout view_;
  std::vector<std::unique_ptr<DeviceBuffer>> buffers_;
};

// ---- DLPack (the stable C ABI of dlpack.h v0.8, the legacy "dltensor" capsule) --------------

namespace dlpack {
struct Device {
  int32_t device_type;
  int32_t device_id;
};
struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};
}  // namespace dlpack

// The tensor a "dltensor" capsule describes, without consuming it: the capsule (kept alive by
// the caller) still owns the memory and frees it when it is collected.
inline py::dict dlpack_info(const py::capsule& capsule) {
  if (std::string(capsule.name() ? capsule.name() : "") != "dltensor") {
    throw std::invalid_argument("not an unconsumed DLPack capsule (name 'dltensor')");
  }
  const auto* managed = capsule.get_pointer<dlpack::ManagedTensor>();
  const dlpack::Tensor& t = managed->dl_tensor;
  py::list shape, strides;
  for (int32_t d = 0; d < t.ndim; ++d) {
    shape.append(t.shape[d]);
    if (t.strides != nullptr) strides.append(t.strides[d]);
  }
  py::dict info;
  info["ptr"] = reinterpret_cast<uintptr_t>(t.data) + t.byte_offset;
  info["device_type"] = t.device.device_type;
  info["device_id"] = t.device.device_id;
  info["code"] = t.dtype.code;
  info["bits"] = t.dtype.bits;
  info["lanes"] = t.dtype.lanes;
  info["shape"] = py::tuple(shape);
  info["strides"] = t.strides != nullptr ? py::object(py::tuple(strides)) : py::object(py::none());
  return info;
}

// ---- the forward call ------------------------------------------------------------------------

// The kernel for the mode, element type and output width (8 columns per thread serve
// dim_v <= 64 in one slice of output columns, 16 serve wider outputs).
template <typename T>
cudaError_t launch_for_type(const ForwardParams& p, cudaStream_t stream) {
  if (p.mode == kModeHard) return launch_hard_kernel<T>(p, stream);
  return p.dim_v > 64 ? launch_forward_kernel<T, 16>(p, stream)
                      : launch_forward_kernel<T, 8>(p, stream);
}

inline cudaError_t launch_forward(const ForwardParams& p, ElementType type, cudaStream_t stream) {
  switch (type) {
    case ElementType::Float32:
      return launch_for_type<float>(p, stream);
    case ElementType::Float16:
      return launch_for_type<__half>(p, stream);
    case ElementType::BFloat16:
      return launch_for_type<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

// An operand from Python: (device address, batch offsets (int64 numpy), stride_head,
// stride_row, stride_col), strides in elements. The offsets are copied to the device.
inline DeviceOperand to_device_operand(const Runtime& rt, const py::object& spec,
                                       std::vector<std::unique_ptr<DeviceBuffer>>& keep) {
  DeviceOperand op;
  if (spec.is_none()) return op;
  auto t = spec.cast<py::tuple>();
  if (t.size() != 5) throw std::invalid_argument("operand must be a 5-tuple");
  using Offsets = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  auto offsets = t[1].cast<Offsets>();
  keep.push_back(DeviceBuffer::from_host(rt, offsets.data(), size_t(offsets.size())));
  op.data = reinterpret_cast<const void*>(t[0].cast<uintptr_t>());
  op.batch_offset = reinterpret_cast<const int64_t*>(keep.back()->ptr());
  op.stride_head = t[2].cast<int64_t>();
  op.stride_row = t[3].cast<int64_t>();
  op.stride_col = t[4].cast<int64_t>();
  if (op.data == nullptr) throw std::invalid_argument("operand: null device address");
  return op;
}

inline ElementType element_type(const std::string& name) {
  if (name == "float32") return ElementType::Float32;
  if (name == "float16") return ElementType::Float16;
  if (name == "bfloat16") return ElementType::BFloat16;
  throw std::invalid_argument("forward: the CUDA kernels take float32, float16 or bfloat16, not " +
                              name);
}

// Sets the device for the lifetime of the guard and restores the previous one.
class DeviceGuard {
 public:
  DeviceGuard(const Runtime& rt, int device) : rt_(rt), previous_(rt.current_device()) {
    if (device != previous_) rt_.set_device(device);
  }
  ~DeviceGuard() {
    try {
      if (rt_.current_device() != previous_) rt_.set_device(previous_);
    } catch (...) {  // restoring is best effort; the call's own error matters more
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  const Runtime& rt_;
  int previous_;
};

// The forward call: config holds the sizes and options (the keys of _device.py), operands
// the q, k, v, mask and bias descriptions, results the device addresses of out, lse, index,
// key_lengths and alibi_slopes (0: absent).
inline void forward(const Runtime& rt, const py::dict& config, const py::dict& operands,
                    const py::dict& results,
                    const std::vector<std::shared_ptr<DeviceLayoutCopy>>& layouts, int device,
                    uintptr_t stream) {
  DeviceGuard guard(rt, device);
  ForwardParams p;
  const ElementType type = element_type(config["dtype"].cast<std::string>());
  const auto mode = config["mode"].cast<std::string>();
  if (mode != "softmax" && mode != "hard") {
    throw std::invalid_argument("forward: the CUDA kernels compute the softmax and hard modes");
  }
  p.mode = mode == "hard" ? kModeHard : kModeSoftmax;
  read_problem_fields(config, p);
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0 || p.dim_qk < 1 || p.dim_v < 0) {
    throw std::invalid_argument("forward: inconsistent heads or head dims");
  }
  const auto score = config["score"].cast<std::string>();
  if (score != "dot" && score != "cosine") {
    throw std::invalid_argument("forward: the CUDA kernels score with 'dot' or 'cosine'");
  }
  p.score = score == "cosine" ? kScoreCosine : kScoreDot;
  p.scale = config["scale"].cast<float>();
  p.softcap = config["softcap"].cast<float>();
  p.dropout_p = config["dropout_p"].cast<float>();
  p.sample = config["sample"].cast<bool>();
  p.temperature = config["temperature"].cast<float>();
  p.seed = config["seed"].cast<uint64_t>();
  if (static_cast<int64_t>(layouts.size()) != p.heads_q) {
    throw std::invalid_argument("forward: one layout per query head is required");
  }
  std::vector<DeviceLayout> views;
  for (const auto& layout : layouts) {
    const LayoutSpec& s = layout->spec();
    if (s.len_q != p.len_q || s.len_k != p.len_k || s.tile_q != kTileQ || s.tile_k != kTileK) {
      throw std::invalid_argument("forward: layout does not match the problem or the tile size");
    }
    views.push_back(layout->view());
  }
  p.num_q_tiles = (p.len_q + kTileQ - 1) / kTileQ;
  if (p.batch * p.heads_q * p.num_q_tiles == 0) return;
  std::vector<std::unique_ptr<DeviceBuffer>> keep;
  p.q = to_device_operand(rt, operands["q"], keep);
  p.k = to_device_operand(rt, operands["k"], keep);
  p.v = to_device_operand(rt, operands["v"], keep);
  p.mask = to_device_operand(rt, operands["mask"], keep);
  p.bias = to_device_operand(rt, operands["bias"], keep);
  if (p.q.stride_col != 1 || p.k.stride_col != 1 || p.v.stride_col != 1) {
    throw std::invalid_argument("forward: q, k, v need unit column stride");
  }
  auto address = [&](const char* name) { return results[name].cast<uintptr_t>(); };
  p.key_lengths = reinterpret_cast<const int64_t*>(address("key_lengths"));
  p.alibi_slopes = reinterpret_cast<const float*>(address("alibi_slopes"));
  p.out = reinterpret_cast<void*>(address("out"));
  p.lse = reinterpret_cast<float*>(address("lse"));
  p.index = reinterpret_cast<int64_t*>(address("index"));
  if ((p.out == nullptr && p.dim_v > 0) || (p.mode == kModeHard && p.index == nullptr)) {
    throw std::invalid_argument("forward: a result array of this mode is missing");
  }
  keep.push_back(DeviceBuffer::from_host(rt, views.data(), views.size()));
  p.layouts = reinterpret_cast<const DeviceLayout*>(keep.back()->ptr());
  py::gil_scoped_release release;
  rt.forward(p, type, stream);
}

// Registers the backend's functions on m (the same names for every backend). Its classes are
// module-local: both backends register the same C++ types.
inline void register_backend(py::module_& m, const Runtime& rt) {
  const Runtime* r = &rt;
  m.def("device_count", [r] {
    std::string why;
    const int n = r->device_count(&why);
    return py::make_tuple(n, why);
  }, "(number of usable devices, why there are none)");
  m.def("current_device", [r] { return r->current_device(); });
  m.def("set_device", [r](int device) { r->set_device(device); });
  m.def("stream_synchronize", [r](uintptr_t stream) { r->stream_synchronize(stream); },
        py::call_guard<py::gil_scoped_release>());
  m.def("device_of", [r](uintptr_t ptr) { return r->device_of(reinterpret_cast<void*>(ptr)); },
        "The device holding a device address (RuntimeError when it is not device memory).");
  py::class_<DeviceBuffer, std::shared_ptr<DeviceBuffer>>(m, "DeviceBuffer", py::module_local())
      .def(py::init([r](size_t bytes) { return std::make_shared<DeviceBuffer>(*r, bytes); }))
      .def_property_readonly("ptr", &DeviceBuffer::ptr)
      .def_property_readonly("nbytes", &DeviceBuffer::bytes)
      .def("upload", &DeviceBuffer::upload, py::arg("address"), py::arg("nbytes"),
           py::arg("offset") = 0, py::call_guard<py::gil_scoped_release>())
      .def("download", &DeviceBuffer::download, py::arg("address"), py::arg("nbytes"),
           py::arg("offset") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("copy_to_host", [r](uintptr_t dst, uintptr_t src, size_t bytes) {
    py::gil_scoped_release release;
    if (bytes) r->copy_to_host(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), bytes);
  });
  py::class_<DeviceLayoutCopy, std::shared_ptr<DeviceLayoutCopy>>(m, "DeviceLayout",
                                                               py::module_local())
      .def(py::init([r](std::shared_ptr<Layout> layout) {
        return std::make_shared<DeviceLayoutCopy>(*r, *layout);
      }));
  m.def("dlpack_info", &dlpack_info);
  m.def("forward", [r](const py::dict& config, const py::dict& operands, const py::dict& results,
                       const std::vector<std::shared_ptr<DeviceLayoutCopy>>& layouts, int device,
                       uintptr_t stream) {
    forward(*r, config, operands, results, layouts, device, stream);
  });
}

}  // namespace sparse_attn::cuda
