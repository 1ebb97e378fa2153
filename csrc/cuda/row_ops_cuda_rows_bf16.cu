// The rows layout's CUDA kernels for at::BFloat16 (csrc/cuda/row_kernels.cuh): one
// translation unit per dtype and layout, so that the build compiles them in parallel.
#include "row_kernels.cuh"

namespace ater_ext {
namespace cuda_impl {
ATER_EXT_CUDA_INSTANTIATE(at::BFloat16, false)
ATER_EXT_CUDA_SPHERE_STEP(, at::BFloat16)
}  // namespace cuda_impl
}  // namespace ater_ext
