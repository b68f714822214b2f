// Device code of the fused Linear -> BatchNorm1d -> ReLU -> Dropout: the kernels around the GEMMs,
// their __device__ helpers and their launch configurations. Free of host-only syntax, so nvcc
// compiles it for a GPU and g++ runs it under the CUDA simulation (docs/cuda_simulation.md). The
// host sequence is linear_bn_relu_host.h. The maths is the CPU kernel's (docs/linear_bn_relu.md).
//
// z is the (N, C) pre-BN activation, row-major, so a feature is a column.
//   statistics:  per thread a Welford state over its rows of kF adjacent features; a fixed-order
//                merge down the block's row lanes; one partial state per row chunk; then one
//                thread per feature merges the chunks in order. No atomics: deterministic.
//   epilogue:    elementwise over groups of four consecutive elements, the unit of one Philox
//                block, so each group draws its four dropout decisions with a single call.
//   backward:    the per-feature sums of dy and dy * zhat in one pass over (grad, z), built like
//                the statistics; then dz in a second pass. Both recompute the ReLU and dropout
//                masks rather than reading a stored dy.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/philox.h"
#include "common/welford.h"
#include "cuda/device_common.cuh"

namespace fused_mlp::cuda {

constexpr int kFeatureLanes = 32;  // a column reduction's threads across features
constexpr int kRowLanes = 8;       // ... and down the rows
constexpr int kColumnReduceThreads = kFeatureLanes * kRowLanes;
constexpr int kGroup = 4;  // elements per Philox block
constexpr int kFeatureThreads = 256;
constexpr int kWarpPerFeatureThreads = 128;
constexpr int kSeedOffsetThreads = 1;

// A column reduction (per feature, over the rows of (N, C)) runs a block per tile of
// kFeatureLanes * kF features and chunk of rows; the last chunk may be shorter.
inline int64_t bn_feature_tiles(int64_t C, int features_per_thread) {
  const int64_t tile = static_cast<int64_t>(kFeatureLanes) * features_per_thread;
  return std::max<int64_t>(1, (C + tile - 1) / tile);
}

// About four blocks per SM in all, and every chunk at least one row per row lane. N >= 1.
inline int64_t bn_rows_per_chunk(int64_t N, int64_t C, int features_per_thread, const LaunchLimits& limits) {
  const int64_t tiles = bn_feature_tiles(C, features_per_thread);
  const int64_t wanted = std::max<int64_t>(1, (static_cast<int64_t>(limits.sm_count) * 4) / tiles);
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(65535, (N + kRowLanes - 1) / kRowLanes));
  const int64_t first_guess = std::min(wanted, most);
  return (N + first_guess - 1) / first_guess;
}

inline int64_t bn_chunk_count(int64_t N, int64_t rows_per_chunk) {
  return (N + rows_per_chunk - 1) / rows_per_chunk;
}

// grid.x: the feature tiles, grid.y: the chunks of rows.
inline LaunchConfig bn_column_reduce_config(int64_t C, int features_per_thread, int64_t chunks) {
  const unsigned tiles = static_cast<unsigned>(bn_feature_tiles(C, features_per_thread));
  return {dim3(tiles, static_cast<unsigned>(chunks)), dim3(kColumnReduceThreads), 0};
}

// A grid-stride loop over `items` work items (groups of four elements, or elements).
inline LaunchConfig bn_elementwise_config(int64_t items, const LaunchLimits& limits) {
  return grid_stride_config(items, kElementwiseThreads, 8, limits);
}

// One thread per feature.
inline LaunchConfig bn_feature_config(int64_t C, const LaunchLimits& limits) {
  return grid_stride_config(C, kFeatureThreads, 4, limits);
}

// One warp per feature (a row of the (C, K) weight).
inline LaunchConfig bn_warp_per_feature_config(int64_t C, const LaunchLimits& limits) {
  const int64_t per_block = kWarpPerFeatureThreads / kWarpSize;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(limits.sm_count * 32, (C + per_block - 1) / per_block));
  return {dim3(static_cast<unsigned>(blocks)), dim3(kWarpPerFeatureThreads), 0};
}

