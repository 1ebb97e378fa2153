// The rows layout's CUDA kernels for float (csrc/cuda/row_kernels.cuh): one
// translation unit per dtype and layout, so that the build compiles them in parallel.
#include "row_kernels.cuh"

namespace ater_ext {
namespace cuda_impl {
ATER_EXT_CUDA_INSTANTIATE(float, false)
ATER_EXT_CUDA_SPHERE_STEP(, float)
}  // namespace cuda_impl
}  // namespace ater_ext
