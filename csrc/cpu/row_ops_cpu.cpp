// CPU kernels of the ater_ext ops (schema in csrc/ater_ext.cpp).
//
// Every op works row by row on [B, D] views: rows are spread over threads
// with at::parallel_for; within a row, at::vec loops first reduce (sum of
// squares, in acc_t) and then write, re-reading the row while it is still
// hot in L1/L2. Reduced types (fp16/bf16) are widened to fp32 chunk by chunk.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <memory>
#include <vector>

#include "checks.h"
#include "row_math.h"

namespace ater_ext {
namespace {

using at::vec::Vectorized;

#if defined(ATER_EXT_NATIVE_BF16)
// 32 floats -> bf16 with VCVTNE2PS2BF16: round to nearest even, as c10's
// conversion, in one instruction instead of a dozen. The instruction flushes
// denormals to zero, so chunks holding any fp32 denormal take the portable
// conversion (which keeps bf16 denormals); NaNs stay NaN either way.
inline void store_bf16_native(at::BFloat16* p, const Vectorized<float>& lo, const Vectorized<float>& hi) {
  constexpr int kDenormal = 0x20;  // vfpclassps category
  const __m512 a = lo, b = hi;
  if (_mm512_fpclass_ps_mask(a, kDenormal) | _mm512_fpclass_ps_mask(b, kDenormal)) {
    at::vec::convert_from_float<at::BFloat16>(lo, hi).store(p);
    return;
  }
  _mm512_storeu_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));  // b -> high half
}
#endif

// One SIMD chunk of a row, widened to the accumulation type:
// Vectorized<scalar_t>::size() elements held as kParts Vectorized<acc_t>.
template <typename scalar_t>
struct AccChunk {
  using acc_t = at::opmath_type<scalar_t>;
  using AVec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kParts = kReduced ? 2 : 1;
  static constexpr int64_t kSize = Vectorized<scalar_t>::size();

  AVec part[kParts];

  // the same chunk kept widened in an acc_t buffer (kSize values from p)
  static AccChunk load_acc(const acc_t* p) {
    AccChunk c;
    for (int k = 0; k < kParts; ++k) c.part[k] = AVec::loadu(p + k * AVec::size());
    return c;
  }

  void store_acc(acc_t* p) const {
    for (int k = 0; k < kParts; ++k) part[k].store(p + k * AVec::size());
  }

  static AccChunk load(const scalar_t* p) {
    AccChunk c;
    if constexpr (kReduced) {
      std::tie(c.part[0], c.part[1]) =
          at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    } else {
      c.part[0] = AVec::loadu(p);
    }
    return c;
  }

  void store(scalar_t* p) const {
#if defined(ATER_EXT_NATIVE_BF16)
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      store_bf16_native(p, part[0], part[1]);
      return;
    }
#endif
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(part[0], part[1]).store(p);
    } else {
      part[0].store(p);
    }
  }
};

// The row vector v whose norm and direction the ops need, read from memory.
template <typename scalar_t>
struct GradRow {  // v = g
  const scalar_t* g;
  using Chunk = AccChunk<scalar_t>;
  using acc_t = typename Chunk::acc_t;
  Chunk chunk(int64_t i) const { return Chunk::load(g + i); }
  acc_t at(int64_t i) const { return static_cast<acc_t>(g[i]); }
};

template <typename scalar_t>
struct DiffRow {  // v = g1 - g0, the difference taken in acc_t
  const scalar_t* g0;
  const scalar_t* g1;
  using Chunk = AccChunk<scalar_t>;
  using acc_t = typename Chunk::acc_t;
  Chunk chunk(int64_t i) const {
    Chunk a = Chunk::load(g1 + i);
    const Chunk b = Chunk::load(g0 + i);
    for (int p = 0; p < Chunk::kParts; ++p) a.part[p] = a.part[p] - b.part[p];
    return a;
  }
  acc_t at(int64_t i) const {
    return static_cast<acc_t>(g1[i]) - static_cast<acc_t>(g0[i]);
  }
};

// v already widened into a per-thread acc_t buffer by the reduction pass, so
// the write pass neither re-reads the inputs nor converts or subtracts again.
template <typename scalar_t>
struct StashedRow {
  using Chunk = AccChunk<scalar_t>;
  using acc_t = typename Chunk::acc_t;
  const acc_t* v;
  Chunk chunk(int64_t i) const { return Chunk::load_acc(v + i); }
  acc_t at(int64_t i) const { return v[i]; }
};

struct NoStash {
  template <typename T>
  void operator()(int64_t, const T&) const {}
};

