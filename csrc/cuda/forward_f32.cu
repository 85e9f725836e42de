// The CUDA forward kernel for float inputs (float32 accumulation), both output widths.
#include "forward_kernel.h"
#include "forward_launch.h"

SA_INSTANTIATE_FORWARD(float)
