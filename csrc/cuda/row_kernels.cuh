// CUDA kernels of the ater_ext row ops (schema in csrc/ater_ext.cpp; entry
// points in row_ops_cuda.cu, one translation unit per dtype and layout
// instantiating these templates: row_ops_cuda_<layout>_<dtype>.cu).
//
// Two kernel structures (csrc/cuda_layout.h): the "rows" layout, the default,
// described here, and the "adaptive" layout further down (per-row alignment,
// several rows per warp for tiny rows, long rows split over several blocks),
// chosen with ater_ext.ops.set_cuda_layout until a device has measured it.
//
// Every op views its inputs as [B, D] (dim 0 = rows, D = product of the
// trailing dims) and works row by row:
//   * D <= kWarpRowMaxD: one warp per row, kWarpRowsPerBlock rows per block;
//   * otherwise:         one block per row (128 / 256 / 512 threads by D).
// Rows are visited with a grid-stride loop, so any B works with a capped grid.
// A row group (warp or block) reads its row start to end: a reduction pass,
// then the write pass re-reads the row while it is still in L1/L2.
//
// Loads and stores are 16 bytes wide (4 x fp32, 2 x fp64, 8 x fp16/bf16) when
// every pointer is 16-byte aligned and D is a multiple of the vector width;
// otherwise one element at a time.
//
// Reductions are deterministic: a fixed xor-butterfly inside each warp, then
// (block mode) the per-warp partials are summed in warp order from shared
// memory by every thread. No atomics. All accumulation is in
// acc_t = at::opmath_type<scalar_t> (fp32 for fp16/bf16/fp32, fp64 for fp64),
// and every thread of a row group ends up with the same (bitwise) result, so
// the fast/slow path decision of the scale-safe norm is uniform.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMathCompat.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "cuda_layout.h"
#include "row_math.h"

namespace ater_ext {
namespace cuda_impl {

// ---------------------------------------------------------------------------
// Launch configuration
// ---------------------------------------------------------------------------

constexpr int kWarpSize = 32;
constexpr int64_t kWarpRowMaxD = 1024;  // D up to this: one warp per row
constexpr int kWarpRowsPerBlock = 8;    // warp mode: 256-thread blocks
constexpr int kMaxThreads = 512;        // largest block we launch
constexpr int kMaxWarps = kMaxThreads / kWarpSize;

// Elements per 16-byte vector.
template <typename scalar_t>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(scalar_t));

// ---------------------------------------------------------------------------
// Vector loads / stores
// ---------------------------------------------------------------------------

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) AlignedVec {
  scalar_t val[kVec];
};

// p: kVec consecutive elements, 16-byte aligned when kVec > 1.
template <int kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_acc(const scalar_t* p, acc_t (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = static_cast<acc_t>(*p);
  } else {
    const AlignedVec<scalar_t, kVec> v =
        *reinterpret_cast<const AlignedVec<scalar_t, kVec>*>(p);
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = static_cast<acc_t>(v.val[k]);
  }
}

template <int kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_cast(scalar_t* p, const acc_t (&in)[kVec]) {
  if constexpr (kVec == 1) {
    *p = static_cast<scalar_t>(in[0]);
  } else {
    AlignedVec<scalar_t, kVec> v;
#pragma unroll
    for (int k = 0; k < kVec; ++k) v.val[k] = static_cast<scalar_t>(in[k]);
    *reinterpret_cast<AlignedVec<scalar_t, kVec>*>(p) = v;
  }
}

inline bool is_aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// ---------------------------------------------------------------------------
// Row directions v: what gets normalised. load(i, v) fills v with the kVec
// direction values at flat element index i (= row * D + column).
// ---------------------------------------------------------------------------

// v = g
template <typename scalar_t>
struct GradDir {
  const scalar_t* g;  // [B, D]
  template <int kVec, typename acc_t>
  __device__ __forceinline__ void load(int64_t i, acc_t (&v)[kVec]) const {
    load_acc<kVec>(g + i, v);
  }
};

// v = g1 - g0, the difference taken in acc_t
template <typename scalar_t>
struct DiffDir {
  const scalar_t* g0;  // [B, D]
  const scalar_t* g1;  // [B, D]
  template <int kVec, typename acc_t>
  __device__ __forceinline__ void load(int64_t i, acc_t (&v)[kVec]) const {
    acc_t a[kVec];
    load_acc<kVec>(g0 + i, a);
    load_acc<kVec>(g1 + i, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] -= a[k];
  }
};

// ---------------------------------------------------------------------------
// Deterministic group reductions
// ---------------------------------------------------------------------------

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// max that propagates NaN from either side (so a NaN row has a NaN max).
struct NanMaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return (at::_isnan(a) || a > b) ? a : b;
  }
};

// Xor butterfly: every lane ends with op over all 32 lanes, combined in the
// same fixed order; a + b == b + a bitwise, so all lanes agree exactly.
template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// One warp per row (kWarpRowsPerBlock rows per block). No __syncthreads:
// warps of a block run independent row loops.
struct WarpGroup {
  __device__ static int rank() { return static_cast<int>(threadIdx.x) % kWarpSize; }
  __device__ static int size() { return kWarpSize; }
  __device__ static int64_t first_row() {
    return static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) +
           threadIdx.x / kWarpSize;
  }
  __device__ static int64_t row_stride() {
    return static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  }
  template <typename T, typename Op>
  __device__ static T allreduce(T v, Op op, T* /*smem*/) {
    return warp_allreduce(v, op);
  }
};

// One block per row. blockDim.x is a multiple of 32, at most kMaxThreads.
struct BlockGroup {
  __device__ static int rank() { return static_cast<int>(threadIdx.x); }
  __device__ static int size() { return static_cast<int>(blockDim.x); }
  __device__ static int64_t first_row() { return blockIdx.x; }
  __device__ static int64_t row_stride() { return gridDim.x; }
  // smem: kMaxWarps slots. Every thread sums the per-warp partials in warp
  // order, so all threads get the same value; the trailing barrier makes smem
  // free for the next call.
  template <typename T, typename Op>
  __device__ static T allreduce(T v, Op op, T* smem) {
    v = warp_allreduce(v, op);
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    const int num_warps = static_cast<int>(blockDim.x) / kWarpSize;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    T r = smem[0];
    for (int w = 1; w < num_warps; ++w) r = op(r, smem[w]);
    __syncthreads();
    return r;
  }
};

