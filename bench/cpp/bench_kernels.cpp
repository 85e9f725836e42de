// Microbenchmarks of the CPU path: each micro-kernel on one 64 x 64 tile at D = 64 (the active
// table and the portable one), one whole tile step (full and partial), the layout compiler at
// L = 2^20, and whole forward calls. FLOPs are counted on allowed pairs only: 4 * D per pair
// (Q·Kᵀ and P·V). No attention logic lives here; everything goes through the C++ headers.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/layout.h"
#include "core/params.h"
#include "cpu/forward.h"
#include "cpu/microkernels.h"

namespace {

namespace sa = sparse_attn;
namespace cpu = sparse_attn::cpu;
using cpu::kTileK;
using cpu::kTileQ;

constexpr int kDim = 64;                                  // head dimension of the tile benchmarks
constexpr double kTileFlops = 2.0 * kTileQ * kTileK * kDim;  // one GEMM-like tile product
constexpr int64_t kCompileLength = int64_t{1} << 20;      // layout compiler target size
constexpr int64_t kForwardLength = 4096, kForwardHeads = 8;

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> out(n);
  for (float& x : out) x = normal(rng);
  return out;
}

// The micro-kernel tables to compare: the one dispatch picked, and the portable one when the
// active one is not already it.
struct Level {
  std::string name;
  const cpu::MicroKernels<float>* table;
};

std::vector<Level> tile_levels() {
  const cpu::SimdLevel active = cpu::active_simd_level();
  std::vector<Level> levels{{cpu::simd_level_name(active), &cpu::microkernels_f32()}};
  if (active != cpu::SimdLevel::Generic) levels.push_back({"generic", &cpu::generic::table_f32()});
  return levels;
}

// One query tile, one key/value tile and the online-softmax state, all at D = 64, in the
// kernels' query-lane order (q_packed[d][r], s[c][r], acc[e][r]); K and V are read in place.
struct Tile {
  std::vector<float> q = random_floats(size_t{kTileQ} * kDim, 1);
  std::vector<float> k = random_floats(size_t{kTileK} * kDim, 2);
  std::vector<float> v = random_floats(size_t{kTileK} * kDim, 3);
  std::vector<float> q_packed = std::vector<float>(size_t{kDim} * kTileQ);
  std::vector<float> scores = std::vector<float>(size_t{kTileK} * kTileQ);
  std::vector<float> acc = std::vector<float>(size_t{kDim} * kTileQ, 0.0f);
  std::vector<float> row_max = std::vector<float>(kTileQ, -std::numeric_limits<float>::infinity());
  std::vector<float> row_sum = std::vector<float>(kTileQ, 0.0f);
  // Below 1 so accumulate_pv always rescales (the pessimistic case) and acc stays bounded.
  std::vector<float> corr = std::vector<float>(kTileQ, 0.999f);
  std::vector<uint64_t> row_bits = std::vector<uint64_t>(kTileQ);  // a causal diagonal tile
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  std::vector<float> row_scale = std::vector<float>(kTileQ, scale);  // the dot score's 1/sqrt(D)

  explicit Tile(const cpu::MicroKernels<float>& mk) {
    for (int r = 0; r < kTileQ; ++r) row_bits[r] = sa::bit_range(0, r + 1);
    mk.pack_q(q.data(), kDim, kTileQ, kDim, row_scale.data(), q_packed.data());
    mk.score_tile(k.data(), kDim, kTileK, kDim, q_packed.data(), scores.data());
  }

  // What the forward loop does per (query tile, key tile); pack_q runs once per query tile.
  void step(const cpu::MicroKernels<float>& mk, bool partial) {
    mk.score_tile(k.data(), kDim, kTileK, kDim, q_packed.data(), scores.data());
    if (partial) mk.mask_tile(scores.data(), kTileK, row_bits.data());
    mk.softmax_update(scores.data(), kTileK, row_max.data(), row_sum.data(), corr.data());
    mk.accumulate_pv(scores.data(), kTileK, v.data(), kDim, kDim, corr.data(), acc.data());
  }
};

void set_tile_counters(benchmark::State& state, double flops_per_iteration) {
  const auto iterations = static_cast<double>(state.iterations());
  if (flops_per_iteration > 0) {
    state.counters["FLOP/s"] =
        benchmark::Counter(flops_per_iteration * iterations, benchmark::Counter::kIsRate);
  }
  state.SetItemsProcessed(state.iterations() * kTileQ * kTileK);  // score entries
}

template <typename Body>
void register_tile(const std::string& name, const cpu::MicroKernels<float>* mk, double flops,
                   Body body) {
  benchmark::RegisterBenchmark(name.c_str(), [mk, flops, body](benchmark::State& st) {
    Tile tile(*mk);
    for (auto _ : st) {
      body(*mk, tile);
      benchmark::ClobberMemory();
    }
    set_tile_counters(st, flops);
  });
}

