// The emulated twin of forward_f16.cu: the same kernel source compiled by the host compiler
// against the SIMT emulation layer, for sparse_attn._cuda_emu (tests only).
#include "forward_kernel.h"
#include "forward_launch.h"

SA_INSTANTIATE_FORWARD(__half)