// ---------------------------------------------------------------------------
// Scale-safe row norm (row_math.h), shared by every reducing kernel
// ---------------------------------------------------------------------------

// normalize(v)_i = apply(v_i); norm = ||v||_2.
//   fast:     apply(v) = v * (1 / norm)
//   slow:     apply(v) = (v / m) * (1 / sqrt(s)),  m = max |v_i|
//   zero row: apply(v) = v * 0 = 0, norm = 0
template <typename acc_t>
struct RowScale {
  bool by_max;  // slow path: divide by m first
  acc_t m;
  acc_t mul;
  acc_t norm;
  __device__ __forceinline__ acc_t apply(acc_t v) const {
    return by_max ? (v / m) * mul : v * mul;
  }
};

// What one thread adds to a reduction for the K values of dir at flat index i
// (shared by both layouts, which differ in how they walk the row).
template <int K, typename acc_t, typename Dir>
__device__ __forceinline__ void add_squares(const Dir& dir, int64_t i, acc_t& sumsq) {
  acc_t v[K];
  dir.template load<K>(i, v);
#pragma unroll
  for (int k = 0; k < K; ++k) sumsq += v[k] * v[k];
}

template <int K, typename acc_t, typename Dir>
__device__ __forceinline__ void add_max_abs(const Dir& dir, int64_t i, acc_t& m) {
  acc_t v[K];
  dir.template load<K>(i, v);
#pragma unroll
  for (int k = 0; k < K; ++k) m = NanMaxOp{}(m, c10::cuda::compat::abs(v[k]));
}

template <int K, typename acc_t, typename Dir>
__device__ __forceinline__ void add_scaled_squares(const Dir& dir, int64_t i, acc_t m, acc_t& s) {
  acc_t v[K];
  dir.template load<K>(i, v);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const acc_t q = v[k] / m;
    s += q * q;
  }
}

// The row [off, off + D) of dir, reduced by the calling row group (all of its
// threads must call this; the result is identical in all of them).
template <int kVec, typename Group, typename acc_t, typename Dir>
__device__ RowScale<acc_t> row_scale(const Dir& dir, int64_t off, int64_t D,
                                     acc_t* smem) {
  const int64_t num_vec = D / kVec;
  const int64_t rank = Group::rank();
  const int64_t size = Group::size();

  // Fast pass: sum of squares.
  acc_t sumsq = 0;
  for (int64_t j = rank; j < num_vec; j += size) add_squares<kVec>(dir, off + j * kVec, sumsq);
  sumsq = Group::allreduce(sumsq, SumOp{}, smem);
  if (sumsq_is_safe<acc_t>(sumsq)) {
    const acc_t norm = c10::cuda::compat::sqrt(sumsq);
    return {false, acc_t(1), acc_t(1) / norm, norm};
  }

  // Slow path (uniform over the group): m = max |v_i|, NaN-propagating.
  acc_t m = 0;
  for (int64_t j = rank; j < num_vec; j += size) add_max_abs<kVec>(dir, off + j * kVec, m);
  m = Group::allreduce(m, NanMaxOp{}, smem);
  if (m == acc_t(0)) {
    return {false, acc_t(1), acc_t(0), acc_t(0)};  // zero row
  }
  // s = sum (v_i / m)^2 in [1, D] (NaN if m is NaN or Inf).
  acc_t s = 0;
  for (int64_t j = rank; j < num_vec; j += size) add_scaled_squares<kVec>(dir, off + j * kVec, m, s);
  s = Group::allreduce(s, SumOp{}, smem);
  const acc_t root_s = c10::cuda::compat::sqrt(s);
  // A row holding +-inf and no NaN: m = inf, s = NaN. Its norm is inf (as
  // torch.linalg.vector_norm's); its direction stays NaN.
  return {true, m, acc_t(1) / root_s, at::_isinf(m) ? m : m * root_s};
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// The write pass of a step, for the row [off, off + D) once its scale rs is
// known: out_a = x + scale_a * normalize(v), out_b = x + scale_b * normalize(v)
// (out_b only when kNumOut == 2; v is read once for both).
// The K elements at flat index i of a step's write (shared by both layouts).
template <int K, int kNumOut, typename scalar_t, typename Dir>
__device__ __forceinline__ void write_step_piece(const Dir& dir, const RowScale<at::opmath_type<scalar_t>>& rs,
                                                 const scalar_t* x, scalar_t* out_a, scalar_t* out_b,
                                                 at::opmath_type<scalar_t> scale_a,
                                                 at::opmath_type<scalar_t> scale_b, int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t v[K];
  acc_t xv[K];
  dir.template load<K>(i, v);
  load_acc<K>(x + i, xv);
  acc_t oa[K];
  acc_t ob[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const acc_t u = rs.apply(v[k]);
    oa[k] = xv[k] + scale_a * u;
    ob[k] = xv[k] + scale_b * u;
  }
  store_cast<K>(out_a + i, oa);
  if constexpr (kNumOut == 2) store_cast<K>(out_b + i, ob);
}

template <typename scalar_t, int kVec, typename Group, typename Dir, int kNumOut>
__device__ __forceinline__ void write_row_steps(const Dir& dir, const RowScale<at::opmath_type<scalar_t>>& rs,
                                                const scalar_t* x, scalar_t* out_a, scalar_t* out_b,
                                                at::opmath_type<scalar_t> scale_a,
                                                at::opmath_type<scalar_t> scale_b, int64_t off, int64_t D) {
  const int64_t num_vec = D / kVec;
  for (int64_t j = Group::rank(); j < num_vec; j += Group::size()) {
    write_step_piece<kVec, kNumOut>(dir, rs, x, out_a, out_b, scale_a, scale_b, off + j * kVec);
  }
}

// x: [B, D]   dir: [B, D]   out_a, out_b: [B, D]
// out_a = x + scale_a * normalize(v), out_b = x + scale_b * normalize(v).
// No __restrict__ on x, out or the directions: an .out buffer may be x or g
// itself (each element is read before the same thread overwrites it).
template <typename scalar_t, int kVec, typename Group, typename Dir, int kNumOut>
__global__ void __launch_bounds__(kMaxThreads)
    normalized_step_kernel(Dir dir, const scalar_t* x, scalar_t* out_a, scalar_t* out_b,
                           at::opmath_type<scalar_t> scale_a,
                           at::opmath_type<scalar_t> scale_b, int64_t B, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kMaxWarps];
  for (int64_t row = Group::first_row(); row < B; row += Group::row_stride()) {
    const int64_t off = row * D;
    const RowScale<acc_t> rs = row_scale<kVec, Group>(dir, off, D, smem);
    write_row_steps<scalar_t, kVec, Group, Dir, kNumOut>(dir, rs, x, out_a, out_b, scale_a, scale_b, off, D);
  }
}

