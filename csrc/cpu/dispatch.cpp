// Picks the micro-kernel table once per process: AVX2 + FMA when the CPU has them, the
// portable table otherwise, or the one SPARSE_ATTN_SIMD=generic|avx2 asks for (for tests).
#include <cstdlib>
#include <cstring>

#include "backward_microkernels.h"
#include "microkernels.h"

namespace sparse_attn::cpu {
namespace {

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

SimdLevel choose_level() {
  const bool has_avx2 = SPARSE_ATTN_HAVE_AVX2 && cpu_has_avx2_fma();
  const char* forced = std::getenv("SPARSE_ATTN_SIMD");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return SimdLevel::Generic;
  return has_avx2 ? SimdLevel::Avx2 : SimdLevel::Generic;
}

}  // namespace

SimdLevel active_simd_level() {
  static const SimdLevel level = choose_level();
  return level;
}

const char* simd_level_name(SimdLevel level) {
  return level == SimdLevel::Avx2 ? "avx2" : "generic";
}

const MicroKernels<float>& microkernels_f32() {
#if SPARSE_ATTN_HAVE_AVX2
  if (active_simd_level() == SimdLevel::Avx2) return avx2::table_f32();
#endif
  return generic::table_f32();
}

const MicroKernels<double>& microkernels_f64() {
#if SPARSE_ATTN_HAVE_AVX2
  if (active_simd_level() == SimdLevel::Avx2) return avx2::table_f64();
#endif
  return generic::table_f64();
}

const BackwardMicroKernels<float>& backward_microkernels_f32() {
#if SPARSE_ATTN_HAVE_AVX2
  if (active_simd_level() == SimdLevel::Avx2) return avx2::backward_table_f32();
#endif
  return generic::backward_table_f32();
}

const BackwardMicroKernels<double>& backward_microkernels_f64() {
#if SPARSE_ATTN_HAVE_AVX2
  if (active_simd_level() == SimdLevel::Avx2) return avx2::backward_table_f64();
#endif
  return generic::backward_table_f64();
}

}  // namespace sparse_attn::cpu
