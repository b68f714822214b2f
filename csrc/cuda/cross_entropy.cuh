// Device code of the fused cross-entropy: kernels, their __device__ helpers and their launch
// configuration. Free of host-only syntax, so the same code compiles with nvcc for a GPU and with
// g++ under the CUDA simulation (csrc/sim/cuda_sim.h) for the tests. The host sequence of launches
// is cross_entropy_host.h, instantiated by cross_entropy_cuda.cu (GPU) and
// tests/sim/cross_entropy_sim.cpp (simulation).
//
// The maths is the CPU kernel's (docs/cross_entropy.md): per row, the max m, then
// sumexp = sum exp(x - m) and, for label smoothing and probability targets, the coefficient sums
// coef_sum = sum coef and coef_dot = sum coef * (x - m). Rows of up to kWarpRowMaxClasses classes
// take one warp each; longer rows one block each. Every reduction runs in a fixed order (no float
// atomics), so results are deterministic.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Reduction.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "cuda/device_common.cuh"

namespace fused_mlp::cuda {

constexpr int64_t kWarpRowMaxClasses = 1024;
constexpr int kWarpRowThreads = 128;  // 4 rows per block
constexpr int kBlockRowThreads = 512;
constexpr int kBatchReduceThreads = 512;  // the single block of the batch reductions

// Rows of up to kWarpRowMaxClasses classes take a warp or part of one; longer rows a block.
constexpr bool cross_entropy_warp_per_row(int64_t classes) {
  return classes <= kWarpRowMaxClasses;
}

// As PyTorch's persistent softmax: with a warp per row, short rows share a warp (C <= 16 takes C
// rounded up to a power of two lanes), and each lane holds its share of the row in registers, a
// power of two values.
constexpr int cross_entropy_lanes_per_row(int64_t classes) {
  return std::min<int>(kWarpSize, next_power_of_two(classes));
}
constexpr int cross_entropy_values_per_lane(int64_t classes) {
  const int lanes = cross_entropy_lanes_per_row(classes);
  return next_power_of_two((classes + lanes - 1) / lanes);
}

// The forward's row kernel: a warp per row for short rows, a block per row for long ones; a grid
// of a few waves, looping over the rows beyond it (grid-stride).
inline LaunchConfig cross_entropy_rows_config(int64_t rows, int64_t classes, const LaunchLimits& limits,
                                              int64_t max_blocks_per_sm = 32) {
  const int64_t max_grid = std::max<int64_t>(1, limits.sm_count * max_blocks_per_sm);
  if (cross_entropy_warp_per_row(classes)) {
    const int64_t rows_per_block = (kWarpRowThreads / kWarpSize) * (kWarpSize / cross_entropy_lanes_per_row(classes));
    const int64_t blocks = std::max<int64_t>(1, std::min(max_grid, (rows + rows_per_block - 1) / rows_per_block));
    return {dim3(static_cast<unsigned>(blocks)), dim3(kWarpRowThreads), 0};
  }
  const int threads = std::min(kBlockRowThreads, limits.max_threads_per_block);
  const int64_t blocks = std::max<int64_t>(1, std::min(max_grid, rows));
  return {dim3(static_cast<unsigned>(blocks)), dim3(threads), 0};
}

// A warp per row, for the per-row sums of the backward.
inline LaunchConfig cross_entropy_warp_per_row_config(int64_t rows, const LaunchLimits& limits) {
  const int64_t rows_per_block = kWarpRowThreads / kWarpSize;
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>(limits.sm_count * 32, (rows + rows_per_block - 1) / rows_per_block));
  return {dim3(static_cast<unsigned>(blocks)), dim3(kWarpRowThreads), 0};
}

// The backward's elementwise kernel: a grid-stride loop over rows * classes elements.
inline LaunchConfig cross_entropy_elementwise_config(int64_t elements, const LaunchLimits& limits) {
  return grid_stride_config(elements, kElementwiseThreads, 8, limits);
}

// A single block for the deterministic batch reductions.
inline LaunchConfig cross_entropy_reduce_config(const LaunchLimits& limits) {
  return {dim3(1), dim3(std::min(kBatchReduceThreads, limits.max_threads_per_block)), 0};
}

// True when every row of a (rows, classes) tensor starting at p can be read in aligned packs.
template <typename T>
FUSED_MLP_HD bool rows_are_packable(const T* p, int64_t classes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && classes % kVec<T> == 0;
}

