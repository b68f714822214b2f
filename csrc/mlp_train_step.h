// A whole training step of the MLP as one op (fused_mlp::mlp_train_step): the forward
// (mlp_forward), the mean cross-entropy of the logits against class-index targets, BatchNorm's
// running-statistics update, the backward (mlp_backward_layers), and the optimizer's update of every
// parameter, each layer's applied as soon as the backward has finished with it. Written once for any
// backend: `layers` and `loss` are its kernels, `update` its optimizer step for one parameter.
//
// The parameters take one flat order, shared with the optimizer-state lists: per Linear from the
// first, its weight, its bias, then (a hidden layer with BatchNorm) the BatchNorm weight and bias,
// each where present. Nothing is written before the targets have been checked: bad input leaves the
// parameters, their state and the running statistics as they were.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <array>
#include <optional>
#include <vector>

#include "common/optimizer_math.h"
#include "mlp_network.h"

namespace fused_mlp {
FUSED_MLP_ISA_BEGIN

// The optimizer side of a step, as mlp_train_step receives it.
struct OptimizerArgs {
  OptimizerKind kind;
  at::Tensor group_hyperparameters;   // (groups, kHyperColumns) float64: see common/optimizer_math.h
  c10::IntArrayRef param_groups;      // the group of each parameter, in the flat order
  at::TensorList steps;               // Adam: each parameter's step counter (0-dim), advanced in place
  at::TensorList first_moments;       // Adam: exp_avg; SGD with momentum: momentum_buffer; else empty
  at::TensorList second_moments;      // Adam: exp_avg_sq; else empty
  at::TensorList max_second_moments;  // Adam with amsgrad: max_exp_avg_sq; else empty
  at::TensorList grads;               // keep_grads: each parameter's .grad, filled; else empty
};

// OptimizerArgs from the op's arguments.
inline OptimizerArgs optimizer_args(int64_t optimizer, const at::Tensor& group_hyperparameters,
                                    c10::IntArrayRef param_groups, at::TensorList steps, at::TensorList first_moments,
                                    at::TensorList second_moments, at::TensorList max_second_moments,
                                    at::TensorList grads) {
  return {static_cast<OptimizerKind>(optimizer),
          group_hyperparameters,
          param_groups,
          steps,
          first_moments,
          second_moments,
          max_second_moments,
          grads};
}

namespace train_step_detail {

// Each Linear's parameters' positions in the flat order: weight, bias, BatchNorm weight, BatchNorm
// bias (-1: absent).
inline std::vector<std::array<int64_t, 4>> flat_positions(at::TensorList weights, const OptionalTensorList& biases,
                                                          const OptionalTensorList& bn_weights,
                                                          const OptionalTensorList& bn_biases, int64_t* count) {
  using network_detail::at_or_none;
  std::vector<std::array<int64_t, 4>> positions(weights.size());
  int64_t next = 0;
  for (const auto i : c10::irange(weights.size())) {
    positions[i] = {next++, -1, -1, -1};
    if (at_or_none(biases, i).has_value()) positions[i][1] = next++;
    if (at_or_none(bn_weights, i).has_value()) positions[i][2] = next++;
    if (at_or_none(bn_biases, i).has_value()) positions[i][3] = next++;
  }
  *count = next;
  return positions;
}

inline void check_state_list(at::TensorList list, const std::vector<at::Tensor>& params, bool wanted, const char* name,
                             const char* op) {
  if (!wanted) {
    TORCH_CHECK(list.empty(), op, ": ", name, " must be empty for this optimizer, got ", list.size(), " tensors");
    return;
  }
  TORCH_CHECK(list.size() == params.size(), op, ": ", name, " must have one tensor per parameter, ", params.size(),
              ", got ", list.size());
  for (const auto k : c10::irange(params.size())) {
    const at::Tensor& t = list[k];
    TORCH_CHECK(t.sizes() == params[k].sizes() && t.scalar_type() == params[k].scalar_type() &&
                    t.device() == params[k].device() && t.is_contiguous(),
                op, ": ", name, "[", k, "] must be contiguous, of shape ", params[k].sizes(), ", dtype ",
                params[k].scalar_type(), " and on ", params[k].device(), " as its parameter");
  }
}

// The optimizer's arguments against the flat parameters.
inline void check_optimizer(const OptimizerArgs& opt, const std::vector<at::Tensor>& params, const char* op) {
  const auto kind = static_cast<int64_t>(opt.kind);
  TORCH_CHECK(kind >= 0 && kind <= 2, op, ": optimizer must be 0 (SGD), 1 (Adam) or 2 (AdamW), got ", kind);
  const at::Tensor& h = opt.group_hyperparameters;
  TORCH_CHECK(h.dim() == 2 && h.size(1) == kHyperColumns && h.size(0) > 0 && h.scalar_type() == at::kDouble &&
                  h.is_contiguous(),
              op, ": group_hyperparameters must be a contiguous float64 tensor of shape (groups, ", kHyperColumns,
              "), got ", h.sizes(), " ", h.scalar_type());
  TORCH_CHECK(opt.param_groups.size() == params.size(), op, ": param_groups must name the group of each of the ",
              params.size(), " parameters, got ", opt.param_groups.size());
  for (const auto k : c10::irange(params.size())) {
    TORCH_CHECK(opt.param_groups[k] >= 0 && opt.param_groups[k] < h.size(0), op, ": param_groups[", k,
                "] = ", opt.param_groups[k], " is not a group of group_hyperparameters' ", h.size(0));
    const at::Tensor& p = params[k];
    TORCH_CHECK(p.is_contiguous() && (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble), op,
                ": every parameter must be a contiguous float32 or float64 tensor; parameter ", k, " is ",
                p.scalar_type(), p.is_contiguous() ? "" : " and not contiguous");
  }
  const bool adam = opt.kind != OptimizerKind::kSgd;
  if (adam) {
    TORCH_CHECK(opt.steps.size() == params.size(), op, ": steps must have one counter per parameter, ", params.size(),
                ", got ", opt.steps.size());
    for (const auto k : c10::irange(params.size())) {
      TORCH_CHECK(opt.steps[k].numel() == 1 && opt.steps[k].is_floating_point(), op, ": steps[", k,
                  "] must be a one-element floating-point tensor");
    }
  } else {
    TORCH_CHECK(opt.steps.empty(), op, ": steps must be empty for SGD");
  }
  check_state_list(opt.first_moments, params, adam || !opt.first_moments.empty(), "first_moments", op);
  check_state_list(opt.second_moments, params, adam, "second_moments", op);
  check_state_list(opt.max_second_moments, params, adam && !opt.max_second_moments.empty(), "max_second_moments", op);
  check_state_list(opt.grads, params, !opt.grads.empty(), "grads", op);
}

// The update writes the parameter and its state through raw pointers: their versions move as an
// in-place ATen op would move them, so what keys on them (the modules' folded-weight caches,
// autograd's saved-tensor checks) sees the change.
inline void bump_versions(const OptimizerArgs& opt, int64_t k, const at::Tensor& param) {
  param.unsafeGetTensorImpl()->bump_version();
  for (const at::TensorList list : {opt.first_moments, opt.second_moments, opt.max_second_moments}) {
    if (!list.empty()) list[k].unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace train_step_detail

// Advances a step counter kept on the host (where torch.optim keeps it unless the optimizer is fused
// or capturable) and returns its new value, which the update's bias corrections take.
inline double advance_host_step(const at::Tensor& step) {
  // A plain float32 or float64 counter (what torch.optim keeps) is read and written in place, with
  // its version moved as fill_ would move it: two dispatched ops per parameter per step cost more
  // than the rest of a small parameter's update. Anything else (an inference tensor, one that
  // requires grad, a subclass, another layout) takes item() and fill_, with their checks.
  const auto dtype = step.scalar_type();
  const bool plain = step.device().is_cpu() && step.layout() == at::kStrided && step.has_storage() &&
                     !step.is_inference() && !step.requires_grad() && !step.key_set().has(c10::DispatchKey::Python) &&
                     step.numel() == 1;
  if (plain && (dtype == at::kFloat || dtype == at::kDouble)) {
    step.unsafeGetTensorImpl()->bump_version();
    double t = 0.0;
    if (dtype == at::kFloat) {
      float* p = step.mutable_data_ptr<float>();
      t = static_cast<double>(*p) + 1.0;
      *p = static_cast<float>(t);
    } else {
      double* p = step.mutable_data_ptr<double>();
      t = *p + 1.0;
      *p = t;
    }
    return t;
  }
  const double t = step.item<double>() + 1.0;
  step.fill_(t);
  return t;
}

// -> the mean loss over the batch (0-dim, the logits' dtype). `momenta`: each hidden layer's factor
// of the running-statistics update (running = (1 - m) * running + m * batch), or empty for none.
// update(k, param, grad) applies the optimizer to parameter k of the flat order (the versions are
// bumped here); `loss` has
// forward(logits, target, smoothing) -> (loss, lse) and backward(logits, target, lse, smoothing).
template <typename Layers, typename Loss, typename Update>
at::Tensor mlp_train_step(const Layers& layers, const Loss& loss, const Update& update, const at::Tensor& input,
                          const at::Tensor& target, at::TensorList weights, const OptionalTensorList& biases,
                          const OptionalTensorList& bn_weights, const OptionalTensorList& bn_biases,
                          const OptionalTensorList& running_means, const OptionalTensorList& running_vars,
                          c10::ArrayRef<double> momenta, bool batch_norm, bool use_batch_stats, double eps,
                          double dropout_p, const at::Tensor& seed_offset, double label_smoothing,
                          const OptimizerArgs& opt, const char* op) {
  using namespace train_step_detail;
  int64_t count = 0;
  const auto positions = flat_positions(weights, biases, bn_weights, bn_biases, &count);
  std::vector<at::Tensor> params(count);
  for (const auto i : c10::irange(weights.size())) {
    const auto& pos = positions[i];
    params[pos[0]] = weights[i];
    if (pos[1] >= 0) params[pos[1]] = *network_detail::at_or_none(biases, i);
    if (pos[2] >= 0) params[pos[2]] = *network_detail::at_or_none(bn_weights, i);
    if (pos[3] >= 0) params[pos[3]] = *network_detail::at_or_none(bn_biases, i);
  }
  check_optimizer(opt, params, op);
  const size_t L = weights.size() - 1;
  TORCH_CHECK(momenta.empty() || (batch_norm && use_batch_stats && momenta.size() == L && running_means.size() == L &&
                                  running_vars.size() == L),
              op, ": momenta must be empty, or (with batch statistics) give each of the ", L,
              " hidden layers' running statistics their factor");

  // The forward keeps every hidden output: the backward reads them instead of recomputing them.
  const OptionalTensorList no_running;
  const bool given_running = !use_batch_stats;
  auto [logits, hidden, pre_bn, mean, invstd, batch_var] = mlp_forward(
      layers, input, weights, biases, bn_weights, bn_biases, given_running ? running_means : no_running,
      given_running ? running_vars : no_running, batch_norm, use_batch_stats, eps, dropout_p, seed_offset, op);
  auto [value, lse] = loss.forward(logits, target, label_smoothing);  // checks the targets
  const at::Tensor grad_logits = loss.backward(logits, target, lse, label_smoothing);

  // Nothing is written before this point.
  for (const auto i : c10::irange(momenta.size())) {
    at::Tensor rm = *network_detail::at_or_none(running_means, i), rv = *network_detail::at_or_none(running_vars, i);
    layers.update_running_stats(rm, rv, mean[i], batch_var[i], momenta[i]);
  }
  c10::List<bool> every_layer;
  for (size_t i = 0; i <= L; ++i) every_layer.push_back(true);
  mlp_backward_layers(layers, grad_logits, input, weights, biases, bn_weights, bn_biases, hidden, pre_bn, mean, invstd,
                      batch_norm, use_batch_stats, dropout_p, seed_offset, /*need_grad_input=*/false, every_layer, op,
                      [&](size_t i, LayerGrads& grads) {
                        const auto& pos = positions[i];
                        const at::Tensor* layer_grads[4] = {&grads.weight, &grads.bias, &grads.bn_weight,
                                                            &grads.bn_bias};
                        for (const auto j : c10::irange(4)) {
                          const int64_t k = pos[j];
                          if (k < 0) continue;
                          if (!opt.grads.empty()) opt.grads[k].copy_(*layer_grads[j]);
                          update(k, params[k], *layer_grads[j]);
                          bump_versions(opt, k, params[k]);
                        }
                      });
  return value;
}

FUSED_MLP_ISA_END
}  // namespace fused_mlp