void register_tile_benchmarks() {
  using MK = cpu::MicroKernels<float>;
  for (const Level& level : tile_levels()) {
    const std::string suffix = "/" + level.name;
    register_tile("BM_PackQ" + suffix, level.table, 0, [](const MK& mk, Tile& t) {
      mk.pack_q(t.q.data(), kDim, kTileQ, kDim, t.row_scale.data(), t.q_packed.data());
      benchmark::DoNotOptimize(t.q_packed.data());
    });
    register_tile("BM_ScoreTile" + suffix, level.table, kTileFlops, [](const MK& mk, Tile& t) {
      mk.score_tile(t.k.data(), kDim, kTileK, kDim, t.q_packed.data(), t.scores.data());
      benchmark::DoNotOptimize(t.scores.data());
    });
    register_tile("BM_MaskTile" + suffix, level.table, 0, [](const MK& mk, Tile& t) {
      mk.mask_tile(t.scores.data(), kTileK, t.row_bits.data());
      benchmark::DoNotOptimize(t.scores.data());
    });
    // Runs on its own output after the first call: the exp work per entry is the same.
    register_tile("BM_SoftmaxUpdate" + suffix, level.table, 0, [](const MK& mk, Tile& t) {
      mk.softmax_update(t.scores.data(), kTileK, t.row_max.data(), t.row_sum.data(),
                        t.corr.data());
      benchmark::DoNotOptimize(t.scores.data());
    });
    register_tile("BM_AccumulatePV" + suffix, level.table, kTileFlops, [](const MK& mk, Tile& t) {
      mk.accumulate_pv(t.scores.data(), kTileK, t.v.data(), kDim, kDim, t.corr.data(),
                       t.acc.data());
      benchmark::DoNotOptimize(t.acc.data());
    });
    register_tile("BM_TileStep/full" + suffix, level.table, 2 * kTileFlops,
                  [](const MK& mk, Tile& t) {
      t.step(mk, false);
      benchmark::DoNotOptimize(t.acc.data());
    });
    register_tile("BM_TileStep/partial" + suffix, level.table, 2 * kTileFlops,
                  [](const MK& mk, Tile& t) {
      t.step(mk, true);
      benchmark::DoNotOptimize(t.acc.data());
    });
  }
}

// ---- layout compiler ---------------------------------------------------------------------------

sa::PatternNode leaf(sa::Op op, int64_t a = 0, int64_t b = 0, int64_t c = 0,
                     const void* data = nullptr, int64_t data_len = 0) {
  return sa::PatternNode{op, a, b, c, 0, data, data_len};
}

// BigBird at block level, as bench.py builds it before a BigBird preset exists: 3 window blocks
// (the diagonal and its neighbours), 2 global blocks (rows and columns), 3 seeded random blocks
// per non-global row among the blocks not yet set. Needs blocks > 3 + 2 + 3.
const std::vector<uint8_t>& bigbird_blocks(int64_t blocks) {
  static std::vector<uint8_t> bits;
  if (!bits.empty()) return bits;
  constexpr int kWindow = 1, kGlobal = 2, kRandom = 3;
  bits.assign(static_cast<size_t>(blocks * blocks), 0);
  std::mt19937_64 rng(0);
  std::uniform_int_distribution<int64_t> pick(0, blocks - 1);
  for (int64_t r = 0; r < blocks; ++r) {
    uint8_t* row = bits.data() + r * blocks;
    const int64_t first = std::max<int64_t>(0, r - kWindow);
    const int64_t last = std::min(blocks - 1, r + kWindow);
    for (int64_t c = first; c <= last; ++c) row[c] = 1;
    for (int64_t g = 0; g < kGlobal; ++g) row[g] = 1;
    if (r < kGlobal) {  // a global row attends everywhere: no random blocks to add
      std::fill(row, row + blocks, uint8_t{1});
      continue;
    }
    for (int chosen = 0; chosen < kRandom;) {
      const int64_t c = pick(rng);
      if (!row[c]) row[c] = 1, ++chosen;
    }
  }
  return bits;
}

void bench_compile(benchmark::State& state, const std::vector<sa::PatternNode>& nodes) {
  const sa::LayoutSpec spec{kCompileLength, kCompileLength, kTileQ, kTileK, 0, 0};
  int64_t listed = 0;
  for (auto _ : state) {
    auto layout = sa::compile_layout(nodes, spec);
    listed = layout->num_listed();
    benchmark::DoNotOptimize(layout.get());
  }
  state.counters["listed_tiles"] = static_cast<double>(listed);
  state.SetItemsProcessed(state.iterations() * listed);  // listed tiles per second
}

void register_compile_benchmarks() {
  const std::string size = "/L:" + std::to_string(kCompileLength);
  benchmark::RegisterBenchmark(("BM_CompileLayout/window256" + size).c_str(),
                               [](benchmark::State& st) {
    bench_compile(st, {leaf(sa::Op::Window, 256, 256)});
  })->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark(("BM_CompileLayout/longformer256+16" + size).c_str(),
                               [](benchmark::State& st) {
    std::vector<int64_t> tokens(16);
    for (int64_t t = 0; t < 16; ++t) tokens[t] = t;
    bench_compile(st, {leaf(sa::Op::Window, 256, 256),
                       leaf(sa::Op::Global, 1, 1, 0, tokens.data(), 16), leaf(sa::Op::Union)});
  })->Unit(benchmark::kMillisecond)->UseRealTime();
  // The block layout is L/64 x L/64 bytes (256 MiB); the compiler copies and scans it.
  benchmark::RegisterBenchmark(("BM_CompileLayout/bigbird_blocksparse" + size).c_str(),
                               [](benchmark::State& st) {
    const int64_t blocks = kCompileLength / 64;
    const std::vector<uint8_t>& bits = bigbird_blocks(blocks);
    bench_compile(st, {leaf(sa::Op::Block, 64, blocks, blocks, bits.data(), blocks * blocks)});
  })->Unit(benchmark::kMillisecond)->UseRealTime();
}

