// The portable backward micro-kernels: compiled with the baseline flags of the target.
#define SA_SIMD_NAMESPACE generic
#include "backward_microkernels_impl.h"

namespace sparse_attn::cpu::generic {

const BackwardMicroKernels<float>& backward_table_f32() {
  static const BackwardMicroKernels<float> table = portable::make_backward_table<float>();
  return table;
}

const BackwardMicroKernels<double>& backward_table_f64() {
  static const BackwardMicroKernels<double> table = portable::make_backward_table<double>();
  return table;
}

}  // namespace sparse_attn::cpu::generic
