// The SIMT emulation layer: runs the CUDA kernels of csrc/cuda on the CPU when their source is
// compiled by the host C++ compiler (the test module sparse_attn._cuda_emu). It must never be
// included by nvcc, and nothing outside tests may depend on it. Include it through compat.h.
//
// Model: the blocks of a grid run one after another on the calling OS thread; the threads of a
// block run as cooperative fibers that switch only at __syncthreads, __syncwarp, warp shuffles
// and votes. The scheduler resumes runnable fibers in a selectable order (forward, reverse, or
// shuffled anew on every pass), so a missing barrier shows up as a wrong answer in some order.
// Dynamic shared memory is filled with NaN at the start of every block. When no fiber can run
// and some have not finished, the launch fails with a deadlock report instead of hanging.
// Context switches: a hand-written x86-64 switch (callee-saved registers, MXCSR and the x87
// control word) by default; ucontext (POSIX, any architecture) as the portable fallback.
//
// Limits (what this layer does not check or model):
// - No preemption and no memory model: writes are visible at once, so spin-waits never end
//   (undetected: they hang), missing __threadfence / volatile go unnoticed, and a race between
//   two barriers shows only if some thread order changes the result.
// - Barriers are stricter than hardware: __syncthreads must be reached by every thread of the
//   block (a thread that exits while others wait is an error); barriers are not told apart by
//   call site. Warp operations need the full mask of the warp's existing lanes and width 32.
// - Blocks never run concurrently: kernels that communicate between blocks are not tested.
//   Launches are synchronous and ignore streams. POSIX only (mmap, ucontext).
// - Static __shared__ variables become `static thread_local`: shared by all blocks of a launch
//   and not poisoned (gcc drops section attributes in templates). Use dynamic shared memory.
// - Intrinsics compute at host precision (__expf is expf): GPU-only numerics are only checked
//   on a GPU. No tensor cores, cp.async, TMA, clusters, cooperative groups or textures: kernels
//   keep such paths behind an interface with a plain-loop twin.
// - A fiber's stack is 256 KiB with a guard page below it. AddressSanitizer does not follow the
//   assembly switch: under ASan the default switcher is ucontext (ASan intercepts swapcontext,
//   with known false positives on fiber stacks).
#pragma once

#if defined(__CUDACC__)
#error "simt_emu.h is for the host compiler only; nvcc builds the real kernels"
#endif

#include <sys/mman.h>
#include <unistd.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <vector_types.h>  // dim3, uint3 (CUDA's own host definitions)