// fd_sphere_step's v = z + step * normalize(g1 - g0) - x (the displacement from
// the centre x of the point one ascent step moved z to), given the row's
// RowScale of g1 - g0.
template <typename scalar_t>
struct MovedDir {
  using acc_t = at::opmath_type<scalar_t>;
  DiffDir<scalar_t> diff;
  const scalar_t* z;  // [B, D]
  const scalar_t* x;  // [B, D]
  RowScale<acc_t> rs;
  acc_t step;
  template <int kVec>
  __device__ __forceinline__ void load(int64_t i, acc_t (&v)[kVec]) const {
    acc_t zv[kVec];
    acc_t xv[kVec];
    diff.template load<kVec>(i, v);
    load_acc<kVec>(z + i, zv);
    load_acc<kVec>(x + i, xv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = (zv[k] + step * rs.apply(v[k])) - xv[k];
  }
};

// x, z, g0, g1, out: [B, D]
// out = x + eps * normalize(z + step * normalize(g1 - g0) - x): per row the
// reduction of g1 - g0, the reduction of the moved displacement, the write.
template <typename scalar_t, int kVec, typename Group>
__global__ void __launch_bounds__(kMaxThreads)
    fd_sphere_step_kernel(DiffDir<scalar_t> diff, const scalar_t* z, const scalar_t* x, scalar_t* out,
                          at::opmath_type<scalar_t> step, at::opmath_type<scalar_t> eps, int64_t B,
                          int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kMaxWarps];
  for (int64_t row = Group::first_row(); row < B; row += Group::row_stride()) {
    const int64_t off = row * D;
    const MovedDir<scalar_t> moved{diff, z, x, row_scale<kVec, Group>(diff, off, D, smem), step};
    const RowScale<acc_t> rs = row_scale<kVec, Group>(moved, off, D, smem);
    write_row_steps<scalar_t, kVec, Group, MovedDir<scalar_t>, 1>(moved, rs, x, out, out, eps, eps, off, D);
  }
}

// g: [B, D]   norm: [B]
template <typename scalar_t, int kVec, typename Group>
__global__ void __launch_bounds__(kMaxThreads)
    row_norm_kernel(GradDir<scalar_t> dir, scalar_t* __restrict__ norm, int64_t B,
                    int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kMaxWarps];
  for (int64_t row = Group::first_row(); row < B; row += Group::row_stride()) {
    const RowScale<acc_t> rs = row_scale<kVec, Group>(dir, row * D, D, smem);
    if (Group::rank() == 0) norm[row] = static_cast<scalar_t>(rs.norm);
  }
}

// The K elements at flat index i of row_norm_backward: gr * (g / n), exactly 0 when n == 0.
template <int K, typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_backward_piece(const scalar_t* __restrict__ g, scalar_t* __restrict__ out,
                                                     acc_t gr, acc_t n, int64_t i) {
  acc_t gv[K];
  load_acc<K>(g + i, gv);
  acc_t o[K];
#pragma unroll
  for (int k = 0; k < K; ++k) o[k] = n == acc_t(0) ? acc_t(0) : gr * (gv[k] / n);
  store_cast<K>(out + i, o);
}

// grad: [B]   g: [B, D]   norm: [B]   out: [B, D]
// out[b, :] = grad[b] * (g[b, :] / norm[b]), exactly 0 where norm[b] == 0.
// No reduction; the row groups only give the same coalesced, vectorised walk.
template <typename scalar_t, int kVec, typename Group>
__global__ void __launch_bounds__(kMaxThreads)
    row_norm_backward_kernel(const scalar_t* __restrict__ grad,
                             const scalar_t* __restrict__ g,
                             const scalar_t* __restrict__ norm,
                             scalar_t* __restrict__ out, int64_t B, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_vec = D / kVec;
  for (int64_t row = Group::first_row(); row < B; row += Group::row_stride()) {
    const acc_t n = static_cast<acc_t>(norm[row]);
    const acc_t gr = static_cast<acc_t>(grad[row]);
    const int64_t off = row * D;
    for (int64_t j = Group::rank(); j < num_vec; j += Group::size()) {
      write_backward_piece<kVec>(g, out, gr, n, off + j * kVec);
    }
  }
}

// ===========================================================================
// The "adaptive" layout (csrc/cuda_layout.h; the default is "rows", above)
// ===========================================================================
// Three changes against the "rows" layout, each for shapes it serves badly:
//  * per-row alignment: every row (or chunk of a row) is walked as a scalar
//    head up to the first 16-byte boundary, a 16-byte vector body and a
//    scalar tail, so rows of any D and views at any offset vectorise, as long
//    as every tensor of the call has the same address residue mod 16
//    (otherwise every element is scalar, as in the rows layout);
//  * tiny rows (D <= kWarpRowMaxD): L = 1, 2, ..., 32 lanes per row (about two
//    vectors per lane), 32 / L rows per warp;
//  * few long rows (B small against the SM count): each row split over P
//    blocks. Pass 1 writes every block's partial sum of squares and max |v|
//    to a workspace; each block then reduces its row's P partials itself, in
//    one fixed order, so that all blocks of a row agree bitwise (and repeats
//    are deterministic); rows of extreme scale only take a middle pass that
//    adds the partial sums of (v / m)^2 (the blocks of other rows exit at once).
// Numerics as row_math.h: the fast path's sum of squares when it is safe, the
// max-rescaled sum otherwise. The max |v| is taken in pass 1 with the sum of
// squares, which saves the slow path a pass.

// Calls visit(std::integral_constant<int, K>{}, i) for the K-element pieces of
// the flat element range [begin, end): a scalar head up to the first index
// whose address is 16-byte aligned, kVec-element vectors, a scalar tail.
// mis: element i is 16-byte aligned iff (i + mis) % kVec == 0 (the same for
// every tensor of the call). rank / size: this thread's place in the walk.
template <int kVec, typename Visit>
__device__ __forceinline__ void walk_range(int64_t begin, int64_t end, int mis, int64_t rank,
                                           int64_t size, Visit&& visit) {
  const int64_t len = end - begin;
  if (len <= 0) return;
  int64_t head = 0;
  if constexpr (kVec > 1) {
    head = (kVec - (begin + mis) % kVec) % kVec;
    head = head < len ? head : len;
  }
  const int64_t body = begin + head;
  const int64_t num_vec = (len - head) / kVec;
  const int64_t tail = body + num_vec * kVec;
  for (int64_t j = rank; j < head; j += size) visit(std::integral_constant<int, 1>{}, begin + j);
  for (int64_t j = rank; j < num_vec; j += size) {
    visit(std::integral_constant<int, kVec>{}, body + j * kVec);
  }
  for (int64_t j = tail + rank; j < end; j += size) visit(std::integral_constant<int, 1>{}, j);
}

