// The whole MLP as one op per pass: every hidden layer (Linear -> BatchNorm1d -> ReLU -> Dropout,
// or Linear -> ReLU -> Dropout without BatchNorm) and the output Linear, in a loop written once for
// any backend. A backend supplies its layer kernels as a `Layers` object: the kernels of the
// per-layer ops (each but relu_dropout_backward also an op of its own) and its GEMMs:
//
//   forward(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps,
//           dropout_p, seed_offset)                      -> (out, pre_bn, mean, invstd, batch_var)
//   backward(grad_out, input, weight, bias, bn_weight, bn_bias, saved, mean, invstd, use_batch_stats,
//            dropout_p, seed_offset, need_grad_input, need_grad_weight)
//                                                        -> (grad_input, grad_weight, grad_bias,
//                                                            grad_bn_weight, grad_bn_bias)
//   linear_relu_dropout(input, weight, bias, dropout_p, seed_offset) -> relu(input weight^T + bias) * mask
//   bn_relu_dropout(pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset) -> the epilogue
//   relu_dropout_backward(grad_out, output, dropout_p, seed_offset) -> the gradient at relu's input,
//                                                        from linear_relu_dropout's output
//   linear(input, weight, bias) -> input weight^T + bias; matmul(a, b) -> a b; matmul_tn(a, b) -> a^T b
//                                                        (the output layer's GEMMs, and the
//                                                        no-BatchNorm layers' backward)
//   update_running_stats(running_mean, running_var, batch_mean, batch_var, factor)
//
// csrc/cpu_dispatch.cpp passes the CPU kernels, csrc/cuda/mlp_cuda.cu the CUDA host sequences with
// real launches, tests/sim/mlp_sim.cpp the same host sequences with simulated ones. Nothing here
// reads a device value.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/host_device.h"

namespace fused_mlp {
FUSED_MLP_ISA_BEGIN

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;
using TensorVector = std::vector<at::Tensor>;

namespace network_detail {

inline std::optional<at::Tensor> at_or_none(const OptionalTensorList& list, size_t i) {
  if (i >= list.size()) return std::nullopt;
  std::optional<at::Tensor> t = list.get(i);
  if (t.has_value() && !t->defined()) return std::nullopt;
  return t;
}

inline at::Tensor empty_like_none(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

// The shapes that chain the layers, and the lengths of the per-layer lists; each layer's own
// arguments are checked again by its kernel.
inline void check_network(const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases,
                          const OptionalTensorList& bn_weights, const OptionalTensorList& bn_biases,
                          const OptionalTensorList& running_means, const OptionalTensorList& running_vars,
                          bool batch_norm, double dropout_p, const at::Tensor& seed_offset, const char* op) {
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape (batch, in_features), got shape ", input.sizes());
  TORCH_CHECK(!weights.empty(), op, ": weights must hold at least the output layer's weight");
  const size_t layers = weights.size() - 1;
  TORCH_CHECK(biases.size() == weights.size(), op, ": biases must have one entry (or None) per weight, ",
              weights.size(), ", got ", biases.size());
  const size_t per_bn = batch_norm ? layers : 0;
  for (const auto& [name, list] : {std::pair<const char*, const OptionalTensorList*>{"bn_weights", &bn_weights},
                                   {"bn_biases", &bn_biases},
                                   {"running_means", &running_means},
                                   {"running_vars", &running_vars}}) {
    TORCH_CHECK(list->size() == per_bn || (list->empty()), op, ": ", name, " must have ", per_bn,
                " entries (one per hidden layer", batch_norm ? "" : "; none without BatchNorm", "), got ",
                list->size());
  }
  int64_t features = input.size(1);
  for (const auto i : c10::irange(weights.size())) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == features, op, ": weights[", i, "] must have shape (out_features, ",
                features, ")", i == 0 ? " to take the input" : " to take the previous layer's output", ", got ",
                w.sizes());
    TORCH_CHECK(w.scalar_type() == input.scalar_type(), op, ": weights[", i, "] dtype ", w.scalar_type(),
                " does not match input dtype ", input.scalar_type());
    TORCH_CHECK(w.device() == input.device(), op, ": weights[", i, "] is on ", w.device(), " but input is on ",
                input.device());
    features = w.size(0);
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed_offset.scalar_type() == at::kLong && seed_offset.numel() == 2 && seed_offset.dim() == 1 &&
                    (seed_offset.device().is_cpu() || seed_offset.device() == input.device()),
                op, ": seed_offset must be a CPU int64 tensor holding (seed, offset), or one on the input's device");
  }
}