// The single thread that writes a dropout (seed, offset).
inline LaunchConfig write_seed_offset_config() {
  return {dim3(1), dim3(kSeedOffsetThreads), 0};
}

// True when p can be read in aligned packs of four elements from any multiple-of-four index.
template <typename T>
FUSED_MLP_HD bool packs_of_four(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kGroup) == 0;
}

FUSED_MLP_HD int64_t min_i64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// ReLU as torch.relu computes it: negative values become +0; NaN, +inf and -0 pass unchanged
// (fmaxf(x, 0) would turn NaN into 0, and -0 into +0).
template <typename T>
FUSED_MLP_HD T relu(T x) {
  return x < T(0) ? T(0) : x;
}

// --- dropout ------------------------------------------------------------------------------------

// What a kernel needs to regenerate a mask: (seed, offset) in device memory (so a CUDA graph
// replays fresh values), p, and the survivors' scale. p == 0: no dropout.
struct DropoutArgs {
  const int64_t* seed_offset;
  float p;
  double scale;
};

struct DropoutKey {
  bool active;
  float p;
  uint32_t key0, key1;
  uint64_t offset;
};

__device__ __forceinline__ DropoutKey load_dropout_key(const DropoutArgs& d) {
  if (!(d.p > 0.f)) return {false, 0.f, 0u, 0u, 0};
  const uint64_t seed = static_cast<uint64_t>(d.seed_offset[0]);
  return {true, d.p, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
          static_cast<uint64_t>(d.seed_offset[1])};
}

// The multipliers (scale if kept, else 0; 1 without dropout) of elements i0 .. i0 + 3, i0 % 4 == 0.
template <typename acc_t>
__device__ __forceinline__ void group_multipliers(const DropoutKey& k, int64_t i0, acc_t scale, acc_t (&m)[kGroup]) {
  if (!k.active) {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) m[j] = acc_t(1);
    return;
  }
  const Philox4x32 r = philox4x32_10(dropout_counter(static_cast<uint64_t>(i0), k.offset), k.key0, k.key1);
#pragma unroll
  for (int j = 0; j < kGroup; ++j) m[j] = dropout_keep(r.v[j], k.p) ? scale : acc_t(0);
}

// The multiplier of element i alone (a group that straddles two rows of a reduction's tile).
template <typename acc_t>
__device__ __forceinline__ acc_t element_multiplier(const DropoutKey& k, int64_t i, acc_t scale) {
  if (!k.active) return acc_t(1);
  const Philox4x32 r = philox4x32_10(dropout_counter(static_cast<uint64_t>(i), k.offset), k.key0, k.key1);
  // Selected, not indexed (r.v[i % 4]): after a dynamic index into r, nvcc 13.0 no longer treats
  // the calling kernel's __restrict__ locals as restrict.
  const int j = static_cast<int>(i % kGroup);
  const uint32_t word = j == 0 ? r.v[0] : j == 1 ? r.v[1] : j == 2 ? r.v[2] : r.v[3];
  return dropout_keep(word, k.p) ? scale : acc_t(0);
}

// --- loads and stores of a group of four elements -------------------------------------------------

// Elements i0 .. i0 + n - 1 (n <= 4) of p as acc_t; one aligned pack when `packed` and n == 4.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_group(const scalar_t* p, int64_t i0, int n, bool packed, acc_t (&v)[kGroup]) {
  if (packed && n == kGroup) {
    const Pack<scalar_t, kGroup> pk = *reinterpret_cast<const Pack<scalar_t, kGroup>*>(p + i0);
#pragma unroll
    for (int j = 0; j < kGroup; ++j) v[j] = static_cast<acc_t>(pk.v[j]);
    return;
  }
#pragma unroll
  for (int j = 0; j < kGroup; ++j) v[j] = j < n ? static_cast<acc_t>(p[i0 + j]) : acc_t(0);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_group(scalar_t* p, int64_t i0, int n, bool packed, const acc_t (&v)[kGroup]) {
  if (packed && n == kGroup) {
    Pack<scalar_t, kGroup> pk;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) pk.v[j] = static_cast<scalar_t>(v[j]);
    *reinterpret_cast<Pack<scalar_t, kGroup>*>(p + i0) = pk;
    return;
  }
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    if (j < n) p[i0 + j] = static_cast<scalar_t>(v[j]);
  }
}