// Sum of squares and NaN-propagating max |v| of dir over [begin, end), this
// thread's share.
template <int kVec, typename acc_t, typename Dir>
__device__ __forceinline__ void sumsq_and_max(const Dir& dir, int64_t begin, int64_t end, int mis,
                                              int64_t rank, int64_t size, acc_t& sumsq, acc_t& m) {
  walk_range<kVec>(begin, end, mis, rank, size, [&](auto piece, int64_t i) {
    constexpr int K = decltype(piece)::value;
    acc_t v[K];
    dir.template load<K>(i, v);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      sumsq += v[k] * v[k];
      m = NanMaxOp{}(m, c10::cuda::compat::abs(v[k]));
    }
  });
}

// This thread's share of sum (v / m)^2 over [begin, end).
template <int kVec, typename acc_t, typename Dir>
__device__ __forceinline__ acc_t scaled_sumsq(const Dir& dir, int64_t begin, int64_t end, int mis,
                                              int64_t rank, int64_t size, acc_t m) {
  acc_t s = 0;
  walk_range<kVec>(begin, end, mis, rank, size, [&](auto piece, int64_t i) {
    add_scaled_squares<decltype(piece)::value>(dir, i, m, s);
  });
  return s;
}

// Whether the slow path needs the (v / m)^2 pass: rows of extreme but finite,
// non-zero scale.
template <typename acc_t>
__device__ __forceinline__ bool needs_scaled_pass(acc_t sumsq, acc_t m) {
  return !sumsq_is_safe<acc_t>(sumsq) && m > acc_t(0) && !at::_isinf(m);  // NaN m: false
}

// The RowScale of a row from its reductions (s: sum (v / m)^2, used only
// when needs_scaled_pass). Same cases as row_scale above: fast; zero row;
// NaN row (NaN direction and norm); row holding +-inf (NaN direction, norm inf).
template <typename acc_t>
__device__ __forceinline__ RowScale<acc_t> scale_of(acc_t sumsq, acc_t m, acc_t s) {
  if (sumsq_is_safe<acc_t>(sumsq)) {
    const acc_t norm = c10::cuda::compat::sqrt(sumsq);
    return {false, acc_t(1), acc_t(1) / norm, norm};
  }
  if (m == acc_t(0)) return {false, acc_t(1), acc_t(0), acc_t(0)};
  if (at::_isnan(m) || at::_isinf(m)) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    return {true, m, nan, at::_isinf(m) ? m : nan};
  }
  const acc_t root_s = c10::cuda::compat::sqrt(s);
  return {true, m, acc_t(1) / root_s, m * root_s};
}

// L lanes per row (a power of two, 1..32), 32 / L rows per warp. The row loop
// is warp-uniform: every lane runs every iteration and every shuffle (lanes
// whose row is past B walk an empty row), so full-mask shuffles are safe.
struct LaneGroup {
  int lanes;
  __device__ int rank() const { return static_cast<int>(threadIdx.x) & (lanes - 1); }
  __device__ int64_t warp_first_row() const {
    const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
    return warp * (kWarpSize / lanes);
  }
  __device__ int64_t row_in_warp() const { return (threadIdx.x % kWarpSize) / lanes; }
  __device__ int64_t row_stride() const {
    return static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize) * (kWarpSize / lanes);
  }
  template <typename T, typename Op>
  __device__ T allreduce(T v, Op op) const {
    for (int offset = lanes / 2; offset > 0; offset >>= 1) {
      v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
  }
  __device__ bool any(bool p) const { return __any_sync(0xffffffffu, p); }
};

// What a reducing kernel writes once the row's scale is known. Writers see the
// range [begin, end) of the row that this block (or lane group) covers.
// Steps: out_k = x + scale_k * normalize(v) for kNumOut outputs.
template <typename scalar_t, typename Dir, int kNumOut>
struct StepWriter {
  using acc_t = at::opmath_type<scalar_t>;
  Dir dir;
  const scalar_t* x;
  scalar_t* out_a;
  scalar_t* out_b;
  acc_t scale_a;
  acc_t scale_b;
  template <int kVec>
  __device__ __forceinline__ void write(const RowScale<acc_t>& rs, int64_t /*row*/, bool /*first*/,
                                        int64_t begin, int64_t end, int mis, int64_t rank,
                                        int64_t size) const {
    walk_range<kVec>(begin, end, mis, rank, size, [&](auto piece, int64_t i) {
      write_step_piece<decltype(piece)::value, kNumOut>(dir, rs, x, out_a, out_b, scale_a, scale_b, i);
    });
  }
};

// row_norm: the first thread of the row's first block writes norm[row].
template <typename scalar_t>
struct NormWriter {
  using acc_t = at::opmath_type<scalar_t>;
  GradDir<scalar_t> dir;
  scalar_t* norm;
  template <int kVec>
  __device__ __forceinline__ void write(const RowScale<acc_t>& rs, int64_t row, bool first,
                                        int64_t, int64_t, int, int64_t rank, int64_t) const {
    if (first && rank == 0) norm[row] = static_cast<scalar_t>(rs.norm);
  }
};

// Rows of D <= kWarpRowMaxD, `lanes` lanes each.
template <typename scalar_t, int kVec, typename Writer>
__global__ void __launch_bounds__(256)
    lane_rows_kernel(Writer w, int lanes, int mis, int64_t B, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaneGroup group{lanes};
  const int64_t rank = group.rank();
  for (int64_t first = group.warp_first_row(); first < B; first += group.row_stride()) {
    const int64_t row = first + group.row_in_warp();
    const bool active = row < B;
    const int64_t begin = active ? row * D : 0;
    const int64_t end = active ? begin + D : 0;
    acc_t sumsq = 0;
    acc_t m = 0;
    sumsq_and_max<kVec>(w.dir, begin, end, mis, rank, lanes, sumsq, m);
    sumsq = group.allreduce(sumsq, SumOp{});
    m = group.allreduce(m, NanMaxOp{});
    acc_t s = 0;
    const bool scaled = active && needs_scaled_pass(sumsq, m);
    if (group.any(scaled)) {  // warp-uniform
      s = scaled_sumsq<kVec>(w.dir, begin, scaled ? end : begin, mis, rank, lanes, scaled ? m : acc_t(1));
      s = group.allreduce(s, SumOp{});
    }
    if (active) {
      w.template write<kVec>(scale_of(sumsq, m, s), row, true, begin, end, mis, rank, lanes);
    }
  }
}

