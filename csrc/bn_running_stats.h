// The running-statistics update of BatchNorm, its own small op (bn_update_running_stats_) on every
// backend: plain ATen ops, so on CUDA it stays on the device with no host round trip.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/host_device.h"

namespace fused_mlp {
FUSED_MLP_ISA_BEGIN

inline void check_running_stats_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                                       const at::Tensor& batch_mean, const at::Tensor& batch_var, double factor) {
  constexpr const char* op = "fused_mlp::bn_update_running_stats_";
  TORCH_CHECK(running_mean.numel() == batch_mean.numel() && running_var.numel() == batch_var.numel() &&
                  running_mean.numel() == running_var.numel(),
              op, ": running and batch statistics must have the same number of features");
  TORCH_CHECK(running_mean.device() == batch_mean.device() && running_var.device() == batch_var.device(), op,
              ": running and batch statistics must be on the same device");
  TORCH_CHECK(factor >= 0.0 && factor <= 1.0, op, ": factor must be in [0, 1], got ", factor);
}

// running_stat = (1 - factor) * running_stat + factor * batch_stat, for the mean and the
// (unbiased) variance, in the running statistics' own dtype.
inline void bn_update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& batch_mean,
                                    const at::Tensor& batch_var, double factor) {
  check_running_stats_update(running_mean, running_var, batch_mean, batch_var, factor);
  running_mean.mul_(1.0 - factor).add_(batch_mean.to(running_mean.scalar_type()), factor);
  running_var.mul_(1.0 - factor).add_(batch_var.to(running_var.scalar_type()), factor);
}

FUSED_MLP_ISA_END
}  // namespace fused_mlp