// --- forward ----------------------------------------------------------------------------------

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* input;        // (rows, classes)
  const int64_t* target;        // (rows,) class indices, or null
  const scalar_t* prob_target;  // (rows, classes) probabilities, or null
  const scalar_t* weight;       // (classes,) or null
  int64_t rows, classes, ignore_index;
  double label_smoothing;
  at::opmath_type<scalar_t>* row_loss;  // (rows,)
  double* logsumexp;                    // (rows,)
};

// The coefficient of class c of a row, for the smoothing / probability-target sums.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t class_coef(const ForwardArgs<scalar_t>& a, int64_t row, int64_t c, acc_t keep,
                                            acc_t spread) {
  const acc_t w = a.weight ? static_cast<acc_t>(a.weight[c]) : acc_t(1);
  if (a.prob_target) return w * (static_cast<acc_t>(a.prob_target[row * a.classes + c]) * keep + spread);
  return w;
}

// sum_c coef_c (lse - x_c), the smoothing / probability-target sum of a row, from its reduced
// statistics: coef_sum * log_sum - coef_dot. Where a coefficient is NaN or inf (a class weight or
// a target probability) and the logits are finite, that difference can be inf - inf where stock's
// sum of its per-class terms is inf: such a row is summed class by class, by this one thread.
template <typename scalar_t, typename acc_t>
__device__ acc_t coef_term(const ForwardArgs<scalar_t>& a, int64_t row, acc_t m, acc_t log_sum, acc_t coef_sum,
                           acc_t coef_dot, acc_t keep, acc_t spread) {
  if (!is_finite(m) || (is_finite(coef_sum) && is_finite(coef_dot))) return coef_sum * log_sum - coef_dot;
  acc_t s = 0;
  for (int64_t c = 0; c < a.classes; ++c) {
    const acc_t x = static_cast<acc_t>(a.input[row * a.classes + c]);
    s += class_coef<scalar_t, acc_t>(a, row, c, keep, spread) * ((m - x) + log_sum);
  }
  return s;
}

// Finishes one row from its reduced statistics (every thread may call it; one writes).
template <typename scalar_t, typename acc_t>
__device__ void finish_row(const ForwardArgs<scalar_t>& a, int64_t row, acc_t m, acc_t sumexp, acc_t coef_sum,
                           acc_t coef_dot, acc_t keep, acc_t spread, bool smoothing) {
  const bool finite = is_finite(m);
  const acc_t log_sum = finite ? acc_log(sumexp) : acc_t(NAN);
  acc_t loss;
  if (a.prob_target) {
    loss = coef_term<scalar_t, acc_t>(a, row, m, log_sum, coef_sum, coef_dot, keep, spread);
  } else {
    const int64_t t = a.target[row];
    if (t == a.ignore_index) {
      loss = 0;
    } else {
      FUSED_MLP_DEVICE_ASSERT(t >= 0 && t < a.classes);
      const acc_t w = a.weight ? static_cast<acc_t>(a.weight[t]) : acc_t(1);
      loss = w * ((m - static_cast<acc_t>(a.input[row * a.classes + t])) + log_sum);
      if (smoothing)
        loss = keep * loss + spread * coef_term<scalar_t, acc_t>(a, row, m, log_sum, coef_sum, coef_dot, keep, spread);
    }
  }
  a.row_loss[row] = loss;
  a.logsumexp[row] = finite ? static_cast<double>(m) + static_cast<double>(log_sum) : static_cast<double>(NAN);
}