namespace sa_emu {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytes = 227 * 1024;  // the largest opt-in dynamic size (sm_90)
constexpr size_t kStackBytes = 256 * 1024;

enum class Order { Forward, Reverse, Shuffled };
enum class Switcher { Assembly, Ucontext };

struct Schedule {
  Order order = Order::Forward;
  uint64_t seed = 0;  // for Order::Shuffled
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  Switcher switcher = Switcher::Assembly;
#else
  Switcher switcher = Switcher::Ucontext;
#endif
};

// A kernel broke a rule of the execution model (deadlock, divergent barrier, partial mask...).
class EmulationError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The schedule used by the next launches of this process (tests switch it between runs).
inline std::mutex& schedule_mutex() {
  static std::mutex m;
  return m;
}
inline Schedule& schedule_storage() {
  static Schedule s;
  return s;
}
inline void set_schedule(const Schedule& s) {
  std::lock_guard<std::mutex> lock(schedule_mutex());
  schedule_storage() = s;
}
inline Schedule get_schedule() {
  std::lock_guard<std::mutex> lock(schedule_mutex());
  return schedule_storage();
}

// Counters of the last launch on this OS thread, for tests of the layer itself.
struct Stats {
  uint64_t blocks = 0, switches = 0, barriers = 0, warp_syncs = 0;
};

namespace detail {

// ---- context switching ---------------------------------------------------------------------

#if defined(__x86_64__)
// Saves the callee-saved registers and FP control state on the current stack, stores the stack
// pointer in *save_sp, and resumes the context whose stack pointer is load_sp.
__attribute__((naked, noinline)) inline void switch_stacks(void** /*save_sp*/, void* /*load_sp*/) {
  asm("pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}
#endif

struct Context {
  void* sp = nullptr;  // assembly switcher
  ucontext_t uc;       // ucontext switcher
};

enum class FiberState : uint8_t { Runnable, AtBarrier, AtWarpSync, Done };

struct Fiber {
  Context ctx;
  FiberState state = FiberState::Runnable;
  uint3 thread_idx{0, 0, 0};
  unsigned linear = 0;  // x + y * bx + z * bx * by
  char* stack = nullptr;
};

struct Warp {
  unsigned members = 0;       // lanes that exist (the last warp of a block may be short)
  unsigned member_mask = 0;   // bit per existing lane
  unsigned arrived = 0;       // lanes waiting in the current round
  uint64_t round = 0;
  uint64_t slots[2][kWarpSize] = {};  // double-buffered exchange, indexed by round parity
};

struct Block {
  dim3 grid_dim, block_dim;
  uint3 block_idx{0, 0, 0};
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned at_barrier = 0, done = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  Fiber* current = nullptr;
  Context scheduler;
  Switcher switcher = Switcher::Ucontext;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  Stats stats;
};

inline Block*& current_block() {
  static thread_local Block* block = nullptr;
  return block;
}
inline Stats& last_stats() {
  static thread_local Stats stats;
  return stats;
}

inline Block& block() {
  Block* b = current_block();
  if (b == nullptr) throw EmulationError("a device function ran outside an emulated launch");
  return *b;
}
inline Fiber& fiber() { return *block().current; }

inline void resume(Block& b, Fiber& f) {
  b.current = &f;
  ++b.stats.switches;
#if defined(__x86_64__)
  if (b.switcher == Switcher::Assembly) {
    switch_stacks(&b.scheduler.sp, f.ctx.sp);
    return;
  }
#endif
  swapcontext(&b.scheduler.uc, &f.ctx.uc);
}

inline void yield_to_scheduler() {
  Block& b = block();
  Fiber& f = *b.current;
#if defined(__x86_64__)
  if (b.switcher == Switcher::Assembly) {
    switch_stacks(&f.ctx.sp, b.scheduler.sp);
    return;
  }
#endif
  swapcontext(&f.ctx.uc, &b.scheduler.uc);
}

inline void fiber_main() {
  Block& b = *current_block();
  Fiber& f = *b.current;
  try {
    (*b.body)();
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  f.state = FiberState::Done;
  ++b.done;
  yield_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

inline void ucontext_entry() { fiber_main(); }

inline void prepare_fiber(Block& b, Fiber& f) {
  f.state = FiberState::Runnable;
#if defined(__x86_64__)
  if (b.switcher == Switcher::Assembly) {
    auto top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t{15};
    auto* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;  // keeps the entry's stack aligned as after a call
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);  // where the first switch "returns" to
    for (int reg = 0; reg < 6; ++reg) *--sp = 0;     // rbp rbx r12 r13 r14 r15
    uint32_t mxcsr = 0;
    uint16_t fpucw = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    *--sp = uint64_t{mxcsr} | (uint64_t{fpucw} << 32);
    f.ctx.sp = sp;
    return;
  }
#endif
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = f.stack;
  f.ctx.uc.uc_stack.ss_size = kStackBytes;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, &ucontext_entry, 0);
}

// Stacks for every thread of a block, each with a PROT_NONE guard page below it.
class Stacks {
 public:
  explicit Stacks(unsigned count) {
    guard_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    stride_ = kStackBytes + guard_;
    bytes_ = stride_ * count;
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<char*>(p);
    for (unsigned t = 0; t < count; ++t) mprotect(base_ + t * stride_, guard_, PROT_NONE);
  }
  ~Stacks() { munmap(base_, bytes_); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  char* stack(unsigned t) const { return base_ + t * stride_ + guard_; }

 private:
  char* base_ = nullptr;
  size_t guard_ = 0, stride_ = 0, bytes_ = 0;
};

inline std::string describe(const Block& b) {
  unsigned runnable = 0, barrier = 0, warp = 0, done = 0;
  for (const Fiber& f : b.fibers) {
    switch (f.state) {
      case FiberState::Runnable: ++runnable; break;
      case FiberState::AtBarrier: ++barrier; break;
      case FiberState::AtWarpSync: ++warp; break;
      case FiberState::Done: ++done; break;
    }
  }
  return "block (" + std::to_string(b.block_idx.x) + ", " + std::to_string(b.block_idx.y) + ", " +
         std::to_string(b.block_idx.z) + "): " + std::to_string(barrier) +
         " threads at __syncthreads, " + std::to_string(warp) + " at a warp operation, " +
         std::to_string(done) + " finished, " + std::to_string(runnable) + " runnable";
}

inline void run_block(Block& b, const Schedule& schedule, std::mt19937_64& rng) {
  std::fill(reinterpret_cast<float*>(b.smem), reinterpret_cast<float*>(b.smem) + b.smem_bytes / 4,
            std::numeric_limits<float>::quiet_NaN());
  for (Fiber& f : b.fibers) prepare_fiber(b, f);
  for (Warp& w : b.warps) {
    w.arrived = 0;
    w.round = 0;
  }
  b.at_barrier = b.done = 0;
  b.error = nullptr;
  const unsigned n = static_cast<unsigned>(b.fibers.size());
  std::vector<unsigned> order(n);
  for (unsigned t = 0; t < n; ++t) order[t] = schedule.order == Order::Reverse ? n - 1 - t : t;
  while (b.done < n) {
    if (schedule.order == Order::Shuffled) std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (unsigned t : order) {
      Fiber& f = b.fibers[t];
      if (f.state != FiberState::Runnable) continue;
      resume(b, f);
      ran = true;
      if (b.error) std::rethrow_exception(b.error);
    }
    if (b.done > 0 && b.at_barrier > 0) {
      throw EmulationError("__syncthreads not reached by the whole block: " + describe(b));
    }
    if (!ran && b.done < n) throw EmulationError("deadlock: " + describe(b));
  }
}

}  // namespace detail

// Runs body once per thread of every block of the grid (see the header comment).
inline void run_grid(dim3 grid, dim3 block_dim, size_t smem_bytes,
                     const std::function<void()>& body) {
  const uint64_t threads = uint64_t{block_dim.x} * block_dim.y * block_dim.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock) {
    throw EmulationError("invalid block size: " + std::to_string(threads) + " threads");
  }
  if (smem_bytes > kMaxSharedBytes) {
    throw EmulationError("dynamic shared memory of " + std::to_string(smem_bytes) +
                         " bytes exceeds the device limit");
  }
  const Schedule schedule = get_schedule();
  detail::Block b;
  b.grid_dim = grid;
  b.block_dim = block_dim;
  b.switcher = schedule.switcher;
  b.body = &body;
  const unsigned n = static_cast<unsigned>(threads);
  detail::Stacks stacks(n);
  b.fibers.resize(n);
  for (unsigned t = 0; t < n; ++t) {
    detail::Fiber& f = b.fibers[t];
    f.linear = t;
    f.thread_idx = {t % block_dim.x, (t / block_dim.x) % block_dim.y,
                    t / (block_dim.x * block_dim.y)};
    f.stack = stacks.stack(t);
  }
  b.warps.resize((n + kWarpSize - 1) / kWarpSize);
  for (unsigned w = 0; w < b.warps.size(); ++w) {
    b.warps[w].members = std::min(kWarpSize, n - w * kWarpSize);
    b.warps[w].member_mask =
        b.warps[w].members == kWarpSize ? ~0u : ((1u << b.warps[w].members) - 1);
  }
  std::vector<float> smem((smem_bytes + sizeof(float) - 1) / sizeof(float) + 4);
  b.smem = reinterpret_cast<unsigned char*>(smem.data());
  b.smem_bytes = smem_bytes;
  std::mt19937_64 rng(schedule.seed);

  detail::Block*& slot = detail::current_block();
  if (slot != nullptr) throw EmulationError("nested emulated launch");
  slot = &b;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          b.block_idx = {x, y, z};
          ++b.stats.blocks;
          detail::run_block(b, schedule, rng);
        }
      }
    }
  } catch (...) {
    slot = nullptr;
    detail::last_stats() = b.stats;
    throw;
  }
  slot = nullptr;
  detail::last_stats() = b.stats;
}

