// Pieces every device kernel of fused_mlp uses: the device limits and the launch configuration a
// kernel's configuration function computes from them, aligned packs, maths in the accumulation
// type (at::opmath_type: float for the reduced types, double for double), and warp and block
// reductions. Free of host-only syntax, like the kernels (docs/cuda_simulation.md).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/host_device.h"

#if defined(__CUDACC__)
#define FUSED_MLP_DEVICE_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#endif

namespace fused_mlp::cuda {

constexpr int kWarpSize = 32;

// The block of the grid-stride elementwise kernels.
constexpr int kElementwiseThreads = 256;

// What the kernels need of a device; passed in, never queried, so a host build can supply it.
struct LaunchLimits {
  int sm_count;
  int max_threads_per_block;
};

// What a launch takes: kernel<<<grid, block, shared_bytes, stream>>> on a GPU, the same three
// in cuda_sim::launch. Anything else a kernel's configuration decides (how a row is spread over
// lanes, how rows are chunked) is computed beside it as plain values and passed as arguments.
struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
};

// A grid-stride loop over `items` with `threads` per block (fewer if the device allows fewer): at
// most blocks_per_sm blocks per SM, so the grid is a few waves and each thread loops over the rest.
inline LaunchConfig grid_stride_config(int64_t items, int threads, int64_t blocks_per_sm, const LaunchLimits& limits) {
  threads = std::min(threads, limits.max_threads_per_block);
  const int64_t most = std::max<int64_t>(1, limits.sm_count * blocks_per_sm);
  const int64_t blocks = std::max<int64_t>(1, std::min(most, (items + threads - 1) / threads));
  return {dim3(static_cast<unsigned>(blocks)), dim3(threads), 0};
}

// N consecutive elements, loaded and stored as one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
// Elements per 16-byte pack.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

constexpr int next_power_of_two(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// --- maths in the accumulation type -----------------------------------------------------------

// 1 / x, correctly rounded. On the device the reciprocal intrinsics, inline, where the division
// operator calls its slow path: such calls in the Welford loops made ptxas spill.
template <typename T>
FUSED_MLP_HD T reciprocal(T x) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) return __frcp_rn(x);
  if constexpr (std::is_same_v<T, double>) return __drcp_rn(x);
#endif
  return T(1) / x;
}

// One name for float and double, so code templated on the accumulation type needs no cast.
FUSED_MLP_HD float acc_exp(float x) {
  return expf(x);
}
FUSED_MLP_HD double acc_exp(double x) {
  return exp(x);
}
FUSED_MLP_HD float acc_log(float x) {
  return logf(x);
}
FUSED_MLP_HD double acc_log(double x) {
  return log(x);
}
// Plain comparisons, so nvcc and g++ compile the same expression for every type.
template <typename T>
FUSED_MLP_HD bool is_nan(T x) {
  return x != x;
}
template <typename T>
FUSED_MLP_HD bool is_finite(T x) {
  return (x - x) == (x - x);  // inf - inf and NaN - NaN are NaN
}
// A max that keeps NaN from either side, as torch.max does; fmax would drop it.
template <typename T>
FUSED_MLP_HD T max_propagating_nan(T a, T b) {
  return (is_nan(a) || a > b) ? a : b;
}

// --- reductions within a warp and within a block ----------------------------------------------

// Sum over aligned groups of kWidth lanes (a power of two <= 32); the whole warp takes part.
template <typename T, int kWidth = kWarpSize>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, kWidth);
  return v;
}

// Max over aligned groups of kWidth lanes (a power of two <= 32); the whole warp takes part.
template <typename T, int kWidth = kWarpSize>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    v = max_propagating_nan(v, __shfl_xor_sync(0xffffffffu, v, offset, kWidth));
  }
  return v;
}

// The block-wide sum (or max) of v, returned to every thread. blockDim.x is a multiple of 32.
template <typename T, bool kMax>
__device__ T block_reduce(T v) {
  __shared__ T warp_results[32];
  v = kMax ? warp_max(v) : warp_sum(v);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  __syncthreads();  // warp_results may still be read by a previous call
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  T r = lane < warps ? warp_results[lane] : (kMax ? T(-INFINITY) : T(0));
  r = kMax ? warp_max(r) : warp_sum(r);
  return r;
}

}  // namespace fused_mlp::cuda