// The features of elements i0 .. i0 + 3 of an (N, C) matrix.
__device__ __forceinline__ void group_features(int64_t i0, int64_t C, int64_t (&f)[kGroup]) {
  int64_t c = i0 % C;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
    f[j] = c;
    c = c + 1 == C ? 0 : c + 1;
  }
}

// kF adjacent features f0 .. f0 + kF - 1 of one row; with kF == 4, C % 4 == 0 and the row aligned,
// so a tile either holds all four or none.
template <int kF, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_features(const scalar_t* row, int64_t f0, int64_t C, acc_t (&v)[kF]) {
  if constexpr (kF == kGroup) {
    if (f0 < C) {
      const Pack<scalar_t, kGroup> pk = *reinterpret_cast<const Pack<scalar_t, kGroup>*>(row + f0);
#pragma unroll
      for (int j = 0; j < kF; ++j) v[j] = static_cast<acc_t>(pk.v[j]);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < kF; ++j) v[j] = f0 + j < C ? static_cast<acc_t>(row[f0 + j]) : acc_t(0);
}

// --- argument structs -----------------------------------------------------------------------------

// The kernels take their arguments as one struct by value. nvcc ignores __restrict__ on a struct's
// members but honours it on locals (nvcc 13.0), so each kernel rebinds the pointers it reads as
// __restrict__ locals: that lets it load the inputs through the read-only path (ld.global.nc).

// The batch statistics of the pre-BN activation z: bn_stats_partial reduces each chunk of rows,
// bn_stats_finalize merges the chunks.
template <typename scalar_t>
struct BatchStatsArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* z;  // (N, C)
  int64_t N, C, rows_per_chunk, chunks;
  double eps;
  const acc_t* gamma;  // (C,), or null: 1
  const acc_t* beta;   // (C,), or null: 0
  acc_t* part_mean;    // (chunks, C): each chunk's mean and M2
  acc_t* part_m2;
  acc_t* mean;    // (C,)
  acc_t* invstd;  // (C,) 1 / sqrt(biased variance + eps)
  acc_t* var;     // (C,) unbiased
  acc_t* affine;  // (2C,) A = gamma * invstd, then B = beta - mean * A
};

// out = relu(in * A + B) * dropout, elementwise. The training epilogue takes the folded BN affine;
// the eval one runs in place on the GEMM's output with the folded bias as B.
template <typename scalar_t>
struct AffineReluDropoutArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in;  // (N, C)
  const acc_t* A;      // (C,), or null: 1
  const acc_t* B;      // (C,), or null: 0
  int64_t numel, C;
  bool packed;  // in and out can be read and written in aligned packs of four
  DropoutArgs dropout;
  scalar_t* out;  // may alias in
};

// The folded BN affine from given statistics, and optionally the bias folded through it.
template <typename scalar_t>
struct BnAffineArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t C;
  const acc_t* gamma;  // (C,), or null: 1
  const acc_t* beta;   // (C,), or null: 0
  const acc_t* mean;   // (C,)
  const acc_t* invstd;
  const scalar_t* bias;  // (C,), or null: 0
  acc_t* affine;         // (2C,) A, then B
  acc_t* folded_bias;    // (C,), or null: not wanted
};

// The BatchNorm part of the backward: bn_backward_partial sums dy and dy * zhat over each chunk of
// rows, bn_backward_finalize merges the chunks, bn_backward_input writes dz.
template <typename scalar_t>
struct BnBackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad;   // (N, C) the gradient of the layer's output
  const scalar_t* saved;  // (N, C) z with batch statistics, the output with running statistics
  int64_t N, C, rows_per_chunk, chunks;
  int64_t count;  // the rows the sums are over: N, or every process's rows once they are all-reduced
  bool use_batch_stats;
  bool packed;          // grad, saved and dz can be read and written in aligned packs of four
  const acc_t* affine;  // (2C,) A, then B
  const acc_t* mean;    // (C,)
  const acc_t* invstd;  // (C,)
  DropoutArgs dropout;
  acc_t* part_dy;  // (chunks, C): each chunk's sums
  acc_t* part_dy_zhat;
  acc_t* sum_dy;  // (C,)
  acc_t* sum_dy_zhat;
  acc_t* coef;          // (2C,) c1 = sum_dy / count, then c2 = sum_dy_zhat / count (batch statistics)
  scalar_t* dz;         // (N, C)
  scalar_t* grad_bias;  // (C,) the Linear bias's gradient with batch statistics, or null: not wanted
};