// Rows of D > kWarpRowMaxD, one block per row (grid-stride over rows).
template <typename scalar_t, int kVec, typename Writer>
__global__ void __launch_bounds__(kMaxThreads)
    block_rows_kernel(Writer w, int mis, int64_t B, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kMaxWarps];
  const int64_t rank = threadIdx.x;
  const int64_t size = blockDim.x;
  for (int64_t row = blockIdx.x; row < B; row += gridDim.x) {
    const int64_t begin = row * D;
    const int64_t end = begin + D;
    acc_t sumsq = 0;
    acc_t m = 0;
    sumsq_and_max<kVec>(w.dir, begin, end, mis, rank, size, sumsq, m);
    sumsq = BlockGroup::allreduce(sumsq, SumOp{}, smem);
    m = BlockGroup::allreduce(m, NanMaxOp{}, smem);
    acc_t s = 0;
    if (needs_scaled_pass(sumsq, m)) {  // block-uniform
      s = BlockGroup::allreduce(scaled_sumsq<kVec>(w.dir, begin, end, mis, rank, size, m), SumOp{},
                                smem);
    }
    w.template write<kVec>(scale_of(sumsq, m, s), row, true, begin, end, mis, rank, size);
  }
}

// ---- rows split over P blocks: block b covers chunk b % P of row b / P ----

// End of chunk c of the row starting at row_begin: [row_begin + c * chunk, this).
__device__ __forceinline__ int64_t chunk_end(int64_t row_begin, int64_t c, int64_t chunk, int64_t D) {
  const int64_t end = row_begin + (c + 1) * chunk;
  return end < row_begin + D ? end : row_begin + D;
}

// Workspace: [3][B * P] acc_t: partial sums of squares, max |v|, sums of (v / m)^2.
template <typename acc_t>
struct SplitWork {
  acc_t* sumsq;
  acc_t* max;
  acc_t* scaled;
};

// The row's totals from its P partials, summed in one fixed order by the
// whole block (identical in every block of the row).
template <typename acc_t>
__device__ __forceinline__ void row_totals(const acc_t* sumsq_parts, const acc_t* max_parts, int P,
                                           acc_t* smem, acc_t& sumsq, acc_t& m) {
  acc_t a = 0;
  acc_t b = 0;
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    a += sumsq_parts[p];
    b = NanMaxOp{}(b, max_parts[p]);
  }
  sumsq = BlockGroup::allreduce(a, SumOp{}, smem);
  m = BlockGroup::allreduce(b, NanMaxOp{}, smem);
}

template <typename scalar_t, int kVec, typename Dir>
__global__ void __launch_bounds__(kMaxThreads)
    split_partials_kernel(Dir dir, SplitWork<at::opmath_type<scalar_t>> work, int mis, int P,
                          int64_t chunk, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kMaxWarps];
  const int64_t row = blockIdx.x / P;
  const int64_t c = blockIdx.x % P;
  const int64_t begin = row * D + c * chunk;
  const int64_t end = chunk_end(row * D, c, chunk, D);
  acc_t sumsq = 0;
  acc_t m = 0;
  sumsq_and_max<kVec>(dir, begin, end, mis, threadIdx.x, blockDim.x, sumsq, m);
  sumsq = BlockGroup::allreduce(sumsq, SumOp{}, smem);
  m = BlockGroup::allreduce(m, NanMaxOp{}, smem);
  if (threadIdx.x == 0) {
    work.sumsq[blockIdx.x] = sumsq;
    work.max[blockIdx.x] = m;
  }
}

// Rows of extreme scale only: the partial sums of (v / m)^2.
template <typename scalar_t, int kVec, typename Dir>
__global__ void __launch_bounds__(kMaxThreads)
    split_scaled_kernel(Dir dir, SplitWork<at::opmath_type<scalar_t>> work, int mis, int P,
                        int64_t chunk, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kMaxWarps];
  const int64_t row = blockIdx.x / P;
  const int64_t c = blockIdx.x % P;
  acc_t sumsq, m;
  row_totals(work.sumsq + row * P, work.max + row * P, P, smem, sumsq, m);
  if (!needs_scaled_pass(sumsq, m)) return;  // block-uniform
  const int64_t begin = row * D + c * chunk;
  const int64_t end = chunk_end(row * D, c, chunk, D);
  const acc_t s = BlockGroup::allreduce(
      scaled_sumsq<kVec>(dir, begin, end, mis, threadIdx.x, blockDim.x, m), SumOp{}, smem);
  if (threadIdx.x == 0) work.scaled[blockIdx.x] = s;
}

template <typename scalar_t, int kVec, typename Writer>
__global__ void __launch_bounds__(kMaxThreads)
    split_write_kernel(Writer w, SplitWork<at::opmath_type<scalar_t>> work, int mis, int P,
                       int64_t chunk, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kMaxWarps];
  const int64_t row = blockIdx.x / P;
  const int64_t c = blockIdx.x % P;
  acc_t sumsq, m;
  row_totals(work.sumsq + row * P, work.max + row * P, P, smem, sumsq, m);
  acc_t s = 0;
  if (needs_scaled_pass(sumsq, m)) {  // block-uniform; the same fixed order again
    acc_t part = 0;
    for (int p = threadIdx.x; p < P; p += blockDim.x) part += work.scaled[row * P + p];
    s = BlockGroup::allreduce(part, SumOp{}, smem);
  }
  const int64_t begin = row * D + c * chunk;
  const int64_t end = chunk_end(row * D, c, chunk, D);
  w.template write<kVec>(scale_of(sumsq, m, s), row, c == 0, begin, end, mis, threadIdx.x,
                         blockDim.x);
}

