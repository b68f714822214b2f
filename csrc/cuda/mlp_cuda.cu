// The whole-network ops on CUDA: csrc/mlp_network.h's loop over the layer host sequences, with real
// launches on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/mlp_host.h"
#include "cuda/stream_launch.h"
#include "cuda/train_step_host.h"

namespace fused_mlp::cuda {
namespace {

DeviceLayers<StreamLaunch> layers_for(const at::Tensor& input) {
  return {current_stream_launch(input), device_limits(input.device().index())};
}

std::tuple<at::Tensor, TensorVector, TensorVector, TensorVector, TensorVector, TensorVector> mlp_forward_cuda(
    const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases,
    const OptionalTensorList& bn_weights, const OptionalTensorList& bn_biases, const OptionalTensorList& running_means,
    const OptionalTensorList& running_vars, bool batch_norm, bool use_batch_stats, double eps, double dropout_p,
    const at::Tensor& seed_offset) {
  const c10::cuda::CUDAGuard guard(input.device());
  return mlp_forward(layers_for(input), input, weights, biases, bn_weights, bn_biases, running_means, running_vars,
                     batch_norm, use_batch_stats, eps, dropout_p, seed_offset, "fused_mlp::mlp_forward");
}

std::tuple<at::Tensor, TensorVector, TensorVector, TensorVector, TensorVector> mlp_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases,
    const OptionalTensorList& bn_weights, const OptionalTensorList& bn_biases, at::TensorList hidden,
    at::TensorList pre_bn, at::TensorList mean, at::TensorList invstd, bool batch_norm, bool use_batch_stats,
    double dropout_p, const at::Tensor& seed_offset, bool need_grad_input, const c10::List<bool>& need_layer_grads) {
  const c10::cuda::CUDAGuard guard(input.device());
  return mlp_backward(layers_for(input), grad_out, input, weights, biases, bn_weights, bn_biases, hidden, pre_bn, mean,
                      invstd, batch_norm, use_batch_stats, dropout_p, seed_offset, need_grad_input, need_layer_grads,
                      "fused_mlp::mlp_backward");
}

at::Tensor mlp_inference_cuda(const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases) {
  const c10::cuda::CUDAGuard guard(input.device());
  return mlp_inference(layers_for(input), input, weights, biases, "fused_mlp::mlp_inference");
}

void mlp_update_running_stats_cuda(at::TensorList running_means, at::TensorList running_vars,
                                   at::TensorList batch_means, at::TensorList batch_vars,
                                   c10::ArrayRef<double> factors) {
  if (running_means.empty()) return;
  const c10::cuda::CUDAGuard guard(running_means[0].device());
  mlp_update_running_stats(layers_for(running_means[0]), running_means, running_vars, batch_means, batch_vars, factors,
                           "fused_mlp::mlp_update_running_stats_");
}

at::Tensor mlp_train_step_cuda(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                               const OptionalTensorList& biases, const OptionalTensorList& bn_weights,
                               const OptionalTensorList& bn_biases, const OptionalTensorList& running_means,
                               const OptionalTensorList& running_vars, c10::ArrayRef<double> momenta, bool batch_norm,
                               bool use_batch_stats, double eps, double dropout_p, const at::Tensor& seed_offset,
                               double label_smoothing, int64_t optimizer, const at::Tensor& group_hyperparameters,
                               c10::IntArrayRef param_groups, at::TensorList steps, at::TensorList first_moments,
                               at::TensorList second_moments, at::TensorList max_second_moments, at::TensorList grads) {
  const c10::cuda::CUDAGuard guard(input.device());
  const OptimizerArgs opt = optimizer_args(optimizer, group_hyperparameters, param_groups, steps, first_moments,
                                           second_moments, max_second_moments, grads);
  const StreamLaunch launch = current_stream_launch(input);
  const LaunchLimits limits = device_limits(input.device().index());
  return mlp_train_step(DeviceLayers<StreamLaunch>{launch, limits}, DeviceLoss<StreamLaunch>{launch, limits},
                        DeviceOptimizer<StreamLaunch>{launch, limits, opt}, input, target, weights, biases, bn_weights,
                        bn_biases, running_means, running_vars, momenta, batch_norm, use_batch_stats, eps, dropout_p,
                        seed_offset, label_smoothing, opt, "fused_mlp::mlp_train_step");
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_mlp, CUDA, m) {
  m.impl("mlp_forward", &mlp_forward_cuda);
  m.impl("mlp_backward", &mlp_backward_cuda);
  m.impl("mlp_inference", &mlp_inference_cuda);
  m.impl("mlp_update_running_stats_", &mlp_update_running_stats_cuda);
  m.impl("mlp_train_step", &mlp_train_step_cuda);
}

}  // namespace fused_mlp::cuda
