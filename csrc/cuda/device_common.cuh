// Pieces every device kernel of fused_mlp uses: accumulation types, aligned packs, the device
// limits a launch configuration is computed from, and warp sums. Free of host-only syntax, like
// the kernels (docs/cuda_simulation.md).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common/host_device.h"

#if defined(__CUDACC__)
#define FUSED_MLP_DEVICE_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#endif

namespace fused_mlp::cuda {

// float for the reduced types and float itself, double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

constexpr int kWarpSize = 32;

// What the kernels need of a device; passed in, never queried, so a host build can supply it.
struct LaunchLimits {
  int sm_count;
  int max_threads_per_block;
};

// N consecutive elements, loaded and stored as one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
// Elements per 16-byte pack.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// Sum over aligned groups of kWidth lanes (a power of two <= 32); the whole warp takes part.
template <typename T, int kWidth = kWarpSize>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, kWidth);
  return v;
}

}  // namespace fused_mlp::cuda