// row_norm_backward, adaptive: out = grad[b] * (g / norm[b]) over (row, chunk)
// pairs, grid-stride; a chunk is a whole row when D <= chunk.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    backward_chunks_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ g,
                           const scalar_t* __restrict__ norm, scalar_t* __restrict__ out, int mis,
                           int64_t P, int64_t chunk, int64_t B, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t w = blockIdx.x; w < B * P; w += gridDim.x) {
    const int64_t row = w / P;
    const int64_t c = w % P;
    const acc_t n = static_cast<acc_t>(norm[row]);
    const acc_t gr = static_cast<acc_t>(grad[row]);
    const int64_t begin = row * D + c * chunk;
    const int64_t end = chunk_end(row * D, c, chunk, D);
    walk_range<kVec>(begin, end, mis, threadIdx.x, blockDim.x, [&](auto piece, int64_t i) {
      write_backward_piece<decltype(piece)::value>(g, out, gr, n, i);
    });
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

// Picks the row group (warp or block), block size, grid and vector width for a
// [B, D] problem, then calls
//   launch(Group{}, std::integral_constant<int, kVec>{}, grid, block).
// vec_ok: all pointers 16-byte aligned (D % width is checked here).
template <typename scalar_t, typename Launch>
void launch_rows(int64_t B, int64_t D, bool vec_ok, Launch&& launch) {
  constexpr int kVec = kVecWidth<scalar_t>;
  const bool use_vec = vec_ok && D % kVec == 0;
  const bool warp_rows = D <= kWarpRowMaxD;

  int threads;
  int64_t rows_per_block;
  if (warp_rows) {
    threads = kWarpRowsPerBlock * kWarpSize;
    rows_per_block = kWarpRowsPerBlock;
  } else {
    threads = D <= 4096 ? 128 : (D <= 16384 ? 256 : kMaxThreads);
    rows_per_block = 1;
  }
  // Enough blocks for every row, capped at a few full waves; the kernels
  // grid-stride over the remaining rows.
  // (Plain runtime queries rather than at::cuda::getCurrentDeviceProperties(),
  // whose header drags in cuBLAS / cuSPARSE headers.)
  const int device = c10::cuda::current_device();
  int sm_count = 0;
  int sm_threads = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_threads,
                                        cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t max_blocks = std::max<int64_t>(
      1, static_cast<int64_t>(sm_count) * std::max(1, sm_threads / threads) * 8);
  const int64_t blocks =
      std::min<int64_t>((B + rows_per_block - 1) / rows_per_block, max_blocks);
  const dim3 grid(static_cast<unsigned int>(blocks));
  const dim3 block(static_cast<unsigned int>(threads));

  auto with_group = [&](auto group) {
    if (use_vec) {
      launch(group, std::integral_constant<int, kVec>{}, grid, block);
    } else {
      launch(group, std::integral_constant<int, 1>{}, grid, block);
    }
  };
  if (warp_rows) {
    with_group(WarpGroup{});
  } else {
    with_group(BlockGroup{});
  }
}


// ---------------------------------------------------------------------------
// Host side of the adaptive layout
// ---------------------------------------------------------------------------

constexpr int kLaneBlockThreads = 256;
constexpr int64_t kSplitMinChunk = 8192;  // elements per block, at least, when a row is split

// Element residue of a pointer's address mod the 16-byte vector (see walk_range).
template <typename scalar_t>
int residue(const void* p) {
  return static_cast<int>(reinterpret_cast<std::uintptr_t>(p) % 16 / sizeof(scalar_t));
}

// The residue all pointers share, or -1 when they differ (then every element is scalar).
template <typename scalar_t>
int common_residue(std::initializer_list<const void*> ptrs) {
  int mis = residue<scalar_t>(*ptrs.begin());
  for (const void* p : ptrs) {
    if (residue<scalar_t>(p) != mis) return -1;
  }
  return mis;
}

struct DeviceShape {
  int sm_count;
  int sm_threads;
};

inline DeviceShape device_shape() {
  const int device = c10::cuda::current_device();
  DeviceShape d{0, 0};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_threads, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return d;
}

struct AdaptivePlan {
  enum Kind { kLanes, kBlocks, kSplit } kind;
  int lanes = kWarpSize;     // kLanes
  int threads = kMaxThreads;
  int64_t blocks = 1;
  int P = 1;                 // kSplit: blocks per row
  int64_t chunk = 0;         // kSplit: elements per block
};

// Tiny rows: lanes per row for about two vectors a lane. Few long rows (the
// batch fills less than half a wave of 512-thread blocks): split each row into
// P >= 2 chunks of at least kSplitMinChunk elements, up to one full wave.
// Otherwise one block per row, sized by D as in the rows layout.
template <typename scalar_t>
AdaptivePlan plan_adaptive(int64_t B, int64_t D, bool vec) {
  const DeviceShape dev = device_shape();
  const int per_lane = 2 * (vec ? kVecWidth<scalar_t> : 1);
  AdaptivePlan plan{AdaptivePlan::kBlocks};
  if (D <= kWarpRowMaxD) {
    plan.kind = AdaptivePlan::kLanes;
    plan.lanes = 1;
    while (plan.lanes < kWarpSize && static_cast<int64_t>(plan.lanes) * per_lane < D) plan.lanes *= 2;
    plan.threads = kLaneBlockThreads;
    const int64_t rows_per_block = kLaneBlockThreads / plan.lanes;
    const int64_t max_blocks = static_cast<int64_t>(dev.sm_count) *
                               std::max(1, dev.sm_threads / kLaneBlockThreads) * 8;
    plan.blocks = std::max<int64_t>(1, std::min((B + rows_per_block - 1) / rows_per_block, max_blocks));
    return plan;
  }
  const int64_t wave = static_cast<int64_t>(dev.sm_count) * std::max(1, dev.sm_threads / kMaxThreads);
  if (2 * B <= wave && D >= 2 * kSplitMinChunk) {
    const int64_t P = std::min((wave + B - 1) / B, D / kSplitMinChunk);
    const int64_t chunk = ((D + P - 1) / P + 63) / 64 * 64;
    plan.P = static_cast<int>((D + chunk - 1) / chunk);
    if (plan.P >= 2) {
      plan.kind = AdaptivePlan::kSplit;
      plan.chunk = chunk;
      plan.threads = kMaxThreads;
      plan.blocks = B * plan.P;
      return plan;
    }
    plan.P = 1;
  }
  plan.threads = D <= 4096 ? 128 : (D <= 16384 ? 256 : kMaxThreads);
  const int64_t max_blocks =
      static_cast<int64_t>(dev.sm_count) * std::max(1, dev.sm_threads / plan.threads) * 8;
  plan.blocks = std::max<int64_t>(1, std::min(B, max_blocks));
  return plan;
}

// Launches a reducing op (steps or row_norm, by its Writer) in the adaptive
// layout. mis: common_residue of every pointer the op touches (-1: scalar).
// like: any tensor of the call (device of the workspace).
template <typename scalar_t, typename Writer>
void launch_adaptive(const Writer& w, int64_t B, int64_t D, int mis, const at::Tensor& like) {
  using acc_t = at::opmath_type<scalar_t>;
  const AdaptivePlan plan = plan_adaptive<scalar_t>(B, D, mis >= 0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto go = [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    const int m = kVec > 1 ? mis : 0;
    const dim3 grid(static_cast<unsigned int>(plan.blocks));
    const dim3 block(static_cast<unsigned int>(plan.threads));
    switch (plan.kind) {
      case AdaptivePlan::kLanes:
        lane_rows_kernel<scalar_t, kVec><<<grid, block, 0, stream>>>(w, plan.lanes, m, B, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        break;
      case AdaptivePlan::kBlocks:
        block_rows_kernel<scalar_t, kVec><<<grid, block, 0, stream>>>(w, m, B, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        break;
      case AdaptivePlan::kSplit: {
        const int64_t parts = B * plan.P;
        const at::Tensor ws =
            at::empty({3, parts}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        acc_t* base = ws.data_ptr<acc_t>();
        const SplitWork<acc_t> work{base, base + parts, base + 2 * parts};
        split_partials_kernel<scalar_t, kVec>
            <<<grid, block, 0, stream>>>(w.dir, work, m, plan.P, plan.chunk, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        split_scaled_kernel<scalar_t, kVec>
            <<<grid, block, 0, stream>>>(w.dir, work, m, plan.P, plan.chunk, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        split_write_kernel<scalar_t, kVec>
            <<<grid, block, 0, stream>>>(w, work, m, plan.P, plan.chunk, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        break;
      }
    }
  };
  if (mis >= 0) {
    go(std::integral_constant<int, kVecWidth<scalar_t>>{});
  } else {
    go(std::integral_constant<int, 1>{});
  }
}

// The steps (normalized_step, dual_normalized_step, fd_direction) in the adaptive layout.
template <typename scalar_t>
std::array<const void*, 2> dir_pointers(const GradDir<scalar_t>& d) { return {d.g, d.g}; }
template <typename scalar_t>
std::array<const void*, 2> dir_pointers(const DiffDir<scalar_t>& d) { return {d.g0, d.g1}; }

template <typename scalar_t, typename Dir, int kNumOut>
void launch_adaptive_steps(const Dir& dir, const at::Tensor& x, const at::Tensor& out_a, const at::Tensor& out_b,
                           double scale_a, double scale_b, int64_t B, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  scalar_t* a_ptr = out_a.data_ptr<scalar_t>();
  scalar_t* b_ptr = kNumOut == 2 ? out_b.data_ptr<scalar_t>() : a_ptr;
  const std::array<const void*, 2> d = dir_pointers(dir);
  const int mis = common_residue<scalar_t>({x_ptr, a_ptr, b_ptr, d[0], d[1]});
  const StepWriter<scalar_t, Dir, kNumOut> w{dir, x_ptr, a_ptr, b_ptr, static_cast<acc_t>(scale_a),
                                             static_cast<acc_t>(scale_b)};
  launch_adaptive<scalar_t>(w, B, D, mis, x);
}

// row_norm_backward in the adaptive layout: rows longer than kWarpRowMaxD in
// chunks of up to kSplitMinChunk elements over the grid; shorter rows as in the rows layout.
template <typename scalar_t>
bool launch_adaptive_backward(const scalar_t* grad, const scalar_t* g, const scalar_t* norm,
                              scalar_t* out, int64_t B, int64_t D) {
  if (D <= kWarpRowMaxD) return false;
  const DeviceShape dev = device_shape();
  const int64_t chunk = std::min<int64_t>(D, kSplitMinChunk);
  const int64_t P = (D + chunk - 1) / chunk;
  const int64_t max_blocks =
      static_cast<int64_t>(dev.sm_count) * std::max(1, dev.sm_threads / kMaxThreads) * 8;
  const dim3 grid(static_cast<unsigned int>(std::max<int64_t>(1, std::min(B * P, max_blocks))));
  const dim3 block(kMaxThreads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int mis = common_residue<scalar_t>({g, out});
  if (mis >= 0) {
    backward_chunks_kernel<scalar_t, kVecWidth<scalar_t>>
        <<<grid, block, 0, stream>>>(grad, g, norm, out, mis, P, chunk, B, D);
  } else {
    backward_chunks_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(grad, g, norm, out, 0, P, chunk, B, D);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// The rows layout of normalized_step / dual_normalized_step / fd_direction.
// x: [B, ...]   out_a (, out_b): contiguous, x's shape
template <typename scalar_t, typename Dir, int kNumOut>
void launch_rows_steps(const Dir& dir, bool dir_aligned, const at::Tensor& x,
                            const at::Tensor& out_a, const at::Tensor& out_b,
                            double scale_a, double scale_b, int64_t B, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  scalar_t* a_ptr = out_a.data_ptr<scalar_t>();
  scalar_t* b_ptr = kNumOut == 2 ? out_b.data_ptr<scalar_t>() : nullptr;
  const bool vec_ok = dir_aligned && is_aligned16(x_ptr) && is_aligned16(a_ptr) &&
                      (kNumOut == 1 || is_aligned16(b_ptr));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_rows<scalar_t>(B, D, vec_ok, [&](auto group, auto vec, dim3 grid, dim3 block) {
    using Group = decltype(group);
    constexpr int kVec = decltype(vec)::value;
    normalized_step_kernel<scalar_t, kVec, Group, Dir, kNumOut>
        <<<grid, block, 0, stream>>>(dir, x_ptr, a_ptr, b_ptr,
                                     static_cast<acc_t>(scale_a),
                                     static_cast<acc_t>(scale_b), B, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}


// ---------------------------------------------------------------------------
// Entry points per dtype and layout. Each (dtype, layout) pair is instantiated
// in its own translation unit (row_ops_cuda_<layout>_<dtype>.cu), so that the
// build compiles them in parallel; row_ops_cuda.cu checks the arguments and
// dispatches to them.
// ---------------------------------------------------------------------------

// x, g0 (, g1), out_a (, out_b): contiguous [B, D]. g1 defined: fd_direction's
// v = g1 - g0 (one output); otherwise v = g0 with num_out (1 or 2) outputs.
template <typename scalar_t, bool kAdaptive>
void launch_steps(const at::Tensor& x, const at::Tensor& g0, const at::Tensor& g1,
                  const at::Tensor& out_a, const at::Tensor& out_b, int num_out, double scale_a,
                  double scale_b, int64_t B, int64_t D) {
  auto go = [&](const auto& dir, bool dir_aligned, auto num) {
    using Dir = std::decay_t<decltype(dir)>;
    constexpr int kNumOut = decltype(num)::value;
    if constexpr (kAdaptive) {
      launch_adaptive_steps<scalar_t, Dir, kNumOut>(dir, x, out_a, out_b, scale_a, scale_b, B, D);
    } else {
      launch_rows_steps<scalar_t, Dir, kNumOut>(dir, dir_aligned, x, out_a, out_b, scale_a, scale_b,
                                                B, D);
    }
  };
  if (g1.defined()) {
    const DiffDir<scalar_t> dir{g0.data_ptr<scalar_t>(), g1.data_ptr<scalar_t>()};
    go(dir, is_aligned16(dir.g0) && is_aligned16(dir.g1), std::integral_constant<int, 1>{});
  } else if (num_out == 2) {
    const GradDir<scalar_t> dir{g0.data_ptr<scalar_t>()};
    go(dir, is_aligned16(dir.g), std::integral_constant<int, 2>{});
  } else {
    const GradDir<scalar_t> dir{g0.data_ptr<scalar_t>()};
    go(dir, is_aligned16(dir.g), std::integral_constant<int, 1>{});
  }
}

// x, z, g0, g1, out: contiguous [B, D]. One structure in both layouts (the
// rows one: a warp or a block per row), as the op is one launch per ascent step.
template <typename scalar_t>
void launch_fd_sphere_step(const at::Tensor& x, const at::Tensor& z, const at::Tensor& g0,
                           const at::Tensor& g1, const at::Tensor& out, double step, double eps,
                           int64_t B, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const DiffDir<scalar_t> diff{g0.data_ptr<scalar_t>(), g1.data_ptr<scalar_t>()};
  const scalar_t* z_ptr = z.data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const bool vec_ok = is_aligned16(diff.g0) && is_aligned16(diff.g1) && is_aligned16(z_ptr) &&
                      is_aligned16(x_ptr) && is_aligned16(out_ptr);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_rows<scalar_t>(B, D, vec_ok, [&](auto group, auto vec, dim3 grid, dim3 block) {
    using Group = decltype(group);
    constexpr int kVec = decltype(vec)::value;
    fd_sphere_step_kernel<scalar_t, kVec, Group><<<grid, block, 0, stream>>>(
        diff, z_ptr, x_ptr, out_ptr, static_cast<acc_t>(step), static_cast<acc_t>(eps), B, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// g: contiguous [B, D]   out: [B]
template <typename scalar_t, bool kAdaptive>
void launch_row_norm(const at::Tensor& g, const at::Tensor& out, int64_t B, int64_t D) {
  const GradDir<scalar_t> dir{g.data_ptr<scalar_t>()};
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  if constexpr (kAdaptive) {
    launch_adaptive<scalar_t>(NormWriter<scalar_t>{dir, out_ptr}, B, D, residue<scalar_t>(dir.g), g);
  } else {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    launch_rows<scalar_t>(B, D, is_aligned16(dir.g), [&](auto group, auto vec, dim3 grid, dim3 block) {
      using Group = decltype(group);
      constexpr int kVec = decltype(vec)::value;
      row_norm_kernel<scalar_t, kVec, Group><<<grid, block, 0, stream>>>(dir, out_ptr, B, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

// grad: [B]   g: contiguous [B, D]   norm: [B]   out: contiguous [B, D]
template <typename scalar_t, bool kAdaptive>
void launch_row_norm_backward(const at::Tensor& grad, const at::Tensor& g, const at::Tensor& norm,
                              const at::Tensor& out, int64_t B, int64_t D) {
  const scalar_t* grad_ptr = grad.data_ptr<scalar_t>();
  const scalar_t* g_ptr = g.data_ptr<scalar_t>();
  const scalar_t* norm_ptr = norm.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  if constexpr (kAdaptive) {
    if (launch_adaptive_backward<scalar_t>(grad_ptr, g_ptr, norm_ptr, out_ptr, B, D)) return;
  }
  const bool vec_ok = is_aligned16(g_ptr) && is_aligned16(out_ptr);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_rows<scalar_t>(B, D, vec_ok, [&](auto group, auto vec, dim3 grid, dim3 block) {
    using Group = decltype(group);
    constexpr int kVec = decltype(vec)::value;
    row_norm_backward_kernel<scalar_t, kVec, Group>
        <<<grid, block, 0, stream>>>(grad_ptr, g_ptr, norm_ptr, out_ptr, B, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The explicit instantiations of one (dtype, layout) pair (in its own .cu),
// and their declarations (in row_ops_cuda.cu, which must not instantiate them).
#define ATER_EXT_CUDA_ENTRY_POINTS(prefix, scalar_t, adaptive)                                   \
  prefix template void launch_steps<scalar_t, adaptive>(                                         \
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,                \
      const at::Tensor&, int, double, double, int64_t, int64_t);                                 \
  prefix template void launch_row_norm<scalar_t, adaptive>(const at::Tensor&, const at::Tensor&, \
                                                           int64_t, int64_t);                    \
  prefix template void launch_row_norm_backward<scalar_t, adaptive>(                             \
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t);

#define ATER_EXT_CUDA_INSTANTIATE(scalar_t, adaptive) ATER_EXT_CUDA_ENTRY_POINTS(, scalar_t, adaptive)
#define ATER_EXT_CUDA_DECLARE(scalar_t, adaptive) ATER_EXT_CUDA_ENTRY_POINTS(extern, scalar_t, adaptive)

// fd_sphere_step has one structure for both layouts: instantiated with the rows layout's TUs.
#define ATER_EXT_CUDA_SPHERE_STEP(prefix, scalar_t)                                              \
  prefix template void launch_fd_sphere_step<scalar_t>(const at::Tensor&, const at::Tensor&,     \
                                                       const at::Tensor&, const at::Tensor&,     \
                                                       const at::Tensor&, double, double, int64_t, \
                                                       int64_t);

}  // namespace cuda_impl
}  // namespace ater_ext