// The gradients of the unfolded parameters from dL/dW' of the folded weight W' = W * A.
template <typename scalar_t>
struct FoldedWeightGradArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* G;       // (C, K) dL/dW'
  const scalar_t* weight;  // (C, K)
  const scalar_t* bias;    // (C,), or null: 0
  const acc_t* affine;     // (2C,) A, then B
  const acc_t* mean;       // (C,)
  const acc_t* invstd;     // (C,)
  const acc_t* sum_dy;     // (C,)
  int64_t C, K;
  scalar_t* grad_weight;  // (C, K)
  acc_t* grad_gamma;      // (C,)
  scalar_t* grad_bias;    // (C,)
};

// --- forward, batch statistics ------------------------------------------------------------------

// Each block: kFeatureLanes * kF features by one chunk of rows. Writes the chunk's mean and M2 of
// each feature to part_mean / part_m2 at [chunk * C + feature].
template <typename scalar_t, int kF>
__global__ void __launch_bounds__(kColumnReduceThreads) bn_stats_partial(BatchStatsArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ z = a.z;
  acc_t* __restrict__ part_mean = a.part_mean;
  acc_t* __restrict__ part_m2 = a.part_m2;
  const int64_t N = a.N, C = a.C;
  __shared__ acc_t s_mean[kRowLanes][kFeatureLanes * kF];
  __shared__ acc_t s_m2[kRowLanes][kFeatureLanes * kF];
  __shared__ acc_t s_count[kRowLanes];
  const int lane = threadIdx.x % kFeatureLanes, row_lane = threadIdx.x / kFeatureLanes;
  const int64_t f0 = static_cast<int64_t>(blockIdx.x) * kFeatureLanes * kF + lane * kF;
  const int64_t chunk = blockIdx.y;
  const int64_t r_end = min_i64(N, (chunk + 1) * a.rows_per_chunk);
  acc_t count = 0, mean[kF], m2[kF];
#pragma unroll
  for (int j = 0; j < kF; ++j) mean[j] = m2[j] = acc_t(0);
  for (int64_t r = chunk * a.rows_per_chunk + row_lane; r < r_end; r += kRowLanes) {
    acc_t v[kF];
    load_features<kF>(z + r * C, f0, C, v);
    count += acc_t(1);
    const acc_t inv_count = reciprocal(count);  // one per row, not a division per feature
#pragma unroll
    for (int j = 0; j < kF; ++j) {
      const acc_t d = v[j] - mean[j];
      // Once inf or NaN is in, the mean is what a plain sum gives (see welford_merge).
      mean[j] = is_finite(mean[j]) ? mean[j] + d * inv_count : mean[j] + v[j];
      m2[j] += d * (v[j] - mean[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kF; ++j) {
    s_mean[row_lane][lane * kF + j] = mean[j];
    s_m2[row_lane][lane * kF + j] = m2[j];
  }
  if (lane == 0) s_count[row_lane] = count;
  __syncthreads();
  if (row_lane == 0) {
#pragma unroll
    for (int j = 0; j < kF; ++j) {
      WelfordState<acc_t, acc_t> s{mean[j], m2[j], count};
      // Not unrolled: each merge divides, and kRowLanes division slow-path calls in a row made
      // ptxas spill.
#pragma unroll 1
      for (int k = 1; k < kRowLanes; ++k) {
        s = welford_merge_or_empty(
            s, WelfordState<acc_t, acc_t>{s_mean[k][lane * kF + j], s_m2[k][lane * kF + j], s_count[k]});
      }
      if (f0 + j < C) {
        part_mean[chunk * C + f0 + j] = s.mean;
        part_m2[chunk * C + f0 + j] = s.m2;
      }
    }
  }
}

// Per feature: merges the chunks in order; writes mean, invstd, the unbiased variance and the
// folded affine.
template <typename scalar_t>
__global__ void __launch_bounds__(kFeatureThreads) bn_stats_finalize(BatchStatsArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* __restrict__ part_mean = a.part_mean;
  const acc_t* __restrict__ part_m2 = a.part_m2;
  const acc_t* __restrict__ gamma = a.gamma;
  const acc_t* __restrict__ beta = a.beta;
  acc_t* __restrict__ mean = a.mean;
  acc_t* __restrict__ invstd = a.invstd;
  acc_t* __restrict__ var = a.var;
  acc_t* __restrict__ affine = a.affine;
  const int64_t N = a.N, C = a.C, rows_per_chunk = a.rows_per_chunk;
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < C;
       f += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    WelfordState<acc_t, acc_t> s{part_mean[f], part_m2[f], static_cast<acc_t>(min_i64(rows_per_chunk, N))};
    for (int64_t c = 1; c < a.chunks; ++c) {
      const acc_t rows = static_cast<acc_t>(min_i64(rows_per_chunk, N - c * rows_per_chunk));
      s = welford_merge(s, WelfordState<acc_t, acc_t>{part_mean[c * C + f], part_m2[c * C + f], rows});
    }
    const acc_t is = static_cast<acc_t>(1.0 / sqrt(static_cast<double>(s.m2 / s.count) + a.eps));
    mean[f] = s.mean;
    invstd[f] = is;
    var[f] = s.m2 / (s.count - acc_t(1));
    const acc_t A = (gamma ? gamma[f] : acc_t(1)) * is;
    affine[f] = A;
    affine[C + f] = (beta ? beta[f] : acc_t(0)) - s.mean * A;
  }
}

// Elementwise over groups of four, A and B per feature.
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads) affine_relu_dropout(AffineReluDropoutArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* __restrict__ A = a.A;
  const acc_t* __restrict__ B = a.B;
  const int64_t numel = a.numel;
  const DropoutKey key = load_dropout_key(a.dropout);
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i0 = g * kGroup;
    const int n = static_cast<int>(min_i64(kGroup, numel - i0));
    acc_t v[kGroup], m[kGroup];
    int64_t f[kGroup];
    load_group(a.in, i0, n, a.packed, v);
    group_features(i0, a.C, f);
    group_multipliers(key, i0, static_cast<acc_t>(a.dropout.scale), m);
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const acc_t scaled = A ? v[j] * A[f[j]] : v[j];
      v[j] = relu(B ? scaled + B[f[j]] : scaled) * m[j];  // a dropped NaN or inf: NaN
    }
    store_group(a.out, i0, n, a.packed, v);
  }
}