inline Stats last_launch_stats() { return detail::last_stats(); }

// The launch helper's host twin of kernel<<<grid, block, smem>>>(args...).
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block_dim, size_t smem_bytes, Kernel kernel, Args... args) {
  const std::function<void()> body = [&] { kernel(args...); };
  run_grid(grid, block_dim, smem_bytes, body);
}

// ---- what kernels call -------------------------------------------------------------------

inline const uint3& thread_idx() { return detail::fiber().thread_idx; }
inline const uint3& block_idx() { return detail::block().block_idx; }
inline const dim3& block_dim() { return detail::block().block_dim; }
inline const dim3& grid_dim() { return detail::block().grid_dim; }

template <typename T>
T* dynamic_shared() {
  detail::Block& b = detail::block();
  if (sizeof(T) > b.smem_bytes) {
    throw EmulationError("the kernel uses " + std::to_string(sizeof(T)) +
                         " bytes of dynamic shared memory but was launched with " +
                         std::to_string(b.smem_bytes));
  }
  return reinterpret_cast<T*>(b.smem);
}

__attribute__((noinline)) inline void syncthreads() {
  detail::Block& b = detail::block();
  detail::Fiber& f = *b.current;
  if (b.done > 0) {
    throw EmulationError("__syncthreads after a thread of the block exited: " +
                         detail::describe(b));
  }
  ++b.stats.barriers;
  f.state = detail::FiberState::AtBarrier;
  if (++b.at_barrier == b.fibers.size()) {
    for (detail::Fiber& other : b.fibers) other.state = detail::FiberState::Runnable;
    b.at_barrier = 0;
  }
  detail::yield_to_scheduler();
}