template <typename acc_t>
struct StashTo {  // keeps each chunk (and tail value) of v in buf
  acc_t* buf;
  template <typename Chunk>
  void operator()(int64_t i, const Chunk& c) const {
    if constexpr (std::is_same_v<Chunk, acc_t>) {
      buf[i] = c;
    } else {
      c.store_acc(buf + i);
    }
  }
};

// How to normalise one row: u_i = (slow ? v_i / divisor : v_i) * multiplier.
template <typename acc_t>
struct RowScale {
  bool slow;
  acc_t divisor;     // max|v| on the slow path (1 otherwise)
  acc_t multiplier;  // 1 / sqrt(sum (v / divisor)^2), 0 for a zero row
  acc_t norm;        // ||v||
};

// fd_sphere_step's v = z + step * normalize(g1 - g0) - x, the displacement from
// the centre x of the point one ascent step moved z to; `diff` is the row's
// RowScale of g1 - g0 (from a reduction pass before this row is read).
template <typename scalar_t>
struct MovedRow {
  DiffRow<scalar_t> d;
  const scalar_t* z;
  const scalar_t* x;
  using Chunk = AccChunk<scalar_t>;
  using acc_t = typename Chunk::acc_t;
  RowScale<acc_t> diff;
  acc_t step;
  Chunk chunk(int64_t i) const {
    using AVec = typename Chunk::AVec;
    Chunk v = d.chunk(i);
    const Chunk zc = Chunk::load(z + i);
    const Chunk xc = Chunk::load(x + i);
    const AVec div(diff.divisor), coef(step * diff.multiplier);
    for (int p = 0; p < Chunk::kParts; ++p) {
      const AVec u = diff.slow ? v.part[p] / div : v.part[p];
      v.part[p] = (zc.part[p] + coef * u) - xc.part[p];
    }
    return v;
  }
  acc_t at(int64_t i) const {
    const acc_t v = d.at(i);
    const acc_t u = diff.slow ? v / diff.divisor : v;
    return (static_cast<acc_t>(z[i]) + step * diff.multiplier * u) - static_cast<acc_t>(x[i]);
  }
};

