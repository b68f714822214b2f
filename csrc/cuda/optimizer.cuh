// Device code of the optimizer updates of mlp_train_step: one grid-stride elementwise kernel that
// applies Adam, AdamW or SGD (csrc/common/optimizer_math.h) to one parameter in place, and a
// one-thread kernel that advances a step counter kept on the device. Every scalar comes from device
// memory (the group's row of hyperparameters, the counter), so a captured CUDA graph replays the
// update with whatever the host wrote there since. Free of host-only syntax
// (docs/cuda_simulation.md); the launch is csrc/cuda/optimizer_host.h.
#pragma once

#include "common/optimizer_math.h"
#include "cuda/device_common.cuh"

namespace fused_mlp::cuda {

template <typename scalar_t>
struct OptimizerUpdateArgs {
  scalar_t* param;
  const scalar_t* grad;
  scalar_t* first;       // exp_avg, or SGD's momentum buffer; null: none
  scalar_t* second;      // exp_avg_sq; null: none
  scalar_t* max_second;  // max_exp_avg_sq (amsgrad); null: none
  int64_t numel;
  const double* row;  // the parameter's group: kHyperColumns values
  const float* step;  // Adam: the counter, already advanced; null: step_value
  double step_value;  // Adam: the advanced counter, where it lives on the host
  OptimizerKind kind;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads) optimizer_update(OptimizerUpdateArgs<scalar_t> a) {
  scalar_t* __restrict__ param = a.param;
  const scalar_t* __restrict__ grad = a.grad;
  const int64_t first_index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  if (a.kind == OptimizerKind::kSgd) {
    const SgdElement<scalar_t> e(sgd_scalars(a.row));
    FUSED_MLP_DEVICE_ASSERT(!e.has_momentum || a.first != nullptr);  // momentum needs its buffer
    for (int64_t i = first_index; i < a.numel; i += stride) e(param[i], grad[i], a.first ? a.first + i : nullptr);
    return;
  }
  const double t = a.step ? static_cast<double>(*a.step) : a.step_value;
  const AdamElement<scalar_t> e(adam_scalars(a.row, t, a.kind == OptimizerKind::kAdamW));
  for (int64_t i = first_index; i < a.numel; i += stride) {
    e(param[i], grad[i], a.first[i], a.second[i], a.max_second ? a.max_second + i : nullptr);
  }
}

// step += 1, by one thread, before the update that reads it.
template <typename step_t>
__global__ void advance_step(step_t* step) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *step += step_t(1);
}

inline LaunchConfig optimizer_update_config(int64_t numel, const LaunchLimits& limits) {
  return grid_stride_config(numel, kElementwiseThreads, 4, limits);
}

inline LaunchConfig one_thread_config() {
  return {dim3(1), dim3(1), 0};
}

}  // namespace fused_mlp::cuda