// The statistics of one row, strided over `lanes` threads starting at `lane`, then combined by
// `reduce_max` / `reduce_sum` (a warp's or a block's).
template <typename scalar_t, typename acc_t, typename MaxFn, typename SumFn>
__device__ void row_forward(const ForwardArgs<scalar_t>& a, int64_t row, int lane, int lanes, MaxFn reduce_max,
                            SumFn reduce_sum) {
  const scalar_t* x = a.input + row * a.classes;
  const acc_t keep = acc_t(1) - static_cast<acc_t>(a.label_smoothing);
  const acc_t spread = static_cast<acc_t>(a.label_smoothing) / static_cast<acc_t>(a.classes);
  const bool need_coef = a.prob_target != nullptr || a.label_smoothing > 0.f;
  constexpr int N = kVec<scalar_t>;
  using P = Pack<scalar_t, N>;
  const bool packed = rows_are_packable(a.input, a.classes);  // then each row is 16-byte aligned too
  acc_t m = acc_t(-INFINITY);
  if (packed) {
    for (int64_t p = lane; p < a.classes / N; p += lanes) {
      const P pk = reinterpret_cast<const P*>(x)[p];
#pragma unroll
      for (int j = 0; j < N; ++j) m = max_propagating_nan(m, static_cast<acc_t>(pk.v[j]));
    }
  } else {
    for (int64_t c = lane; c < a.classes; c += lanes) m = max_propagating_nan(m, static_cast<acc_t>(x[c]));
  }
  m = reduce_max(m);
  const acc_t ref = (m == acc_t(-INFINITY) || !is_finite(m)) ? acc_t(0) : m;  // all -inf: exp gives 0
  acc_t sumexp = 0, coef_sum = 0, coef_dot = 0;
  auto accumulate = [&](int64_t c, acc_t value) {
    const acc_t d = value - ref;
    sumexp += acc_exp(d);
    if (need_coef) {
      const acc_t k = class_coef<scalar_t, acc_t>(a, row, c, keep, spread);
      coef_sum += k;
      coef_dot += k * d;
    }
  };
  if (packed) {
    for (int64_t p = lane; p < a.classes / N; p += lanes) {
      const P pk = reinterpret_cast<const P*>(x)[p];
#pragma unroll
      for (int j = 0; j < N; ++j) accumulate(p * N + j, static_cast<acc_t>(pk.v[j]));
    }
  } else {
    for (int64_t c = lane; c < a.classes; c += lanes) accumulate(c, static_cast<acc_t>(x[c]));
  }
  sumexp = reduce_sum(sumexp);
  if (need_coef) {
    coef_sum = reduce_sum(coef_sum);
    coef_dot = reduce_sum(coef_dot);
  }
  if (lane == 0) finish_row<scalar_t, acc_t>(a, row, m, sumexp, coef_sum, coef_dot, keep, spread, need_coef);
}

// Short rows: kLanes lanes per row (32 / kLanes rows per warp), each lane holding kPerLane of the
// row's values in registers, so the row is read from memory once.
template <typename scalar_t, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kWarpRowThreads) cross_entropy_forward_warp_rows(ForwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerWarp = kWarpSize / kLanes;
  const int lane = threadIdx.x % kWarpSize, sub = lane % kLanes;
  const int64_t rows_per_block = (blockDim.x / kWarpSize) * kRowsPerWarp;
  const acc_t keep = acc_t(1) - static_cast<acc_t>(a.label_smoothing);
  const acc_t spread = static_cast<acc_t>(a.label_smoothing) / static_cast<acc_t>(a.classes);
  const bool need_coef = a.prob_target != nullptr || a.label_smoothing > 0.0;
  // Every lane of a warp runs the same iterations, so every shuffle sees the whole warp; lanes
  // past the last row compute on -inf and write nothing.
  for (int64_t base = blockIdx.x * rows_per_block + (threadIdx.x / kWarpSize) * kRowsPerWarp; base < a.rows;
       base += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = base + lane / kLanes;
    const bool valid = row < a.rows;
    const scalar_t* x = a.input + (valid ? row : 0) * a.classes;
    acc_t v[kPerLane];
    acc_t m = acc_t(-INFINITY);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t c = sub + static_cast<int64_t>(i) * kLanes;
      v[i] = (valid && c < a.classes) ? static_cast<acc_t>(x[c]) : acc_t(-INFINITY);
      m = max_propagating_nan(m, v[i]);
    }
    m = warp_max<acc_t, kLanes>(m);
    const acc_t ref = (m == acc_t(-INFINITY) || !is_finite(m)) ? acc_t(0) : m;
    acc_t sumexp = 0, coef_sum = 0, coef_dot = 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t c = sub + static_cast<int64_t>(i) * kLanes;
      if (valid && c < a.classes) {
        const acc_t d = v[i] - ref;
        sumexp += acc_exp(d);
        if (need_coef) {
          const acc_t k = class_coef<scalar_t, acc_t>(a, row, c, keep, spread);
          coef_sum += k;
          coef_dot += k * d;
        }
      }
    }
    sumexp = warp_sum<acc_t, kLanes>(sumexp);
    coef_sum = warp_sum<acc_t, kLanes>(coef_sum);
    coef_dot = warp_sum<acc_t, kLanes>(coef_dot);
    if (valid && sub == 0) {
      finish_row<scalar_t, acc_t>(a, row, m, sumexp, coef_sum, coef_dot, keep, spread, need_coef);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockRowThreads) cross_entropy_forward_block_rows(ForwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    row_forward<scalar_t, acc_t>(
        a, row, threadIdx.x, blockDim.x, [](acc_t v) { return block_reduce<acc_t, true>(v); },
        [](acc_t v) { return block_reduce<acc_t, false>(v); });
  }
}