namespace detail {

// One warp-synchronous round: every lane of the warp deposits 8 bytes and waits for the others;
// returns the slot row of this round, valid until the lane's next warp operation.
__attribute__((noinline)) inline const uint64_t* warp_exchange(unsigned mask, uint64_t value) {
  Block& b = block();
  Fiber& f = *b.current;
  Warp& w = b.warps[f.linear / kWarpSize];
  const unsigned lane = f.linear % kWarpSize;
  if (mask != w.member_mask) {
    throw EmulationError("warp operation with mask " + std::to_string(mask) +
                         ": only the full mask of the warp's lanes is emulated");
  }
  for (unsigned l = 0; l < w.members; ++l) {
    if (b.fibers[f.linear - lane + l].state == FiberState::Done) {
      throw EmulationError("warp operation after a lane of the warp exited: " + describe(b));
    }
  }
  ++b.stats.warp_syncs;
  const uint64_t* row = w.slots[w.round & 1];
  w.slots[w.round & 1][lane] = value;
  f.state = FiberState::AtWarpSync;
  if (++w.arrived == w.members) {
    for (unsigned l = 0; l < w.members; ++l) {
      b.fibers[f.linear - lane + l].state = FiberState::Runnable;
    }
    w.arrived = 0;
    ++w.round;
  }
  yield_to_scheduler();
  return row;
}

template <typename T>
uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

inline unsigned lane_id() { return fiber().linear % kWarpSize; }

inline void check_width(int width) {
  if (width != static_cast<int>(kWarpSize)) {
    throw EmulationError("warp shuffles with width != 32 are not emulated");
  }
}

}  // namespace detail

