// Which CUDA kernel structure the ops launch (csrc/cuda/row_ops_cuda.cu):
//   kRows      one row group (a warp, or a block) per row, vectorised only when
//              every pointer is 16-byte aligned and D is a multiple of the
//              vector width: the default;
//   kAdaptive  per-row aligned head / vector body / scalar tail, several rows
//              per warp for tiny rows, rows split over several blocks when the
//              batch is small against the SM count.
// Set from Python with ater_ext.ops.set_cuda_layout("rows" | "adaptive") or the
// ATER_EXT_CUDA_LAYOUT environment variable (read at import). The CPU kernels
// ignore it. Read on the host at every launch, so a CUDA graph keeps the layout
// it was captured with.
#pragma once

namespace ater_ext {

enum class CudaLayout : int { kRows = 0, kAdaptive = 1 };

CudaLayout cuda_layout();
void set_cuda_layout(CudaLayout layout);

}  // namespace ater_ext