// The register-resident warp kernel instantiated for the row width of args.classes; `launch` is
// the caller's launch policy, launch(config, kernel, args...).
template <typename scalar_t, typename Launch>
void launch_warp_rows(const Launch& launch, const LaunchConfig& cfg, const ForwardArgs<scalar_t>& args) {
  switch (cross_entropy_lanes_per_row(args.classes)) {
    case 1:
      return launch(cfg, cross_entropy_forward_warp_rows<scalar_t, 1, 1>, args);
    case 2:
      return launch(cfg, cross_entropy_forward_warp_rows<scalar_t, 2, 1>, args);
    case 4:
      return launch(cfg, cross_entropy_forward_warp_rows<scalar_t, 4, 1>, args);
    case 8:
      return launch(cfg, cross_entropy_forward_warp_rows<scalar_t, 8, 1>, args);
    case 16:
      return launch(cfg, cross_entropy_forward_warp_rows<scalar_t, 16, 1>, args);
    default:
      break;
  }
  switch (cross_entropy_values_per_lane(args.classes)) {
    case 1:
      return launch(cfg, cross_entropy_forward_warp_rows<scalar_t, 32, 1>, args);
    case 2:
      return launch(cfg, cross_entropy_forward_warp_rows<scalar_t, 32, 2>, args);
    case 4:
      return launch(cfg, cross_entropy_forward_warp_rows<scalar_t, 32, 4>, args);
    case 8:
      return launch(cfg, cross_entropy_forward_warp_rows<scalar_t, 32, 8>, args);
    case 16:
      return launch(cfg, cross_entropy_forward_warp_rows<scalar_t, 32, 16>, args);
    default:
      return launch(cfg, cross_entropy_forward_warp_rows<scalar_t, 32, 32>, args);
  }
}

// --- batch reductions (one block, fixed order) ------------------------------------------------

// out[0] = the divisor of reduction='mean' (the summed weight of the non-ignored targets, or the
// row count for probability targets); out[1] = the sum of the class weights (or the class count).
template <typename scalar_t>
__global__ void __launch_bounds__(kBatchReduceThreads)
    cross_entropy_batch_scalars(const int64_t* target, const scalar_t* weight, int64_t rows, int64_t classes,
                                int64_t ignore_index, double* out) {
  double divisor = 0, weight_total = 0;
  if (target == nullptr) {
    divisor = threadIdx.x == 0 ? static_cast<double>(rows) : 0.0;
  } else {
    for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
      const int64_t t = target[i];
      if (t == ignore_index) continue;
      FUSED_MLP_DEVICE_ASSERT(t >= 0 && t < classes);
      divisor += weight ? static_cast<double>(weight[t]) : 1.0;
    }
  }
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x)
    weight_total += weight ? static_cast<double>(weight[c]) : 1.0;
  divisor = block_reduce<double, false>(divisor);
  weight_total = block_reduce<double, false>(weight_total);
  if (threadIdx.x == 0) {
    out[0] = divisor;
    out[1] = weight_total;
  }
}

// The mean or sum of the per-row losses into out (a scalar), dividing by scalars[0] for mean.
template <typename scalar_t>
__global__ void __launch_bounds__(kBatchReduceThreads)
    cross_entropy_reduce_loss(const at::opmath_type<scalar_t>* row_loss, int64_t rows,
                              at::Reduction::Reduction reduction, const double* scalars, scalar_t* out) {
  double total = 0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) total += static_cast<double>(row_loss[i]);
  total = block_reduce<double, false>(total);
  if (threadIdx.x == 0) {
    if (reduction == at::Reduction::Mean) total /= scalars[0];  // 0 / 0 = NaN when every target is ignored
    out[0] = static_cast<scalar_t>(total);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    cross_entropy_write_row_losses(const at::opmath_type<scalar_t>* row_loss, int64_t rows, scalar_t* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<scalar_t>(row_loss[i]);
  }
}

// --- backward ---------------------------------------------------------------------------------

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* grad_loss;  // (rows,) for reduction none, else a scalar
  int64_t grad_stride;
  const scalar_t* input;
  const int64_t* target;
  const scalar_t* prob_target;
  const scalar_t* weight;
  const double* logsumexp;
  const double* scalars;                       // cross_entropy_batch_scalars' output
  const at::opmath_type<scalar_t>* prob_mass;  // (rows,) sum_c coef_c, probability targets
  int64_t rows, classes, ignore_index;
  at::Reduction::Reduction reduction;
  double label_smoothing;
  scalar_t* grad_input;
};