// Hidden layer i's dropout mask uses (seed, offset + i): its Philox counters differ from every other
// layer's in the offset words, so the masks are independent. On the device, computed there.
inline at::Tensor layer_seed_offset(const at::Tensor& seed_offset, int64_t layer, double dropout_p) {
  if (layer == 0 || dropout_p <= 0.0) return seed_offset;
  if (seed_offset.device().is_cpu()) {
    const at::Tensor so = seed_offset.contiguous();
    at::Tensor out = at::empty({2}, so.options());
    const int64_t* s = so.const_data_ptr<int64_t>();
    int64_t* o = out.mutable_data_ptr<int64_t>();
    o[0] = s[0];
    o[1] = static_cast<int64_t>(static_cast<uint64_t>(s[1]) + static_cast<uint64_t>(layer));
    return out;
  }
  return at::cat({seed_offset.narrow(0, 0, 1), seed_offset.narrow(0, 1, 1) + layer});
}

}  // namespace network_detail

// -> (out, hidden, pre_bn, mean, invstd, batch_var): the logits; each hidden layer's output (the
// next GEMM's input, kept for the backward); and, with BatchNorm, each layer's pre-BN activation
// (batch statistics; empty otherwise), mean, invstd and unbiased batch variance, as
// linear_bn_relu_forward returns them. Without BatchNorm the last four lists are empty.
template <typename Layers>
std::tuple<at::Tensor, TensorVector, TensorVector, TensorVector, TensorVector, TensorVector> mlp_forward(
    const Layers& layers, const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases,
    const OptionalTensorList& bn_weights, const OptionalTensorList& bn_biases, const OptionalTensorList& running_means,
    const OptionalTensorList& running_vars, bool batch_norm, bool use_batch_stats, double eps, double dropout_p,
    const at::Tensor& seed_offset, const char* op) {
  using namespace network_detail;
  check_network(input, weights, biases, bn_weights, bn_biases, running_means, running_vars, batch_norm, dropout_p,
                seed_offset, op);
  const size_t L = weights.size() - 1;
  TensorVector hidden, pre_bn, mean, invstd, batch_var;
  hidden.reserve(L);
  if (batch_norm) {
    for (TensorVector* v : {&pre_bn, &mean, &invstd, &batch_var}) v->reserve(L);
  }
  at::Tensor x = input;
  for (const auto i : c10::irange(L)) {
    const at::Tensor so = layer_seed_offset(seed_offset, static_cast<int64_t>(i), dropout_p);
    if (batch_norm) {
      auto [out, z, mu, is, var] = layers.forward(x, weights[i], at_or_none(biases, i), at_or_none(bn_weights, i),
                                                  at_or_none(bn_biases, i), at_or_none(running_means, i),
                                                  at_or_none(running_vars, i), use_batch_stats, eps, dropout_p, so);
      pre_bn.push_back(std::move(z));
      mean.push_back(std::move(mu));
      invstd.push_back(std::move(is));
      batch_var.push_back(std::move(var));
      x = std::move(out);
    } else {
      x = layers.linear_relu_dropout(x, weights[i], at_or_none(biases, i), dropout_p, so);
    }
    hidden.push_back(x);
  }
  at::Tensor out = layers.linear(x.contiguous(), weights[L].contiguous(), at_or_none(biases, L));
  return {std::move(out),  std::move(hidden), std::move(pre_bn),
          std::move(mean), std::move(invstd), std::move(batch_var)};
}

// The gradients of one Linear (and of its BatchNorm, for a hidden layer with one), as the backward
// completes them. A parameter that is None, or a layer without BatchNorm, gets an empty tensor.
struct LayerGrads {
  at::Tensor weight, bias, bn_weight, bn_bias;
};

