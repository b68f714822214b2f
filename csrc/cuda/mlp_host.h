// The layer kernels the whole-network ops (csrc/mlp_network.h) run on CUDA: the host sequences of
// linear_bn_relu_host.h under one launch policy. mlp_cuda.cu uses it with real launches on the
// current stream, tests/sim/mlp_sim.cpp with the simulation.
#pragma once

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include <optional>
#include <tuple>

#include "bn_running_stats.h"
#include "cuda/linear_bn_relu_host.h"
#include "mlp_network.h"

namespace fused_mlp::cuda {

template <typename Launch>
struct DeviceLayers {
  Launch launch;
  LaunchLimits limits;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
      const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool use_batch_stats,
      double eps, double dropout_p, const at::Tensor& seed_offset) const {
    return linear_bn_relu_forward_device(launch, limits, input, weight, bias, bn_weight, bn_bias, running_mean,
                                         running_var, use_batch_stats, eps, dropout_p, seed_offset,
                                         "fused_mlp::mlp_forward (a hidden layer)");
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
      const std::optional<at::Tensor>& bn_bias, const at::Tensor& saved, const at::Tensor& mean,
      const at::Tensor& invstd, bool use_batch_stats, double dropout_p, const at::Tensor& seed_offset,
      bool need_grad_input, bool need_grad_weight, const at::Tensor& /*output*/) const {
    // The device kernels regenerate the dropout mask where they need it (a few instructions per
    // element on the GPU), so the layer's output goes unread.
    return linear_bn_relu_backward_device(launch, limits, grad_out, input, weight, bias, bn_weight, bn_bias, saved,
                                          mean, invstd, use_batch_stats, dropout_p, seed_offset, need_grad_input,
                                          need_grad_weight, "fused_mlp::mlp_backward (a hidden layer)");
  }

  at::Tensor linear_relu_dropout(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, double dropout_p,
                                 const at::Tensor& seed_offset) const {
    return linear_relu_dropout_forward_device(launch, limits, input, weight, bias, dropout_p, seed_offset,
                                              "fused_mlp::mlp_forward (a hidden layer)");
  }

  at::Tensor bn_relu_dropout(const at::Tensor& pre_bn, const at::Tensor& mean, const at::Tensor& invstd,
                             const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                             double dropout_p, const at::Tensor& seed_offset) const {
    return bn_relu_dropout_device(launch, limits, pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset,
                                  "fused_mlp::mlp_backward (a hidden layer)");
  }

  // The GEMMs: cuBLAS through ATen.
  at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) const {
    return bias.has_value() ? at::addmm(*bias, input, weight.t()) : at::mm(input, weight.t());
  }
  at::Tensor matmul(const at::Tensor& a, const at::Tensor& b) const { return at::mm(a, b); }
  at::Tensor matmul_tn(const at::Tensor& a, const at::Tensor& b) const { return at::mm(a.t(), b); }

  at::Tensor relu_dropout_backward(const at::Tensor& grad_out, const at::Tensor& output, double dropout_p,
                                   const at::Tensor& seed_offset) const {
    return relu_dropout_backward_device(launch, limits, grad_out, output, dropout_p, seed_offset);
  }

  void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& batch_mean,
                            const at::Tensor& batch_var, double factor) const {
    bn_update_running_stats(running_mean, running_var, batch_mean, batch_var, factor);
  }
};

}  // namespace fused_mlp::cuda
