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

namespace py = pybind11;
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
    const bool tokens = node.op == sparse_attn::Op::Global;
    if (!arr || arr.itemsize() != (tokens ? 8 : 1)) {
      throw std::invalid_argument("compile_layout: node data must be int64 tokens or uint8 bits");
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
// with strides in elements, computed by api.py from the array's own strides.
Operand to_operand(const py::object& spec, const py::dtype& dtype, std::vector<py::object>& keep) {
  Operand op;
  if (spec.is_none()) return op;
  auto t = spec.cast<py::tuple>();
  if (t.size() != 5) throw std::invalid_argument("operand must be a 5-tuple");
  auto arr = t[0].cast<py::array>();
  if (!arr.dtype().is(dtype)) throw std::invalid_argument("operand has the wrong dtype");
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

void forward(py::dict shape, py::object q, py::object k, py::object v, py::object mask,
             py::object bias, py::object key_lengths, double scale, py::array out, py::object lse,
             const std::vector<LayoutPtr>& layouts, int num_threads) {
  AttentionParams p;
  const py::dtype dtype = out.dtype();
  if (dtype.is(py::dtype::of<float>())) {
    p.dtype = sparse_attn::DType::Float32;
  } else if (dtype.is(py::dtype::of<double>())) {
    p.dtype = sparse_attn::DType::Float64;
  } else {
    throw std::invalid_argument("forward: out must be float32 or float64");
  }
  p.batch = shape["batch"].cast<int64_t>();
  p.heads_q = shape["heads_q"].cast<int64_t>();
  p.heads_kv = shape["heads_kv"].cast<int64_t>();
  p.len_q = shape["len_q"].cast<int64_t>();
  p.len_k = shape["len_k"].cast<int64_t>();
  p.dim_qk = shape["dim_qk"].cast<int64_t>();
  p.dim_v = shape["dim_v"].cast<int64_t>();
  std::vector<py::object> keep;
  p.q = to_operand(q, dtype, keep);
  p.k = to_operand(k, dtype, keep);
  p.v = to_operand(v, dtype, keep);
  p.mask = to_operand(mask, py::dtype::of<uint8_t>(), keep);
  p.bias = to_operand(bias, dtype, keep);
  if (p.q.stride_col != 1 || p.k.stride_col != 1 || p.v.stride_col != 1) {
    throw std::invalid_argument("forward: q, k, v need unit column stride");
  }
  Int64Array lengths;
  if (!key_lengths.is_none()) {
    lengths = key_lengths.cast<Int64Array>();
    if (lengths.size() != p.batch) throw std::invalid_argument("forward: key_lengths size");
    p.key_lengths = lengths.data();
  }
  if (!(out.flags() & py::array::c_style) || !out.writeable() ||
      out.size() != p.batch * p.heads_q * p.len_q * p.dim_v) {
    throw std::invalid_argument("forward: out must be a writeable C-contiguous result array");
  }
  p.out = out.mutable_data();
  py::array lse_arr;
  if (!lse.is_none()) {
    lse_arr = lse.cast<py::array>();
    if (!lse_arr.dtype().is(dtype) || !(lse_arr.flags() & py::array::c_style) ||
        lse_arr.size() != p.batch * p.heads_q * p.len_q) {
      throw std::invalid_argument("forward: lse must be a C-contiguous result array");
    }
    p.lse = lse_arr.mutable_data();
  }
  if (static_cast<int64_t>(layouts.size()) != p.heads_q) {
    throw std::invalid_argument("forward: one layout per query head is required");
  }
  std::vector<const Layout*> raw(layouts.size());
  for (size_t h = 0; h < layouts.size(); ++h) raw[h] = layouts[h].get();
  p.layouts = raw.data();
  p.scale = scale;
  p.num_threads = num_threads;
  py::gil_scoped_release release;
  sparse_attn::cpu::forward(p);
}

// The gradient of one forward call: `problem` holds the forward's arguments as passed to
// forward() (shape, q, k, v, mask, bias, key_lengths, scale, layouts, num_threads); `out` and
// `grad_out` are operands, lse and the gradients C-contiguous arrays of the forward's dtype.
void backward(py::tuple problem, py::object out, py::object grad_out, py::array lse,
              double dropout_p, uint64_t seed, py::array dq, py::array dk, py::array dv,
              py::object dbias) {
  if (problem.size() != 10) throw std::invalid_argument("backward: problem must be a 10-tuple");
  sparse_attn::BackwardParams bp;
  AttentionParams& p = bp.forward;
  const py::dtype dtype = dq.dtype();
  if (dtype.is(py::dtype::of<float>())) {
    p.dtype = sparse_attn::DType::Float32;
  } else if (dtype.is(py::dtype::of<double>())) {
    p.dtype = sparse_attn::DType::Float64;
  } else {
    throw std::invalid_argument("backward: dq must be float32 or float64");
  }
  auto shape = problem[0].cast<py::dict>();
  p.batch = shape["batch"].cast<int64_t>();
  p.heads_q = shape["heads_q"].cast<int64_t>();
  p.heads_kv = shape["heads_kv"].cast<int64_t>();
  p.len_q = shape["len_q"].cast<int64_t>();
  p.len_k = shape["len_k"].cast<int64_t>();
  p.dim_qk = shape["dim_qk"].cast<int64_t>();
  p.dim_v = shape["dim_v"].cast<int64_t>();
  std::vector<py::object> keep;
  p.q = to_operand(problem[1], dtype, keep);
  p.k = to_operand(problem[2], dtype, keep);
  p.v = to_operand(problem[3], dtype, keep);
  p.mask = to_operand(problem[4], py::dtype::of<uint8_t>(), keep);
  p.bias = to_operand(problem[5], dtype, keep);
  bp.out = to_operand(out, dtype, keep);
  bp.grad_out = to_operand(grad_out, dtype, keep);
  Int64Array lengths;
  if (!problem[6].is_none()) {
    lengths = problem[6].cast<Int64Array>();
    if (lengths.size() != p.batch) throw std::invalid_argument("backward: key_lengths size");
    p.key_lengths = lengths.data();
  }
  p.scale = problem[7].cast<double>();
  const auto layouts = problem[8].cast<std::vector<LayoutPtr>>();
  if (static_cast<int64_t>(layouts.size()) != p.heads_q) {
    throw std::invalid_argument("backward: one layout per query head is required");
  }
  std::vector<const Layout*> raw(layouts.size());
  for (size_t h = 0; h < layouts.size(); ++h) raw[h] = layouts[h].get();
  p.layouts = raw.data();
  p.num_threads = problem[9].cast<int>();
  auto contiguous = [&](const py::array& a, int64_t size, const char* what) {
    if (!a.dtype().is(dtype) || !(a.flags() & py::array::c_style) || a.size() != size) {
      throw std::invalid_argument(std::string("backward: ") + what +
                                  " must be a C-contiguous array of the right size and dtype");
    }
  };
  auto result = [&](py::array& a, int64_t size, const char* what) {
    contiguous(a, size, what);
    if (!a.writeable()) throw std::invalid_argument(std::string("backward: ") + what + " is read-only");
    return a.mutable_data();
  };
  const int64_t rows_q = p.batch * p.heads_q * p.len_q, rows_k = p.batch * p.heads_kv * p.len_k;
  contiguous(lse, rows_q, "lse");
  bp.lse = lse.data();
  bp.dq = result(dq, rows_q * p.dim_qk, "dq");
  bp.dk = result(dk, rows_k * p.dim_qk, "dk");
  bp.dv = result(dv, rows_k * p.dim_v, "dv");
  py::array dbias_arr;
  if (!dbias.is_none()) {
    dbias_arr = dbias.cast<py::array>();
    bp.dbias = result(dbias_arr, rows_q * p.len_k, "dbias");
  }
  bp.dropout_p = dropout_p;
  bp.seed = seed;
  py::gil_scoped_release release;
  sparse_attn::cpu::backward(bp);
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
  info["cuda_compiled"] = false;
  info["compiler"] = __VERSION__;
  info["tile_q"] = sparse_attn::cpu::kTileQ;
  info["tile_k"] = sparse_attn::cpu::kTileK;
  return info;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "sparse_attn compiled core (private: import sparse_attn instead)";
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
}