// The backward of the whole network, from grad_out (the gradient of the logits), layer by layer from
// the output Linear down. For each layer whose parameters need gradients (need_layer_grads, one flag
// per weight), sink(i, grads) gets them as soon as they are complete, and the gradient of the
// layer's input with them: nothing later reads layer i's parameters, so the sink may update them in
// place. A layer that needs none gets no weight GEMM; the input GEMMs stop below the lowest layer
// that needs one. Returns the gradient of the network's input (empty without need_grad_input).
template <typename Layers, typename Sink>
at::Tensor mlp_backward_layers(const Layers& layers, const at::Tensor& grad_out, const at::Tensor& input,
                               at::TensorList weights, const OptionalTensorList& biases,
                               const OptionalTensorList& bn_weights, const OptionalTensorList& bn_biases,
                               at::TensorList hidden, at::TensorList pre_bn, at::TensorList mean, at::TensorList invstd,
                               bool batch_norm, bool use_batch_stats, double dropout_p, const at::Tensor& seed_offset,
                               bool need_grad_input, const c10::List<bool>& need_layer_grads, const char* op,
                               Sink&& sink) {
  using namespace network_detail;
  const OptionalTensorList none_given;
  check_network(input, weights, biases, bn_weights, bn_biases, none_given, none_given, batch_norm, dropout_p,
                seed_offset, op);
  const size_t L = weights.size() - 1;
  // With batch statistics the hidden outputs may be left out (an empty list): each is recomputed
  // from its pre-BN activation when the layer above needs it, so the forward need not keep them.
  const bool recompute = batch_norm && use_batch_stats && hidden.empty() && L > 0;
  TORCH_CHECK(hidden.size() == L || recompute, op, ": hidden must hold the forward's ", L,
              " hidden outputs (or none, with batch statistics), got ", hidden.size());
  if (batch_norm) {
    TORCH_CHECK(mean.size() == L && invstd.size() == L && (pre_bn.size() == L || !use_batch_stats), op,
                ": pre_bn, mean and invstd must be the forward's, one per hidden layer");
  }
  const auto hidden_output = [&](size_t i) -> at::Tensor {
    if (!recompute) return hidden[i];
    return layers.bn_relu_dropout(pre_bn[i], mean[i], invstd[i], at_or_none(bn_weights, i), at_or_none(bn_biases, i),
                                  dropout_p, layer_seed_offset(seed_offset, static_cast<int64_t>(i), dropout_p));
  };
  TORCH_CHECK(need_layer_grads.size() == weights.size(), op, ": need_layer_grads must have one flag per weight, ",
              weights.size(), ", got ", need_layer_grads.size());
  const int64_t classes = weights[L].size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == input.size(0) && grad_out.size(1) == classes &&
                  grad_out.scalar_type() == input.scalar_type() && grad_out.device() == input.device(),
              op, ": grad_out must have shape (", input.size(0), ", ", classes, ") and the input's dtype and device");

  // below[i]: whether a gradient is needed below layer i (its input's): the network's input, or the
  // parameters of a lower layer.
  std::vector<bool> below(L + 1);
  bool any = need_grad_input;
  for (const auto i : c10::irange(L + 1)) {
    below[i] = any;
    any = any || need_layer_grads.get(i);
  }
  const at::Tensor none = empty_like_none(input);

  at::Tensor g = grad_out.contiguous();
  for (size_t i = L + 1; i-- > 0;) {
    if (!need_layer_grads.get(i) && !below[i]) break;  // nothing at or below this layer needs a gradient
    const at::Tensor x = i == 0 ? input.contiguous() : hidden_output(i - 1);
    const std::optional<at::Tensor> bias = at_or_none(biases, i);
    if (i == L) {  // the output Linear
      LayerGrads grads{none, none, none, none};
      if (need_layer_grads.get(i)) {
        grads.weight = layers.matmul_tn(g, x);
        if (bias.has_value()) grads.bias = g.sum(0);
      }
      g = below[i] ? layers.matmul(g, weights[i].contiguous()) : none;
      if (need_layer_grads.get(i)) sink(i, grads);
      continue;
    }
    const at::Tensor so = layer_seed_offset(seed_offset, static_cast<int64_t>(i), dropout_p);
    if (batch_norm) {
      const at::Tensor saved = use_batch_stats ? pre_bn[i] : hidden[i];
      // With batch statistics the layer's output, relu(y) * dropout, goes along too where the caller
      // kept it: a backend may read which units were kept off it instead of regenerating the mask.
      auto [gx, gw, gb, ggamma, gbeta] =
          layers.backward(g, x, weights[i], bias, at_or_none(bn_weights, i), at_or_none(bn_biases, i), saved, mean[i],
                          invstd[i], use_batch_stats, dropout_p, so, static_cast<bool>(below[i]),
                          need_layer_grads.get(i), use_batch_stats && !recompute ? hidden[i] : at::Tensor());
      g = below[i] ? gx : none;
      if (need_layer_grads.get(i)) {
        LayerGrads grads{std::move(gw), bias.has_value() ? std::move(gb) : none,
                         at_or_none(bn_weights, i).has_value() ? std::move(ggamma) : none,
                         at_or_none(bn_biases, i).has_value() ? std::move(gbeta) : none};
        sink(i, grads);
      }
    } else {
      at::Tensor gz = layers.relu_dropout_backward(g, hidden[i], dropout_p, so);
      LayerGrads grads{none, none, none, none};
      if (need_layer_grads.get(i)) {
        grads.weight = layers.matmul_tn(gz, x);
        if (bias.has_value()) grads.bias = gz.sum(0);
      }
      g = below[i] ? layers.matmul(gz, weights[i].contiguous()) : none;
      if (need_layer_grads.get(i)) sink(i, grads);
    }
  }
  return need_grad_input ? g : none;
}

