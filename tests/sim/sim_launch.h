// The launch policy of the simulated ops: cuda_sim::launch with an H100's limits (or fewer SMs,
// to make small inputs outgrow one grid), and NaN-poisoned outputs. Same shape as the real
// launcher's policy (csrc/cuda/stream_launch.h), so the host sequences run unchanged.
#pragma once

#include <ATen/core/Tensor.h>

#include <limits>

// The simulated CUDA keywords first: the device code below is written in them.
#include "sim/cuda_sim.h"

#include "cuda/device_common.cuh"

namespace sim_launch {

// The device limits given to the configuration functions and enforced by the simulation.
inline cuda_sim::DeviceLimits limits = cuda_sim::kH100;

struct SimLaunch {
  template <typename Config, typename Kernel, typename... Args>
  void operator()(const Config& cfg, Kernel kernel, Args... args) const {
    cuda_sim::launch(limits, cfg.grid, cfg.block, cfg.shared_bytes, kernel, args...);
  }
  // Outputs start as NaN, so an element no kernel writes fails the comparison.
  void poison(at::Tensor& t) const {
    if (t.numel() > 0 && t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
};

inline fused_mlp::cuda::LaunchLimits launch_limits() {
  return {limits.sm_count, limits.max_threads_per_block};
}

}  // namespace sim_launch
