// The pybind11 module sparse_attn._core: converts arrays, checks the invariants the C++ side
// relies on, releases the GIL and calls one function. No attention logic lives here; argument
// validation with user-facing messages is done in python/sparse_attn/api.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/backward_params.h"
#include "core/layout.h"
#include "core/params.h"
#include "cpu/backward.h"
#include "cpu/forward.h"
#include "cpu/microkernels.h"
#include "interrupt.h"
#include "problem_fields.h"

namespace py = pybind11;
#if SPARSE_ATTN_WITH_CUDA
namespace sparse_attn::cuda {
void register_cuda_backend(py::module_& core);  // csrc/cuda/bindings_cuda.cpp: _core.cuda
}
#endif
using sparse_attn::AttentionParams;
using sparse_attn::Layout;
using sparse_attn::Operand;
using sparse_attn::PatternNode;
// pybind11 holders cannot be pointers to const; a Layout has no mutating member anyway.
using LayoutPtr = std::shared_ptr<Layout>;

namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

LayoutPtr compile_layout(Int64Array nodes, const py::list& data, int64_t len_q, int64_t len_k,
                         int64_t tile_q, int64_t tile_k, int64_t q0, int64_t k0) {
  if (nodes.ndim() != 2 || nodes.shape(1) != 5 || static_cast<size_t>(nodes.shape(0)) != data.size()) {
    throw std::invalid_argument("compile_layout: nodes must be (n, 5) with one data entry each");
  }
  std::vector<PatternNode> program(nodes.shape(0));
  std::vector<py::array> keep_alive;
  auto n = nodes.unchecked<2>();
  for (py::ssize_t i = 0; i < nodes.shape(0); ++i) {
    PatternNode& node = program[i];
    node.op = static_cast<sparse_attn::Op>(n(i, 0));
    node.a = n(i, 1), node.b = n(i, 2), node.c = n(i, 3), node.d = n(i, 4);
    node.data = nullptr;
    node.data_len = 0;
    if (data[i].is_none()) continue;
    py::array arr = py::array::ensure(data[i], py::array::c_style);
    const bool tokens = sparse_attn::node_data_is_int64(node.op);
    if (!arr || arr.itemsize() != (tokens ? 8 : 1)) {
      throw std::invalid_argument(
          "compile_layout: node data must be int64 (tokens, document ends, exclusions) or uint8");
    }
    node.data = arr.data();
    node.data_len = arr.size();
    keep_alive.push_back(arr);
  }
  sparse_attn::LayoutSpec spec{len_q, len_k, tile_q, tile_k, q0, k0};
  py::gil_scoped_release release;
  return std::const_pointer_cast<Layout>(sparse_attn::compile_layout(program, spec));
}

py::array_t<uint8_t> dense_kinds(const Layout& layout) {
  py::array_t<uint8_t> out({layout.num_q_tiles(), layout.num_k_tiles()});
  auto view = out.mutable_unchecked<2>();
  std::fill(out.mutable_data(), out.mutable_data() + out.size(), 0);
  for (int64_t qt = 0; qt < layout.num_q_tiles(); ++qt) {
    for (int64_t e = layout.row_start(qt); e < layout.row_start(qt + 1); ++e) {
      view(qt, layout.key_tiles()[e]) = static_cast<uint8_t>(layout.kinds()[e]);
    }
  }
  return out;
}

// An operand arrives from Python as (array, batch_offsets, stride_head, stride_row, stride_col)
// with strides in elements, computed by _args.py from the array's own strides.
Operand to_operand(const py::object& spec, const py::dtype& dtype, std::vector<py::object>& keep) {
  Operand op;
  if (spec.is_none()) return op;
  auto t = spec.cast<py::tuple>();
  if (t.size() != 5) throw std::invalid_argument("operand must be a 5-tuple");
  auto arr = t[0].cast<py::array>();
  if (!arr.dtype().equal(dtype)) throw std::invalid_argument("operand has the wrong dtype");
  auto offsets = t[1].cast<Int64Array>();
  op.data = arr.data();
  op.batch_offset = offsets.data();
  op.stride_head = t[2].cast<int64_t>();
  op.stride_row = t[3].cast<int64_t>();
  op.stride_col = t[4].cast<int64_t>();
  keep.push_back(arr);
  keep.push_back(offsets);
  return op;
}

// A result or auxiliary array: C-contiguous, of the given dtype and size; null when None.
template <typename Pointer>
Pointer buffer(const py::dict& d, const char* name, const py::dtype& dtype, int64_t size,
               std::vector<py::object>& keep) {
  if (!d.contains(name) || d[name].is_none()) return nullptr;
  auto arr = d[name].cast<py::array>();
  if (!arr.dtype().equal(dtype) || !(arr.flags() & py::array::c_style) || arr.size() != size) {
    throw std::invalid_argument(std::string("bad array for ") + name);
  }
  keep.push_back(arr);
  return static_cast<Pointer>(arr.mutable_data());
}