// --- forward, running statistics (BN folded into the GEMM), and the folded-layer inference ----

// Per feature: A = gamma * invstd and B = beta - mean * A into affine; with folded_bias, also
// b' = bias * A + B.
template <typename scalar_t>
__global__ void __launch_bounds__(kFeatureThreads) bn_affine(BnAffineArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* __restrict__ gamma = a.gamma;
  const acc_t* __restrict__ beta = a.beta;
  const acc_t* __restrict__ mean = a.mean;
  const acc_t* __restrict__ invstd = a.invstd;
  const scalar_t* __restrict__ bias = a.bias;
  acc_t* __restrict__ affine = a.affine;
  acc_t* __restrict__ folded_bias = a.folded_bias;
  const int64_t C = a.C;
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < C;
       f += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const acc_t A = (gamma ? gamma[f] : acc_t(1)) * invstd[f];
    const acc_t B = (beta ? beta[f] : acc_t(0)) - mean[f] * A;
    affine[f] = A;
    affine[C + f] = B;
    if (folded_bias) folded_bias[f] = (bias ? static_cast<acc_t>(bias[f]) : acc_t(0)) * A + B;
  }
}

// out[f, k] = w[f, k] * scale[f] for the (C, K) weight: W' = W * A.
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    scale_weight_rows(const scalar_t* __restrict__ w, const at::opmath_type<scalar_t>* __restrict__ scale, int64_t C,
                      int64_t K, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t numel = C * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) * scale[i / K]);
  }
}

