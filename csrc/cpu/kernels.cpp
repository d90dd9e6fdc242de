// The CPU kernel table (csrc/kernels.h); the kernels are in route_kernels.cpp and permute_kernels.cpp.
#include "csrc/kernels.h"

namespace moeflux::cpu {

RouteForwardKernel route_forward;
RouteBackwardKernel route_backward;
BuildRowMapKernel build_row_map;
ScatterRowsKernel scatter_rows;
GatherRowsKernel gather_rows;

const DeviceKernels kernels{route_forward, route_backward, build_row_map, scatter_rows, gather_rows};

}  // namespace moeflux::cpu
