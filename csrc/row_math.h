// Numerics shared by the CPU and CUDA kernels: when a row's sum of squares
// can be trusted, and how a scale-safe normalisation falls back.
//
// Fast path: one pass accumulates sumsq = sum v_i^2 in acc_t (fp32 for
// fp32/fp16/bf16, fp64 for fp64). If sumsq is finite and >= kFastPathMin, no
// partial sum overflowed and the squares that underflowed contribute at most
// D * min_normal / kFastPathMin relative error (< 2^-60 for any realistic D),
// so norm = sqrt(sumsq) is exact to rounding.
// Slow path (rows as tiny as 1e-30 or as large as 1e30 in fp32, zero rows,
// non-finite rows): m = max |v_i|, s = sum (v_i / m)^2, norm = m * sqrt(s),
// normalize(v) = (v / m) / sqrt(s). A zero row (m == 0) normalises to 0.
// NaN/Inf in a row propagate as a NaN direction; nothing is hidden. The norm of
// a row holding +-inf (and no NaN) is inf, of a row holding NaN NaN.
#pragma once

#include <c10/macros/Macros.h>

#include <limits>

namespace ater_ext {

// 2^(min_exponent / 2) of the accumulation type.
template <typename acc_t>
struct FastPathMin;
template <>
struct FastPathMin<float> {
  static constexpr float value = 0x1p-62f;
};
template <>
struct FastPathMin<double> {
  static constexpr double value = 0x1p-510;
};

// True when sumsq from the fast pass is usable (finite, not tiny). NaN -> false.
template <typename acc_t>
C10_HOST_DEVICE inline bool sumsq_is_safe(acc_t sumsq) {
  return sumsq >= FastPathMin<acc_t>::value &&
         sumsq <= std::numeric_limits<acc_t>::max();
}

}  // namespace ater_ext