// -> (grad_input, grad_weights, grad_biases, grad_bn_weights, grad_bn_biases): mlp_backward_layers
// with every layer's gradients collected. A layer that needs none, a parameter that is None and a
// layer without BatchNorm get empty tensors.
template <typename Layers>
std::tuple<at::Tensor, TensorVector, TensorVector, TensorVector, TensorVector> mlp_backward(
    const Layers& layers, const at::Tensor& grad_out, const at::Tensor& input, at::TensorList weights,
    const OptionalTensorList& biases, const OptionalTensorList& bn_weights, const OptionalTensorList& bn_biases,
    at::TensorList hidden, at::TensorList pre_bn, at::TensorList mean, at::TensorList invstd, bool batch_norm,
    bool use_batch_stats, double dropout_p, const at::Tensor& seed_offset, bool need_grad_input,
    const c10::List<bool>& need_layer_grads, const char* op) {
  const size_t L = weights.empty() ? 0 : weights.size() - 1;
  const at::Tensor none = network_detail::empty_like_none(input);
  TensorVector grad_weights(L + 1, none), grad_biases(L + 1, none);
  TensorVector grad_bn_weights(batch_norm ? L : 0, none), grad_bn_biases(batch_norm ? L : 0, none);
  at::Tensor grad_input = mlp_backward_layers(layers, grad_out, input, weights, biases, bn_weights, bn_biases, hidden,
                                              pre_bn, mean, invstd, batch_norm, use_batch_stats, dropout_p, seed_offset,
                                              need_grad_input, need_layer_grads, op, [&](size_t i, LayerGrads& grads) {
                                                grad_weights[i] = std::move(grads.weight);
                                                grad_biases[i] = std::move(grads.bias);
                                                if (i < L && batch_norm) {
                                                  grad_bn_weights[i] = std::move(grads.bn_weight);
                                                  grad_bn_biases[i] = std::move(grads.bn_bias);
                                                }
                                              });
  return {std::move(grad_input), std::move(grad_weights), std::move(grad_biases), std::move(grad_bn_weights),
          std::move(grad_bn_biases)};
}

// Inference on weights with BatchNorm already folded in: relu(x W_i^T + b_i) per hidden layer (the
// ReLU in the GEMM's epilogue or in place on its output, as the backend's layer kernel does it), then
// the output Linear.
template <typename Layers>
at::Tensor mlp_inference(const Layers& layers, const at::Tensor& input, at::TensorList weights,
                         const OptionalTensorList& biases, const char* op) {
  using namespace network_detail;
  // Read by no kernel (no dropout at inference); a real tensor, as the layer kernels' checks expect.
  static const at::Tensor no_seed = at::zeros({2}, at::kLong);
  const OptionalTensorList none_given;
  check_network(input, weights, biases, none_given, none_given, none_given, none_given, false, 0.0, no_seed, op);
  const size_t L = weights.size() - 1;
  at::Tensor x = input;
  for (const auto i : c10::irange(L)) {
    x = layers.linear_relu_dropout(x, weights[i], at_or_none(biases, i), 0.0, no_seed);
  }
  return layers.linear(x.contiguous(), weights[L], at_or_none(biases, L));
}

// Every hidden layer's running statistics: running = (1 - factor) * running + factor * batch.
template <typename Layers>
void mlp_update_running_stats(const Layers& layers, at::TensorList running_means, at::TensorList running_vars,
                              at::TensorList batch_means, at::TensorList batch_vars, c10::ArrayRef<double> factors,
                              const char* op) {
  const size_t n = running_means.size();
  TORCH_CHECK(running_vars.size() == n && batch_means.size() == n && batch_vars.size() == n && factors.size() == n, op,
              ": running_means, running_vars, batch_means, batch_vars and factors must have the same length");
  for (const auto i : c10::irange(n)) {
    at::Tensor rm = running_means[i], rv = running_vars[i];
    layers.update_running_stats(rm, rv, batch_means[i], batch_vars[i], factors[i]);
  }
}

FUSED_MLP_ISA_END
}  // namespace fused_mlp