// --- backward -----------------------------------------------------------------------------------

// The incoming gradient through dropout and ReLU, for one element. As torch.relu's backward
// (threshold_backward), it stops where relu's output is <= 0 and passes elsewhere, NaN included.
//
// With batch statistics, from z: relu's input is z * A + B, and m the regenerated multiplier.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_through_relu_dropout(acc_t g, acc_t z, acc_t a, acc_t b, acc_t m) {
  return z * a + b <= acc_t(0) ? acc_t(0) : g * m;
}

// From the saved output out = relu(y) * m (element i): out <= 0 exactly where relu(y) <= 0 or the
// unit was dropped. A NaN output hides whether it was dropped: there m is regenerated.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_through_output(acc_t g, acc_t out, const DropoutKey& key, int64_t i,
                                                     acc_t kept_scale) {
  if (out <= acc_t(0)) return acc_t(0);
  if (key.active && is_nan(out)) return g * element_multiplier(key, i, kept_scale);
  return g * kept_scale;
}

// Pass 1: per chunk of rows and per feature, sum(dy) and (batch statistics) sum(dy * zhat), zhat =
// (z - mean) * invstd; built like bn_stats_partial.
template <typename scalar_t, int kF>
__global__ void __launch_bounds__(kColumnReduceThreads) bn_backward_partial(BnBackwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ grad = a.grad;
  const scalar_t* __restrict__ saved = a.saved;
  const acc_t* __restrict__ affine = a.affine;
  const acc_t* __restrict__ mean = a.mean;
  const acc_t* __restrict__ invstd = a.invstd;
  acc_t* __restrict__ part_dy = a.part_dy;
  acc_t* __restrict__ part_dy_zhat = a.part_dy_zhat;
  const int64_t N = a.N, C = a.C;
  const bool use_batch_stats = a.use_batch_stats;
  __shared__ acc_t s_dy[kRowLanes][kFeatureLanes * kF];
  __shared__ acc_t s_dyz[kRowLanes][kFeatureLanes * kF];
  const DropoutKey key = load_dropout_key(a.dropout);
  const acc_t scale = static_cast<acc_t>(a.dropout.scale);
  const acc_t kept_scale = key.active ? scale : acc_t(1);
  const int lane = threadIdx.x % kFeatureLanes, row_lane = threadIdx.x / kFeatureLanes;
  const int64_t f0 = static_cast<int64_t>(blockIdx.x) * kFeatureLanes * kF + lane * kF;
  const int64_t chunk = blockIdx.y;
  const int64_t r_end = min_i64(N, (chunk + 1) * a.rows_per_chunk);
  acc_t A[kF], B[kF], mu[kF], is[kF], sum_dy[kF], sum_dyz[kF];
#pragma unroll
  for (int j = 0; j < kF; ++j) {
    const bool in = f0 + j < C;
    A[j] = in ? affine[f0 + j] : acc_t(0);
    B[j] = in ? affine[C + f0 + j] : acc_t(0);
    mu[j] = in ? mean[f0 + j] : acc_t(0);
    is[j] = in ? invstd[f0 + j] : acc_t(0);
    sum_dy[j] = sum_dyz[j] = acc_t(0);
  }
  for (int64_t r = chunk * a.rows_per_chunk + row_lane; r < r_end; r += kRowLanes) {
    acc_t gv[kF], sv[kF], m[kF];
    load_features<kF>(grad + r * C, f0, C, gv);
    load_features<kF>(saved + r * C, f0, C, sv);
    if (use_batch_stats && key.active && f0 < C) {
      if constexpr (kF == kGroup) {
        group_multipliers(key, r * C + f0, scale, m);  // C % 4 == 0: the four features are one group
      } else {
#pragma unroll
        for (int j = 0; j < kF; ++j) m[j] = element_multiplier(key, r * C + f0 + j, scale);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kF; ++j) m[j] = acc_t(1);
    }
#pragma unroll
    for (int j = 0; j < kF; ++j) {
      const acc_t dy = use_batch_stats ? grad_through_relu_dropout(gv[j], sv[j], A[j], B[j], m[j])
                                       : grad_through_output(gv[j], sv[j], key, r * C + f0 + j, kept_scale);
      sum_dy[j] += dy;
      if (use_batch_stats) sum_dyz[j] += dy * ((sv[j] - mu[j]) * is[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kF; ++j) {
    s_dy[row_lane][lane * kF + j] = sum_dy[j];
    s_dyz[row_lane][lane * kF + j] = sum_dyz[j];
  }
  __syncthreads();
  if (row_lane == 0) {
#pragma unroll
    for (int j = 0; j < kF; ++j) {
      acc_t t_dy = sum_dy[j], t_dyz = sum_dyz[j];
      for (int k = 1; k < kRowLanes; ++k) {
        t_dy += s_dy[k][lane * kF + j];
        t_dyz += s_dyz[k][lane * kF + j];
      }
      if (f0 + j < C) {
        part_dy[chunk * C + f0 + j] = t_dy;
        part_dy_zhat[chunk * C + f0 + j] = t_dyz;
      }
    }
  }
}

// Per feature: the chunk sums in order into sum_dy and sum_dy_zhat; with batch statistics also
// c1 = sum_dy / count and c2 = sum_dy_zhat / count, the coefficients of
// dz = A * (dy - c1 - zhat * c2), and the Linear bias's gradient sum_n dz: zero, but NaN where a NaN
// or inf reached the feature's sums or its affine, as the sum of stock's dz would be.
template <typename scalar_t>
__global__ void __launch_bounds__(kFeatureThreads) bn_backward_finalize(BnBackwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* __restrict__ part_dy = a.part_dy;
  const acc_t* __restrict__ part_dy_zhat = a.part_dy_zhat;
  const acc_t* __restrict__ affine = a.affine;
  acc_t* __restrict__ sum_dy = a.sum_dy;
  acc_t* __restrict__ sum_dy_zhat = a.sum_dy_zhat;
  acc_t* __restrict__ coef = a.coef;
  scalar_t* __restrict__ grad_bias = a.grad_bias;
  const int64_t count = a.count, C = a.C;
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < C;
       f += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    acc_t s_dy = 0, s_dyz = 0;
    for (int64_t c = 0; c < a.chunks; ++c) {
      s_dy += part_dy[c * C + f];
      s_dyz += part_dy_zhat[c * C + f];
    }
    sum_dy[f] = s_dy;
    sum_dy_zhat[f] = s_dyz;
    if (a.use_batch_stats) {
      coef[f] = s_dy / static_cast<acc_t>(count);
      coef[C + f] = s_dyz / static_cast<acc_t>(count);
      if (grad_bias) grad_bias[f] = static_cast<scalar_t>((s_dy + s_dyz) * affine[f] * acc_t(0));
    }
  }
}

// Pass 2, elementwise over groups of four: dz = A * (dy - c1 - zhat * c2) (batch statistics; term
// by term as stock BatchNorm's backward, so a NaN or inf spreads to the same elements), or dz = dy
// (running statistics, where the GEMMs take the folded weight; also the whole ReLU and dropout
// backward of a layer without BatchNorm, where affine, coef and the sums are not read).
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads) bn_backward_input(BnBackwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ grad = a.grad;
  const scalar_t* __restrict__ saved = a.saved;
  const acc_t* __restrict__ affine = a.affine;
  const acc_t* __restrict__ coef = a.coef;
  const acc_t* __restrict__ mean = a.mean;
  const acc_t* __restrict__ invstd = a.invstd;
  scalar_t* __restrict__ dz = a.dz;
  const int64_t numel = a.N * a.C, C = a.C;
  const bool use_batch_stats = a.use_batch_stats;
  const DropoutKey key = load_dropout_key(a.dropout);
  const acc_t scale = static_cast<acc_t>(a.dropout.scale);
  const acc_t kept_scale = key.active ? scale : acc_t(1);
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i0 = g * kGroup;
    const int n = static_cast<int>(min_i64(kGroup, numel - i0));
    acc_t gv[kGroup], sv[kGroup], m[kGroup], out[kGroup];
    int64_t f[kGroup];
    load_group(grad, i0, n, a.packed, gv);
    load_group(saved, i0, n, a.packed, sv);
    group_features(i0, C, f);
    if (use_batch_stats) {
      group_multipliers(key, i0, scale, m);
    } else {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) m[j] = acc_t(1);
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (use_batch_stats) {
        const acc_t A = affine[f[j]];
        const acc_t dy = grad_through_relu_dropout(gv[j], sv[j], A, affine[C + f[j]], m[j]);
        const acc_t zhat = (sv[j] - mean[f[j]]) * invstd[f[j]];
        out[j] = (dy - coef[f[j]] - zhat * coef[C + f[j]]) * A;
      } else {
        out[j] = grad_through_output(gv[j], sv[j], key, i0 + j, kept_scale);
      }
    }
    store_group(dz, i0, n, a.packed, out);
  }
}

