// The CUDA kernel table (csrc/kernels.h); the kernels are in route_kernels.cu and permute_kernels.cu.
#include "csrc/kernels.h"

namespace moeflux::cuda {

RouteForwardKernel route_forward;
RouteBackwardKernel route_backward;
BuildRowMapKernel build_row_map;
ScatterRowsKernel scatter_rows;
GatherRowsKernel gather_rows;

const DeviceKernels kernels{route_forward, route_backward, build_row_map, scatter_rows, gather_rows};

}  // namespace moeflux::cuda
