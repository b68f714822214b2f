// The launch policy of the real CUDA ops: a kernel<<<grid, block, shared bytes, stream>>> on the
// current stream, checked at once. The simulation's policy (tests/sim/sim_launch.h) has the same
// shape, so one host sequence serves both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "cuda/device_common.cuh"

namespace fused_mlp::cuda {

struct StreamLaunch {
  cudaStream_t stream;
  template <typename Config, typename Kernel, typename... Args>
  void operator()(const Config& cfg, Kernel kernel, Args... args) const {
    kernel<<<cfg.grid, cfg.block, cfg.shared_bytes, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void poison(const at::Tensor&) const {}
};

inline StreamLaunch current_stream_launch(const at::Tensor& on) {
  return StreamLaunch{c10::cuda::getCurrentCUDAStream(on.device().index()).stream()};
}

inline LaunchLimits device_limits(int device) {
  LaunchLimits limits{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.max_threads_per_block, cudaDevAttrMaxThreadsPerBlock, device));
  return limits;
}

}  // namespace fused_mlp::cuda