// Sum over the row of f(v chunk) with 4 independent accumulators (ILP), then
// the scalar tail; f maps an acc vector to its per-lane contribution. stash
// sees every chunk and tail value of v on the way.
template <typename Row, typename VecFn, typename ScalarFn, typename Stash = NoStash>
typename Row::acc_t reduce_row(const Row& row, int64_t D, VecFn vec_fn, ScalarFn scalar_fn,
                               const Stash& stash = Stash()) {
  using Chunk = typename Row::Chunk;
  using acc_t = typename Row::acc_t;
  using AVec = typename Chunk::AVec;
  constexpr int64_t kSize = Chunk::kSize;
  AVec acc[4] = {AVec(0), AVec(0), AVec(0), AVec(0)};
  int64_t i = 0;
  for (; i + 2 * kSize <= D; i += 2 * kSize) {
    const Chunk c0 = row.chunk(i);
    const Chunk c1 = row.chunk(i + kSize);
    stash(i, c0);
    stash(i + kSize, c1);
    for (int p = 0; p < Chunk::kParts; ++p) {
      acc[p] = acc[p] + vec_fn(c0.part[p]);
      acc[2 + p] = acc[2 + p] + vec_fn(c1.part[p]);
    }
  }
  for (; i + kSize <= D; i += kSize) {
    const Chunk c = row.chunk(i);
    stash(i, c);
    for (int p = 0; p < Chunk::kParts; ++p) acc[p] = acc[p] + vec_fn(c.part[p]);
  }
  acc_t total = at::vec::vec_reduce_all<acc_t>(
      [](AVec a, AVec b) { return a + b; }, (acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; i < D; ++i) {
    const acc_t v = row.at(i);
    stash(i, v);
    total += scalar_fn(v);
  }
  return total;
}

template <typename Row>
typename Row::acc_t max_abs_row(const Row& row, int64_t D) {
  using Chunk = typename Row::Chunk;
  using acc_t = typename Row::acc_t;
  using AVec = typename Chunk::AVec;
  AVec m(0);
  int64_t i = 0;
  for (; i + Chunk::kSize <= D; i += Chunk::kSize) {
    const Chunk c = row.chunk(i);
    // at::vec::maximum propagates NaN, so a NaN row yields a NaN direction.
    for (int p = 0; p < Chunk::kParts; ++p) m = at::vec::maximum(m, c.part[p].abs());
  }
  acc_t result = at::vec::vec_reduce_all<acc_t>(
      [](AVec a, AVec b) { return at::vec::maximum(a, b); }, m);
  for (; i < D; ++i) {
    const acc_t a = std::abs(row.at(i));
    if (a > result || std::isnan(a)) result = a;
  }
  return result;
}

template <typename Row, typename Stash = NoStash>
typename Row::acc_t sum_of_squares(const Row& row, int64_t D, const Stash& stash = Stash()) {
  using acc_t = typename Row::acc_t;
  using AVec = typename Row::Chunk::AVec;
  return reduce_row(row, D, [](AVec v) { return v * v; }, [](acc_t v) { return v * v; }, stash);
}

// The scale-safe rule of row_math.h: one fast pass (its sum of squares given);
// a max-abs rescaled pair of passes only for tiny, huge, zero or non-finite rows.
template <typename Row>
RowScale<typename Row::acc_t> row_scale(const Row& row, int64_t D, typename Row::acc_t sumsq) {
  using acc_t = typename Row::acc_t;
  using AVec = typename Row::Chunk::AVec;
  if (sumsq_is_safe(sumsq)) {
    const acc_t norm = std::sqrt(sumsq);
    return {false, acc_t(1), acc_t(1) / norm, norm};
  }
  const acc_t m = max_abs_row(row, D);
  if (m == acc_t(0)) return {false, acc_t(1), acc_t(0), acc_t(0)};  // zero row
  const AVec mv(m);
  const acc_t s = reduce_row(
      row, D, [mv](AVec v) { const AVec w = v / mv; return w * w; },
      [m](acc_t v) { const acc_t w = v / m; return w * w; });
  const acc_t root = std::sqrt(s);
  // A row holding +-inf and no NaN: m = inf and s = NaN (inf / inf). Its norm is
  // inf, as torch.linalg.vector_norm's; its direction stays NaN.
  return {true, m, acc_t(1) / root, std::isinf(m) ? m : m * root};
}

template <typename Row>
RowScale<typename Row::acc_t> row_scale(const Row& row, int64_t D) {
  return row_scale(row, D, sum_of_squares(row, D));
}

// Writes out_k = x + scales[k] * u for K outputs from one read of the row,
// u_i = (kSlow ? v_i / divisor : v_i) * multiplier.
template <bool kSlow, int K, typename Row, typename scalar_t>
void write_steps(const Row& row, const scalar_t* x, scalar_t* const* outs, const double* scales,
                 const RowScale<typename Row::acc_t>& rs, int64_t D) {
  using Chunk = typename Row::Chunk;
  using acc_t = typename Row::acc_t;
  using AVec = typename Chunk::AVec;
  const AVec div(rs.divisor), mul(rs.multiplier);
  AVec scale_v[K];
  acc_t scale_s[K];
  for (int k = 0; k < K; ++k) {
    scale_s[k] = static_cast<acc_t>(scales[k]);
    scale_v[k] = AVec(scale_s[k]);
  }
  int64_t i = 0;
  for (; i + Chunk::kSize <= D; i += Chunk::kSize) {
    Chunk u = row.chunk(i);
    const Chunk xc = Chunk::load(x + i);
    for (int p = 0; p < Chunk::kParts; ++p) {
      if constexpr (kSlow) u.part[p] = u.part[p] / div;
      u.part[p] = u.part[p] * mul;
    }
    for (int k = 0; k < K; ++k) {
      Chunk o;
      for (int p = 0; p < Chunk::kParts; ++p) o.part[p] = xc.part[p] + scale_v[k] * u.part[p];
      o.store(outs[k] + i);
    }
  }
  for (; i < D; ++i) {
    const acc_t v = row.at(i);
    const acc_t u = (kSlow ? v / rs.divisor : v) * rs.multiplier;
    for (int k = 0; k < K; ++k) {
      outs[k][i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + scale_s[k] * u);
    }
  }
}

template <int K, typename Row, typename scalar_t>
void write_row_steps(const Row& row, const RowScale<typename Row::acc_t>& rs, const scalar_t* x,
                     scalar_t* const* outs, const double* scales, int64_t D) {
  if (rs.slow) {
    write_steps<true, K>(row, x, outs, scales, rs, D);
  } else {
    write_steps<false, K>(row, x, outs, scales, rs, D);
  }
}

// Rows per parallel task: at least ~32K elements of work each.
int64_t row_grain(int64_t D) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(D, 1)); }