// sum_c coef_c of each row of a probability target (a warp per row).
template <typename scalar_t>
__global__ void __launch_bounds__(kWarpRowThreads)
    cross_entropy_prob_mass(ForwardArgs<scalar_t> a, at::opmath_type<scalar_t>* mass) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t keep = acc_t(1) - static_cast<acc_t>(a.label_smoothing);
  const acc_t spread = static_cast<acc_t>(a.label_smoothing) / static_cast<acc_t>(a.classes);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    acc_t s = 0;
    for (int64_t c = lane; c < a.classes; c += kWarpSize) s += class_coef<scalar_t, acc_t>(a, row, c, keep, spread);
    s = warp_sum(s);
    if (lane == 0) mass[row] = s;
  }
}

// grad[row, c] = scale * (softmax * a - b_c): grid-stride over the elements, in aligned packs of
// kVec when every row can be read that way, else one by one.
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads) cross_entropy_backward_elementwise(BackwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int N = kVec<scalar_t>;
  const acc_t keep = acc_t(1) - static_cast<acc_t>(a.label_smoothing);
  const acc_t spread = static_cast<acc_t>(a.label_smoothing) / static_cast<acc_t>(a.classes);
  // Without smoothing no other class's weight enters a row's gradient (0 * a NaN or inf weight
  // would be NaN): a non-finite weight stays in the rows of its class.
  const bool smoothing = a.label_smoothing > 0;
  // One element's gradient, given its row's terms.
  struct Row {
    int state;  // 0: compute; 1: zero (ignored target); 2: NaN (non-finite logits)
    int64_t t;
    acc_t scale, hi, lo, w_t, mass;
  };
  auto row_terms = [&](int64_t row) {
    Row r{0, -1, 0, 0, 0, 0, 0};
    const double lse = a.logsumexp[row];
    if (is_nan(lse)) {
      r.state = 2;
      return r;
    }
    r.t = a.target ? a.target[row] : -1;
    if (a.target && r.t == a.ignore_index) {
      r.state = 1;
      return r;
    }
    r.scale = a.reduction == at::Reduction::None ? static_cast<acc_t>(a.grad_loss[row * a.grad_stride])
                                                 : static_cast<acc_t>(a.grad_loss[0]);
    if (a.reduction == at::Reduction::Mean) r.scale = static_cast<acc_t>(static_cast<double>(r.scale) / a.scalars[0]);
    r.hi = static_cast<acc_t>(lse);
    r.lo = static_cast<acc_t>(lse - static_cast<double>(r.hi));
    if (a.prob_target) {
      r.mass = a.prob_mass[row];
    } else {
      FUSED_MLP_DEVICE_ASSERT(r.t >= 0 && r.t < a.classes);
      r.w_t = a.weight ? static_cast<acc_t>(a.weight[r.t]) : acc_t(1);
      r.mass = smoothing ? keep * r.w_t + spread * static_cast<acc_t>(a.scalars[1]) : r.w_t;
    }
    return r;
  };
  auto element = [&](const Row& r, int64_t i, int64_t c, acc_t x) -> scalar_t {
    if (r.state != 0) return static_cast<scalar_t>(r.state == 1 ? acc_t(0) : acc_t(NAN));
    const acc_t p = acc_exp((x - r.hi) - r.lo);
    const acc_t w_c = a.weight ? static_cast<acc_t>(a.weight[c]) : acc_t(1);
    acc_t coef;
    if (a.prob_target) {
      coef = w_c * (static_cast<acc_t>(a.prob_target[i]) * keep + spread);
    } else {
      coef = (smoothing ? spread * w_c : acc_t(0)) + (c == r.t ? keep * r.w_t : acc_t(0));
    }
    return static_cast<scalar_t>(r.scale * (p * r.mass - coef));
  };
  const int64_t total = a.rows * a.classes;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (rows_are_packable(a.input, a.classes) && rows_are_packable(a.grad_input, a.classes)) {
    using P = Pack<scalar_t, N>;
    for (int64_t p = first; p < total / N; p += stride) {
      const int64_t i0 = p * N, row = i0 / a.classes;  // a pack never straddles two rows
      const Row r = row_terms(row);
      const P in = reinterpret_cast<const P*>(a.input)[p];
      P out;
#pragma unroll
      for (int j = 0; j < N; ++j) out.v[j] = element(r, i0 + j, i0 + j - row * a.classes, static_cast<acc_t>(in.v[j]));
      reinterpret_cast<P*>(a.grad_input)[p] = out;
    }
    return;
  }
  for (int64_t i = first; i < total; i += stride) {
    const int64_t row = i / a.classes;
    a.grad_input[i] = element(row_terms(row), i, i - row * a.classes, static_cast<acc_t>(a.input[i]));
  }
}

}  // namespace fused_mlp::cuda