inline void syncwarp(unsigned mask) { detail::warp_exchange(mask, 0); }

template <typename T>
T shfl_sync(unsigned mask, T value, int src_lane, int width) {
  detail::check_width(width);
  const uint64_t* row = detail::warp_exchange(mask, detail::to_bits(value));
  return detail::from_bits<T>(row[static_cast<unsigned>(src_lane) % kWarpSize]);
}

template <typename T>
T shfl_xor_sync(unsigned mask, T value, int lane_mask, int width) {
  detail::check_width(width);
  const unsigned lane = detail::lane_id();
  const uint64_t* row = detail::warp_exchange(mask, detail::to_bits(value));
  return detail::from_bits<T>(row[(lane ^ static_cast<unsigned>(lane_mask)) % kWarpSize]);
}

template <typename T>
T shfl_down_sync(unsigned mask, T value, unsigned delta, int width) {
  detail::check_width(width);
  const unsigned lane = detail::lane_id();
  const uint64_t* row = detail::warp_exchange(mask, detail::to_bits(value));
  return detail::from_bits<T>(row[lane + delta < kWarpSize ? lane + delta : lane]);
}

template <typename T>
T shfl_up_sync(unsigned mask, T value, unsigned delta, int width) {
  detail::check_width(width);
  const unsigned lane = detail::lane_id();
  const uint64_t* row = detail::warp_exchange(mask, detail::to_bits(value));
  return detail::from_bits<T>(row[lane >= delta ? lane - delta : lane]);
}

inline unsigned ballot_sync(unsigned mask, int predicate) {
  const uint64_t* row = detail::warp_exchange(mask, predicate != 0);
  unsigned bits = 0;
  for (unsigned l = 0; l < kWarpSize; ++l) bits |= ((mask >> l) & 1) && row[l] ? 1u << l : 0u;
  return bits;
}

// Fibers are never preempted, so a read-modify-write is atomic as written.
template <typename T>
T atomic_add(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomic_max(T* address, T value) {
  const T old = *address;
  *address = old > value ? old : value;
  return old;
}
template <typename T>
T atomic_cas(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

}  // namespace sa_emu

// ---- the CUDA names, for kernel source compiled by the host compiler ------------------------
// (CUDA's host_defines.h, pulled in by vector_types.h, already maps __device__, __host__,
// __global__, __forceinline__ and __align__ for host compilers.)

#undef __shared__
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define threadIdx (::sa_emu::thread_idx())
#define blockIdx (::sa_emu::block_idx())
#define blockDim (::sa_emu::block_dim())
#define gridDim (::sa_emu::grid_dim())
constexpr int warpSize = 32;

inline void __syncthreads() { sa_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { sa_emu::syncwarp(mask); }
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return sa_emu::shfl_sync(mask, value, src_lane, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return sa_emu::shfl_xor_sync(mask, value, lane_mask, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return sa_emu::shfl_down_sync(mask, value, delta, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return sa_emu::shfl_up_sync(mask, value, delta, width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return sa_emu::ballot_sync(mask, predicate);
}
inline int __any_sync(unsigned mask, int predicate) {
  return sa_emu::ballot_sync(mask, predicate) != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
  return sa_emu::ballot_sync(mask, predicate) == mask;
}
template <typename T>
T atomicAdd(T* address, T value) {
  return sa_emu::atomic_add(address, value);
}
template <typename T>
T atomicMax(T* address, T value) {
  return sa_emu::atomic_max(address, value);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  return sa_emu::atomic_cas(address, compare, value);
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __fmul_rn(float x, float y) { return x * y; }  // never contracted into an fma
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
template <typename T>
T __ldg(const T* address) {
  return *address;
}
