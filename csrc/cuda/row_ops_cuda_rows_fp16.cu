// The rows layout's CUDA kernels for at::Half (csrc/cuda/row_kernels.cuh): one
// translation unit per dtype and layout, so that the build compiles them in parallel.
#include "row_kernels.cuh"

namespace ater_ext {
namespace cuda_impl {
ATER_EXT_CUDA_INSTANTIATE(at::Half, false)
ATER_EXT_CUDA_SPHERE_STEP(, at::Half)
}  // namespace cuda_impl
}  // namespace ater_ext