// Fills the parameter struct from three dicts built by api.py. `keep` holds the arrays its
// pointers point into and `raw` its layout pointers: both must outlive the kernel call.
AttentionParams attention_params(const py::dict& config, const py::dict& operands,
                                 const py::dict& arrays, const std::vector<LayoutPtr>& layouts,
                                 int num_threads, std::vector<py::object>& keep,
                                 std::vector<const Layout*>& raw) {
  AttentionParams p;
  const py::dtype dtype(config["dtype"].cast<std::string>());
  if (dtype.equal(py::dtype::of<float>())) {
    p.dtype = sparse_attn::DType::Float32;
  } else if (dtype.equal(py::dtype::of<double>())) {
    p.dtype = sparse_attn::DType::Float64;
  } else {
    throw std::invalid_argument("forward: dtype must be float32 or float64");
  }
  p.mode = static_cast<sparse_attn::Mode>(config["mode"].cast<int>());
  p.score = static_cast<sparse_attn::ScoreKind>(config["score"].cast<int>());
  sparse_attn::read_problem_fields(config, p);
  p.scale = config["scale"].cast<double>();
  p.softcap = config["softcap"].cast<double>();
  p.dropout_p = config["dropout_p"].cast<double>();
  p.sample = config["sample"].cast<bool>();
  p.temperature = config["temperature"].cast<double>();
  p.seed = config["seed"].cast<uint64_t>();
  p.additive_dim = config["additive_dim"].cast<int64_t>();

  const auto u8 = py::dtype::of<uint8_t>();
  const auto i64 = py::dtype::of<int64_t>();
  const auto f64 = py::dtype::of<double>();
  p.q = to_operand(operands["q"], dtype, keep);
  p.k = to_operand(operands["k"], dtype, keep);
  p.v = to_operand(operands["v"], dtype, keep);
  p.mask = to_operand(operands["mask"], u8, keep);
  p.bias = to_operand(operands["bias"], dtype, keep);
  p.q_proj = to_operand(operands["q_proj"], dtype, keep);
  p.k_proj = to_operand(operands["k_proj"], dtype, keep);
  if (p.q.stride_col != 1 || p.k.stride_col != 1 || p.v.stride_col != 1 ||
      p.q_proj.stride_col != 1 || p.k_proj.stride_col != 1) {
    throw std::invalid_argument("forward: q, k, v and projections need unit column stride");
  }
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  p.key_lengths = buffer<const int64_t*>(arrays, "key_lengths", i64, p.batch, keep);
  p.alibi_slopes = buffer<const double*>(arrays, "alibi_slopes", f64, p.heads_q, keep);
  p.additive_w = buffer<const void*>(arrays, "additive_w", dtype, p.additive_dim, keep);
  p.out = buffer<void*>(arrays, "out", dtype, rows * p.dim_v, keep);
  p.lse = buffer<void*>(arrays, "lse", dtype, rows, keep);
  p.index = buffer<int64_t*>(arrays, "index", i64, rows, keep);
  p.row_counts = buffer<int64_t*>(arrays, "row_counts", i64, rows, keep);
  p.csr_row_ptr = buffer<const int64_t*>(arrays, "csr_row_ptr", i64, rows + 1, keep);
  if (p.csr_row_ptr != nullptr) {
    const int64_t nnz = p.csr_row_ptr[rows];
    p.csr_col_index = buffer<int64_t*>(arrays, "csr_col_index", i64, nnz, keep);
    p.weights = buffer<void*>(arrays, "weights", dtype, nnz, keep);
  } else {
    p.weights = buffer<void*>(arrays, "weights", dtype, rows * p.len_k, keep);
  }
  if (static_cast<int64_t>(layouts.size()) != p.heads_q) {
    throw std::invalid_argument("forward: one layout per query head is required");
  }
  raw.resize(layouts.size());
  for (size_t h = 0; h < layouts.size(); ++h) raw[h] = layouts[h].get();
  p.layouts = raw.data();
  p.num_threads = num_threads;
  return p;
}

// Runs kernel(cancel flag) with the GIL released and Ctrl-C polled by the kernels; an
// interrupt is handed to Python's handler afterwards (the result is incomplete anyway).
template <typename Kernel>
void run_interruptible(Kernel kernel) {
  bool interrupted = false;
  {
    sparse_attn::InterruptScope interrupt;
    py::gil_scoped_release release;
    kernel(interrupt.cancel());
    interrupted = interrupt.interrupted();
  }
  if (interrupted) {
    PyErr_SetInterrupt();
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    PyErr_SetNone(PyExc_KeyboardInterrupt);
    throw py::error_already_set();
  }
}