// out_k[b] = x[b] + scales[k] * normalize(v_b) for K outputs, v_b from make_row(b).
// x: [B, D]   outs: K x [B, D]
template <int K, typename scalar_t, typename MakeRow>
void steps_kernel(const at::Tensor& x, std::array<at::Tensor, K>& outs,
                  const std::array<double, K>& scales, MakeRow make_row) {
  const int64_t B = num_rows(x), D = row_size(x);
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  std::array<scalar_t*, K> out_ptr;
  for (int k = 0; k < K; ++k) out_ptr[k] = outs[k].template mutable_data_ptr<scalar_t>();
  using acc_t = at::opmath_type<scalar_t>;
  // fp16 / bf16: the reduction pass keeps v widened in a per-thread fp32 row,
  // which saves the write pass its conversions (they, not memory, bound these
  // dtypes on CPU). fp32 / fp64 re-read the inputs instead: cheaper than a stash.
  constexpr bool kStash = AccChunk<scalar_t>::kReduced;
  at::parallel_for(0, B, row_grain(D), [&](int64_t begin, int64_t end) {
    // uninitialised: the reduction pass writes every element before the write pass reads it
    const std::unique_ptr<acc_t[]> stash(kStash ? new acc_t[D] : nullptr);
    std::array<scalar_t*, K> row_out;
    for (int64_t b = begin; b < end; ++b) {
      for (int k = 0; k < K; ++k) row_out[k] = out_ptr[k] + b * D;
      const auto row = make_row(b * D);
      if constexpr (kStash) {
        const StashedRow<scalar_t> v{stash.get()};
        write_row_steps<K>(v, row_scale(v, D, sum_of_squares(row, D, StashTo<acc_t>{stash.get()})),
                           x_ptr + b * D, row_out.data(), scales.data(), D);
      } else {
        write_row_steps<K>(row, row_scale(row, D), x_ptr + b * D, row_out.data(), scales.data(), D);
      }
    }
  });
}

// Writes outs[k] = x + scales[k] * normalize(g); outs are contiguous, x's shape.
template <int K>
void normalized_steps(const at::Tensor& x_in, const at::Tensor& g_in, const std::array<double, K>& scales,
                      std::array<at::Tensor, K>& outs) {
  if (x_in.numel() == 0) return;
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalized_step_cpu", [&] {
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    steps_kernel<K, scalar_t>(x, outs, scales,
                              [g_ptr](int64_t off) { return GradRow<scalar_t>{g_ptr + off}; });
  });
}

at::Tensor empty_out(const at::Tensor& x) { return at::empty_like(x, at::MemoryFormat::Contiguous); }

void normalized_step_out_cpu(const at::Tensor& x, const at::Tensor& g, double scale, at::Tensor& out) {
  check_normalized_step("normalized_step", x, g);
  check_positive("normalized_step", "scale", scale);
  check_out("normalized_step", out, x, {x, g});
  std::array<at::Tensor, 1> outs = {out};
  normalized_steps<1>(x, g, {scale}, outs);
}

at::Tensor normalized_step_cpu(const at::Tensor& x, const at::Tensor& g, double scale) {
  at::Tensor out = empty_out(x);
  normalized_step_out_cpu(x, g, scale, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> dual_normalized_step_cpu(const at::Tensor& x, const at::Tensor& g,
                                                            double scale_a, double scale_b) {
  check_normalized_step("dual_normalized_step", x, g);
  check_positive("dual_normalized_step", "scale_a", scale_a);
  check_positive("dual_normalized_step", "scale_b", scale_b);
  std::array<at::Tensor, 2> outs = {empty_out(x), empty_out(x)};
  normalized_steps<2>(x, g, {scale_a, scale_b}, outs);
  return {outs[0], outs[1]};
}

void fd_direction_out_cpu(const at::Tensor& x_in, const at::Tensor& g0_in, const at::Tensor& g1_in,
                                 double eps, at::Tensor& out) {
  check_fd_direction(x_in, g0_in, g1_in, eps);
  check_out("fd_direction", out, x_in, {x_in, g0_in, g1_in});
  if (x_in.numel() == 0) return;
  const at::Tensor x = x_in.contiguous(), g0 = g0_in.contiguous(), g1 = g1_in.contiguous();
  std::array<at::Tensor, 1> outs = {out};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fd_direction_cpu", [&] {
    const scalar_t* g0_ptr = g0.const_data_ptr<scalar_t>();
    const scalar_t* g1_ptr = g1.const_data_ptr<scalar_t>();
    steps_kernel<1, scalar_t>(x, outs, {eps}, [g0_ptr, g1_ptr](int64_t off) {
      return DiffRow<scalar_t>{g0_ptr + off, g1_ptr + off};
    });
  });
}