// Running statistics, after the GEMMs: G = dz^T x is dL/dW' for W' = W * A. One warp per feature:
// grad_weight = G * A; dL/dgamma = invstd * (sum_n dy * z - mean * sum_dy), where
// sum_n dy * z = sum_k G[f, k] W[f, k] + bias[f] * sum_dy (z = x W^T + b); dL/dbias = A * sum_dy.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarpPerFeatureThreads) folded_weight_grad(FoldedWeightGradArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ G = a.G;
  const scalar_t* __restrict__ w = a.weight;
  const scalar_t* __restrict__ bias = a.bias;
  const acc_t* __restrict__ affine = a.affine;
  const acc_t* __restrict__ mean = a.mean;
  const acc_t* __restrict__ invstd = a.invstd;
  const acc_t* __restrict__ sum_dy = a.sum_dy;
  scalar_t* __restrict__ grad_weight = a.grad_weight;
  acc_t* __restrict__ grad_gamma = a.grad_gamma;
  scalar_t* __restrict__ grad_bias = a.grad_bias;
  const int64_t C = a.C, K = a.K;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = blockDim.x / kWarpSize;
  // The loop bound is the same for every lane of a warp, so each warp reaches warp_sum whole.
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarpSize; f < C;
       f += static_cast<int64_t>(gridDim.x) * warps) {
    const acc_t A = affine[f];
    acc_t dot = 0;
    for (int64_t k = lane; k < K; k += kWarpSize) {
      const acc_t gv = static_cast<acc_t>(G[f * K + k]);
      dot += gv * static_cast<acc_t>(w[f * K + k]);
      grad_weight[f * K + k] = static_cast<scalar_t>(gv * A);
    }
    dot = warp_sum(dot);
    if (lane == 0) {
      const acc_t s = sum_dy[f];
      const acc_t dy_z = dot + (bias ? static_cast<acc_t>(bias[f]) : acc_t(0)) * s;
      grad_gamma[f] = invstd[f] * (dy_z - mean[f] * s);
      grad_bias[f] = static_cast<scalar_t>(A * s);
    }
  }
}

// --- dropout (seed, offset) ---------------------------------------------------------------------

// A generator's (seed, offset) as it reaches the device: values, or, under CUDA-graph capture,
// pointers the graph updates on each replay plus the offset within the graph (the fields of
// at::PhiloxCudaState, copied so that this header needs no CUDA headers).
struct SeedSource {
  bool captured;
  uint64_t seed, offset;
  const int64_t* seed_ptr;
  const int64_t* offset_ptr;
  uint64_t offset_intragraph;
};

// One thread writes (seed, offset) to out. (A template only so that the header may define it.)
template <typename index_t>
__global__ void __launch_bounds__(kSeedOffsetThreads) write_seed_offset(SeedSource s, index_t* out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  out[0] = s.captured ? static_cast<index_t>(*s.seed_ptr) : static_cast<index_t>(s.seed);
  out[1] = s.captured ? static_cast<index_t>(static_cast<uint64_t>(*s.offset_ptr) + s.offset_intragraph)
                      : static_cast<index_t>(s.offset);
}

}  // namespace fused_mlp::cuda