void forward(const py::dict& config, const py::dict& operands, const py::dict& arrays,
             const std::vector<LayoutPtr>& layouts, int num_threads) {
  std::vector<py::object> keep;
  std::vector<const Layout*> raw;
  AttentionParams p = attention_params(config, operands, arrays, layouts, num_threads, keep, raw);
  run_interruptible([&](const std::atomic<bool>* cancel) {
    p.cancel = cancel;
    sparse_attn::cpu::forward(p);
  });
}

// The gradient of the forward call described by the same three dicts (with the forward's lse
// in arrays["lse"]); `grads` holds the operands "out" and "grad_out" and the C-contiguous
// result arrays "dq", "dk", "dv", "dbias" and, for the additive score, "d_q_proj", "d_k_proj"
// and "d_additive_w" (absent or None: not wanted).
void backward(const py::dict& config, const py::dict& operands, const py::dict& arrays,
              const std::vector<LayoutPtr>& layouts, int num_threads, const py::dict& grads) {
  std::vector<py::object> keep;
  std::vector<const Layout*> raw;
  sparse_attn::BackwardParams bp;
  AttentionParams& p = bp.forward;
  p = attention_params(config, operands, arrays, layouts, num_threads, keep, raw);
  const py::dtype dtype(config["dtype"].cast<std::string>());
  bp.out = to_operand(grads["out"], dtype, keep);
  bp.grad_out = to_operand(grads["grad_out"], dtype, keep);
  const int64_t rows_q = p.batch * p.heads_q * p.len_q, rows_k = p.batch * p.heads_kv * p.len_k;
  bp.dq = buffer<void*>(grads, "dq", dtype, rows_q * p.dim_qk, keep);
  bp.dk = buffer<void*>(grads, "dk", dtype, rows_k * p.dim_qk, keep);
  bp.dv = buffer<void*>(grads, "dv", dtype, rows_k * p.dim_v, keep);
  bp.dbias = buffer<void*>(grads, "dbias", dtype, rows_q * p.len_k, keep);
  bp.d_q_proj = buffer<void*>(grads, "d_q_proj", dtype, rows_q * p.additive_dim, keep);
  bp.d_k_proj = buffer<void*>(grads, "d_k_proj", dtype, rows_k * p.additive_dim, keep);
  bp.d_additive_w = buffer<void*>(grads, "d_additive_w", dtype, p.additive_dim, keep);
  run_interruptible([&](const std::atomic<bool>* cancel) {
    p.cancel = cancel;
    sparse_attn::cpu::backward(bp);
  });
}

py::dict build_info() {
  py::dict info;
  const auto level = sparse_attn::cpu::active_simd_level();
  info["simd"] = sparse_attn::cpu::simd_level_name(level);
  py::list levels;
  levels.append("generic");
  if (SPARSE_ATTN_HAVE_AVX2) levels.append("avx2");
  info["simd_compiled"] = levels;
  info["openmp"] = true;
  info["max_threads"] = omp_get_max_threads();
#if SPARSE_ATTN_WITH_CUDA
  info["cuda_compiled"] = true;
#else
  info["cuda_compiled"] = false;
#endif
  info["compiler"] = __VERSION__;
  info["tile_q"] = sparse_attn::cpu::kTileQ;
  info["tile_k"] = sparse_attn::cpu::kTileK;
  return info;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "sparse_attn compiled core (private: import sparse_attn instead)";
  sparse_attn::InterruptScope::remember_main_thread();
  // pybind11 maps std::invalid_argument to ValueError and std::bad_alloc to MemoryError.
  py::class_<Layout, LayoutPtr>(m, "Layout")
      .def_property_readonly("num_q_tiles", &Layout::num_q_tiles)
      .def_property_readonly("num_k_tiles", &Layout::num_k_tiles)
      .def_property_readonly("num_listed", &Layout::num_listed)
      .def("kinds", &dense_kinds)
      .def("count_allowed", &Layout::count_allowed, py::call_guard<py::gil_scoped_release>())
      .def("count_empty_rows", &Layout::count_empty_rows,
           py::call_guard<py::gil_scoped_release>());

  m.def("compile_layout", &compile_layout, py::arg("nodes"), py::arg("data"), py::arg("len_q"),
        py::arg("len_k"), py::arg("tile_q"), py::arg("tile_k"), py::arg("q0") = 0,
        py::arg("k0") = 0);
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("build_info", &build_info);
#if SPARSE_ATTN_WITH_CUDA
  sparse_attn::cuda::register_cuda_backend(m);
#endif
}