at::Tensor fd_direction_cpu(const at::Tensor& x, const at::Tensor& g0, const at::Tensor& g1, double eps) {
  at::Tensor out = empty_out(x);
  fd_direction_out_cpu(x, g0, g1, eps, out);
  return out;
}

// out = x + eps * normalize(z + step * normalize(g1 - g0) - x): per row a
// reduction of g1 - g0, then the steps kernel on the moved displacement.
at::Tensor fd_sphere_step_cpu(const at::Tensor& x_in, const at::Tensor& z_in, const at::Tensor& g0_in,
                              const at::Tensor& g1_in, double step, double eps) {
  check_fd_sphere_step(x_in, z_in, g0_in, g1_in, step, eps);
  std::array<at::Tensor, 1> outs = {empty_out(x_in)};
  if (x_in.numel() == 0) return outs[0];
  const at::Tensor x = x_in.contiguous(), z = z_in.contiguous(), g0 = g0_in.contiguous(),
                   g1 = g1_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fd_sphere_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* z_ptr = z.const_data_ptr<scalar_t>();
    const scalar_t* g0_ptr = g0.const_data_ptr<scalar_t>();
    const scalar_t* g1_ptr = g1.const_data_ptr<scalar_t>();
    const int64_t D = row_size(x);
    steps_kernel<1, scalar_t>(x, outs, {eps}, [=](int64_t off) {
      const DiffRow<scalar_t> d{g0_ptr + off, g1_ptr + off};
      return MovedRow<scalar_t>{d, z_ptr + off, x_ptr + off, row_scale(d, D), static_cast<acc_t>(step)};
    });
  });
  return outs[0];
}

// g: [B, D]   out: [B]
at::Tensor row_norm_cpu(const at::Tensor& g_in) {
  check_rows_tensor("row_norm", "g", g_in);
  const at::Tensor g = g_in.contiguous();
  const int64_t B = num_rows(g), D = row_size(g);
  at::Tensor out = at::zeros({B}, g.options());
  if (B == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "row_norm_cpu", [&] {
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        out_ptr[b] = static_cast<scalar_t>(row_scale(GradRow<scalar_t>{g_ptr + b * D}, D).norm);
      }
    });
  });
  return out;
}

// grad: [B]   g: [B, D]   norm: [B]   out: [B, D] = grad[b] * g[b] / norm[b], 0 where norm == 0.
// Divides by the norm (rather than multiplying by 1 / norm, which overflows for tiny rows).
at::Tensor row_norm_backward_cpu(const at::Tensor& grad_in, const at::Tensor& g_in, const at::Tensor& norm_in) {
  check_row_norm_backward(grad_in, g_in, norm_in);
  const at::Tensor grad = grad_in.contiguous(), g = g_in.contiguous(), norm = norm_in.contiguous();
  const int64_t B = num_rows(g), D = row_size(g);
  at::Tensor out = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "row_norm_backward_cpu", [&] {
    using Chunk = AccChunk<scalar_t>;
    using acc_t = typename Chunk::acc_t;
    using AVec = typename Chunk::AVec;
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
    const scalar_t* norm_ptr = norm.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t n = static_cast<acc_t>(norm_ptr[b]);
        const acc_t k = static_cast<acc_t>(grad_ptr[b]);
        const scalar_t* gr = g_ptr + b * D;
        scalar_t* o = out_ptr + b * D;
        if (n == acc_t(0)) {  // zero row: zero gradient, never 0/0
          std::fill(o, o + D, scalar_t(0));
          continue;
        }
        const AVec nv(n), kv(k);
        int64_t i = 0;
        for (; i + Chunk::kSize <= D; i += Chunk::kSize) {
          Chunk c = Chunk::load(gr + i);
          for (int p = 0; p < Chunk::kParts; ++p) c.part[p] = c.part[p] / nv * kv;
          c.store(o + i);
        }
        for (; i < D; ++i) o[i] = static_cast<scalar_t>(static_cast<acc_t>(gr[i]) / n * k);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ater_ext, CPU, m) {
  m.impl("normalized_step", &normalized_step_cpu);
  m.impl("normalized_step.out", &normalized_step_out_cpu);
  m.impl("dual_normalized_step", &dual_normalized_step_cpu);
  m.impl("fd_direction", &fd_direction_cpu);
  m.impl("fd_direction.out", &fd_direction_out_cpu);
  m.impl("fd_sphere_step", &fd_sphere_step_cpu);
  m.impl("row_norm", &row_norm_cpu);
  m.impl("row_norm_backward", &row_norm_backward_cpu);
}

}  // namespace ater_ext
