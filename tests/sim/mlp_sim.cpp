// The whole-network ops (csrc/mlp_network.h) over the CUDA layer host sequences, run on CPU tensors
// through the CUDA simulation with an H100's limits: the same code the real CUDA ops run, launches
// aside. Built by tests/simulated.py with torch.utils.cpp_extension.load.
#include <torch/extension.h>

#include "sim/cuda_sim.h"

#include "cuda/mlp_host.h"
#include "cuda/train_step_host.h"
#include "sim_launch.h"

namespace {

namespace dev = fused_mlp::cuda;
using sim_launch::SimLaunch;
using Optionals = std::vector<std::optional<at::Tensor>>;
using Tensors = std::vector<at::Tensor>;

dev::DeviceLayers<SimLaunch> layers() {
  return {SimLaunch{}, sim_launch::launch_limits()};
}

fused_mlp::OptionalTensorList as_list(const Optionals& items) {
  fused_mlp::OptionalTensorList list;
  list.reserve(items.size());
  for (const auto& t : items) list.push_back(t);
  return list;
}

std::tuple<at::Tensor, Tensors, Tensors, Tensors, Tensors, Tensors> forward(
    const at::Tensor& input, const Tensors& weights, const Optionals& biases, const Optionals& bn_weights,
    const Optionals& bn_biases, const Optionals& running_means, const Optionals& running_vars, bool batch_norm,
    bool use_batch_stats, double eps, double dropout_p, const at::Tensor& seed_offset) {
  return fused_mlp::mlp_forward(layers(), input, weights, as_list(biases), as_list(bn_weights), as_list(bn_biases),
                                as_list(running_means), as_list(running_vars), batch_norm, use_batch_stats, eps,
                                dropout_p, seed_offset, "simulated mlp_forward");
}

std::tuple<at::Tensor, Tensors, Tensors, Tensors, Tensors> backward(
    const at::Tensor& grad_out, const at::Tensor& input, const Tensors& weights, const Optionals& biases,
    const Optionals& bn_weights, const Optionals& bn_biases, const Tensors& hidden, const Tensors& pre_bn,
    const Tensors& mean, const Tensors& invstd, bool batch_norm, bool use_batch_stats, double dropout_p,
    const at::Tensor& seed_offset, bool need_grad_input, const std::vector<bool>& need_layer_grads) {
  c10::List<bool> needs;
  for (const bool b : need_layer_grads) needs.push_back(b);
  return fused_mlp::mlp_backward(layers(), grad_out, input, weights, as_list(biases), as_list(bn_weights),
                                 as_list(bn_biases), hidden, pre_bn, mean, invstd, batch_norm, use_batch_stats,
                                 dropout_p, seed_offset, need_grad_input, needs, "simulated mlp_backward");
}

at::Tensor inference(const at::Tensor& input, const Tensors& weights, const Optionals& biases) {
  return fused_mlp::mlp_inference(layers(), input, weights, as_list(biases), "simulated mlp_inference");
}

at::Tensor train_step(const at::Tensor& input, const at::Tensor& target, const Tensors& weights,
                      const Optionals& biases, const Optionals& bn_weights, const Optionals& bn_biases,
                      const Optionals& running_means, const Optionals& running_vars, const std::vector<double>& momenta,
                      bool batch_norm, bool use_batch_stats, double eps, double dropout_p,
                      const at::Tensor& seed_offset, double label_smoothing, int64_t optimizer,
                      const at::Tensor& group_hyperparameters, const std::vector<int64_t>& param_groups,
                      const Tensors& steps, const Tensors& first_moments, const Tensors& second_moments,
                      const Tensors& max_second_moments, const Tensors& grads) {
  const fused_mlp::OptimizerArgs opt = fused_mlp::optimizer_args(
      optimizer, group_hyperparameters, param_groups, steps, first_moments, second_moments, max_second_moments, grads);
  const auto limits = sim_launch::launch_limits();
  return fused_mlp::mlp_train_step(layers(), dev::DeviceLoss<SimLaunch>{SimLaunch{}, limits},
                                   dev::DeviceOptimizer<SimLaunch>{SimLaunch{}, limits, opt}, input, target, weights,
                                   as_list(biases), as_list(bn_weights), as_list(bn_biases), as_list(running_means),
                                   as_list(running_vars), momenta, batch_norm, use_batch_stats, eps, dropout_p,
                                   seed_offset, label_smoothing, opt, "simulated mlp_train_step");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mlp_forward", &forward);
  m.def("mlp_backward", &backward);
  m.def("mlp_inference", &inference);
  m.def("mlp_train_step", &train_step);
  m.def("set_barrier_timeout_ms", [](int64_t ms) { cuda_sim::set_barrier_timeout(std::chrono::milliseconds(ms)); });
}