// ---- whole forward calls -----------------------------------------------------------------------

// Contiguous (batch = 1, heads, len, dim) float32 q, k, v and out, one layout for every head.
struct ForwardProblem {
  std::vector<float> q, k, v, out;
  int64_t batch_offset[1] = {0};
  std::shared_ptr<const sa::Layout> layout;
  std::vector<const sa::Layout*> layouts;
  sa::AttentionParams params;

  ForwardProblem(const std::vector<sa::PatternNode>& nodes, int64_t len, int64_t heads, int threads)
      : q(random_floats(static_cast<size_t>(heads * len * kDim), 11)),
        k(random_floats(static_cast<size_t>(heads * len * kDim), 12)),
        v(random_floats(static_cast<size_t>(heads * len * kDim), 13)),
        out(static_cast<size_t>(heads * len * kDim)),
        layout(sa::compile_layout(nodes, sa::LayoutSpec{len, len, kTileQ, kTileK, 0, 0})),
        layouts(static_cast<size_t>(heads), layout.get()) {
    sa::AttentionParams& p = params;
    p.dtype = sa::DType::Float32;
    p.batch = 1, p.heads_q = heads, p.heads_kv = heads;
    p.len_q = len, p.len_k = len, p.dim_qk = kDim, p.dim_v = kDim;
    const auto operand = [&](const std::vector<float>& data) {
      sa::Operand op;
      op.data = data.data();
      op.batch_offset = batch_offset;
      op.stride_head = len * kDim, op.stride_row = kDim, op.stride_col = 1;
      return op;
    };
    p.q = operand(q), p.k = operand(k), p.v = operand(v);
    p.scale = 1.0 / std::sqrt(static_cast<double>(kDim));
    p.out = out.data();
    p.layouts = layouts.data();
    p.num_threads = threads;
  }

  double allowed_pairs() const {
    return static_cast<double>(layout->count_allowed()) * static_cast<double>(params.heads_q);
  }
};

void register_forward_benchmarks() {
  struct Case {
    const char* name;
    std::vector<sa::PatternNode> nodes;
  };
  const std::vector<Case> cases{{"dense", {leaf(sa::Op::Dense)}},
                                {"causal", {leaf(sa::Op::Causal, 0)}},
                                {"window256", {leaf(sa::Op::Window, 256, 256)}}};
  const int threads = omp_get_num_procs();
  for (const Case& c : cases) {
    const std::string name = std::string("BM_Forward/") + c.name + "/L:" +
                             std::to_string(kForwardLength) + "/H:" +
                             std::to_string(kForwardHeads) + "/D:" + std::to_string(kDim) +
                             "/threads:" + std::to_string(threads);
    const std::vector<sa::PatternNode> nodes = c.nodes;
    benchmark::RegisterBenchmark(name.c_str(), [nodes, threads](benchmark::State& st) {
      ForwardProblem problem(nodes, kForwardLength, kForwardHeads, threads);
      for (auto _ : st) {
        cpu::forward(problem.params);
        benchmark::DoNotOptimize(problem.out.data());
        benchmark::ClobberMemory();
      }
      const double pairs = problem.allowed_pairs();
      const auto iterations = static_cast<double>(st.iterations());
      st.counters["FLOP/s"] =
          benchmark::Counter(4.0 * kDim * pairs * iterations, benchmark::Counter::kIsRate);
      st.counters["density"] = pairs / (static_cast<double>(kForwardHeads) * kForwardLength *
                                        kForwardLength);
      st.SetItemsProcessed(st.iterations() * static_cast<int64_t>(pairs));  // allowed pairs
    })->Unit(benchmark::kMillisecond)->UseRealTime();
  }
}

// Google Benchmark 1.8 reads --benchmark_min_time=0.05s; 1.7 (Debian 12) wants a plain number
// of seconds, which 1.8 still accepts. Dropping the suffix lets one command serve both.
void accept_seconds_suffix(int argc, char** argv) {
  const std::string flag = "--benchmark_min_time=";
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind(flag, 0) == 0 && arg.size() > flag.size() && arg.back() == 's') {
      argv[i][arg.size() - 1] = '\0';
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  accept_seconds_suffix(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("sparse_attn_simd", cpu::simd_level_name(cpu::active_simd_level()));
  benchmark::AddCustomContext("omp_num_procs", std::to_string(omp_get_num_procs()));
  register_tile_benchmarks();
  register_compile_benchmarks();
  register_forward_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
