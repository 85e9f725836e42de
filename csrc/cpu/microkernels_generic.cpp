// The portable micro-kernels: compiled with the baseline flags of the target (SSE2 on x86-64).
#define SA_SIMD_NAMESPACE generic
#include "microkernels_impl.h"

namespace sparse_attn::cpu::generic {

const MicroKernels<float>& table_f32() {
  static const MicroKernels<float> table = portable::make_table<float>();
  return table;
}

const MicroKernels<double>& table_f64() {
  static const MicroKernels<double> table = portable::make_table<double>();
  return table;
}

}  // namespace sparse_attn::cpu::generic
