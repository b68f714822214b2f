// Argument checks and argument helpers of the Linear -> BatchNorm1d -> ReLU -> Dropout ops, shared
// by the CPU kernels and the CUDA host sequence, so both refuse the same input with the same message
// and read their optional arguments the same way.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <utility>

#include "common/host_device.h"

namespace fused_mlp {
FUSED_MLP_ISA_BEGIN

inline bool defined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// A per-feature parameter as a contiguous acc tensor, or undefined when absent.
inline at::Tensor as_acc(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  return defined(t) ? t->to(acc).contiguous() : at::Tensor();
}

// The dtype of a BN parameter's gradient: the parameter's own, acc when there is none.
inline at::ScalarType param_type(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  return defined(t) ? t->scalar_type() : acc;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// BatchNorm's optional affine parameters: one per feature, floating-point, on the input's device.
inline void check_bn_params(const at::Tensor& input, int64_t C, const c10::optional<at::Tensor>& bn_weight,
                            const c10::optional<at::Tensor>& bn_bias, const char* op) {
  for (const auto* t : {&bn_weight, &bn_bias}) {
    if (t->has_value() && (*t)->defined()) {
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == C, op, ": BatchNorm weight and bias must have shape (", C,
                  "), got ", (*t)->sizes());
      TORCH_CHECK(at::isFloatingType((*t)->scalar_type()), op, ": BatchNorm parameters must be floating-point");
      TORCH_CHECK((*t)->device() == input.device(), op, ": BatchNorm parameters are on ", (*t)->device(),
                  " but input is on ", input.device());
    }
  }
}

inline void check_dropout(const at::Tensor& input, double dropout_p, const at::Tensor& seed_offset, const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    // On the CPU, or on the input's device (where a CUDA generator's (seed, offset) lives).
    TORCH_CHECK(seed_offset.scalar_type() == at::kLong && seed_offset.numel() == 2 &&
                    (seed_offset.device().is_cpu() || seed_offset.device() == input.device()),
                op, ": seed_offset must be a CPU int64 tensor holding (seed, offset), or one on the input's device");
  }
}

inline void check_layer(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
                        double dropout_p, const at::Tensor& seed_offset, const char* op) {
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape (batch, in_features), got shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": expected a floating-point input, got ",
              input.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == input.size(1), op, ": weight must have shape (out_features, ",
              input.size(1), "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op, ": weight is on ", weight.device(), " but input is on ",
              input.device());
  const int64_t C = weight.size(0);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape (", C, "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " does not match input dtype ", input.scalar_type());
    TORCH_CHECK(bias->device() == input.device(), op, ": bias is on ", bias->device(), " but input is on ",
                input.device());
  }
  check_bn_params(input, C, bn_weight, bn_bias, op);
  check_dropout(input, dropout_p, seed_offset, op);
}

// The pre-BN activation the stage ops take: (rows, features), floating-point, and, to compute batch
// statistics from, two rows or more (as PyTorch requires).
inline void check_pre_bn(const at::Tensor& pre_bn, bool batch_stats, const char* op) {
  TORCH_CHECK(pre_bn.dim() == 2, op, ": expected pre_bn of shape (batch, features), got shape ", pre_bn.sizes());
  TORCH_CHECK(at::isFloatingType(pre_bn.scalar_type()), op, ": expected a floating-point pre_bn, got ",
              pre_bn.scalar_type());
  TORCH_CHECK(!batch_stats || pre_bn.size(0) > 1,
              "Expected more than 1 value per channel when training, got input size ", pre_bn.sizes());
}

// The per-feature statistics an epilogue normalizes with: (features,) in the accumulation dtype, on
// pre_bn's device, as bn_batch_stats returns them.
inline void check_feature_stats(const at::Tensor& pre_bn, const at::Tensor& mean, const at::Tensor& invstd,
                                const char* op) {
  const int64_t C = pre_bn.size(1);
  const auto acc = at::toOpMathType(pre_bn.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean}, {"invstd", &invstd}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == acc, op, ": ", name, " must have shape (", C,
                ") and dtype ", acc, ", got shape ", t->sizes(), " and dtype ", t->scalar_type());
    TORCH_CHECK(t->device() == pre_bn.device(), op, ": ", name, " is on ", t->device(), " but pre_bn is on ",
                pre_bn.device());
  }
}

// The forward's mode: batch statistics need two rows or more (as PyTorch requires); running
// statistics must be given, one per feature, on the input's device.
inline void check_statistics_mode(const at::Tensor& input, int64_t C, bool use_batch_stats,
                                  const c10::optional<at::Tensor>& running_mean,
                                  const c10::optional<at::Tensor>& running_var, const char* op) {
  if (use_batch_stats) {
    TORCH_CHECK(input.size(0) > 1, "Expected more than 1 value per channel when training, got input size ",
                input.sizes());
    return;
  }
  TORCH_CHECK(defined(running_mean) && defined(running_var), op,
              ": running_mean and running_var are required when use_batch_stats is false");
  TORCH_CHECK(running_mean->numel() == C && running_var->numel() == C, op, ": running_mean and running_var must have ",
              C, " elements");
  TORCH_CHECK(running_mean->device() == input.device() && running_var->device() == input.device(), op,
              ": running_mean and running_var must be on the input's device (", input.device(), ")");
}

// The backward's tensors from the forward: grad_out and saved (N, C) in the input's dtype, mean and
// invstd (C) in acc, all on the input's device.
inline void check_backward_tensors(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& saved,
                                   const at::Tensor& mean, const at::Tensor& invstd, int64_t C, const char* op) {
  const int64_t N = input.size(0);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({N, C}) && grad_out.scalar_type() == input.scalar_type(), op,
              ": grad_out must have shape (", N, ", ", C, ") and the input's dtype, got ", grad_out.sizes(), " ",
              grad_out.scalar_type());
  TORCH_CHECK(saved.sizes() == at::IntArrayRef({N, C}) && saved.scalar_type() == input.scalar_type(), op,
              ": saved must be the forward's pre-BN activation (batch statistics) or output "
              "(running statistics), of shape (",
              N, ", ", C, "); got ", saved.sizes());
  const auto acc = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(mean.numel() == C && invstd.numel() == C && mean.scalar_type() == acc && invstd.scalar_type() == acc, op,
              ": mean and invstd must be the forward's");
  for (const at::Tensor* t : {&grad_out, &saved, &mean, &invstd}) {
    TORCH_CHECK(t->device() == input.device(), op, ": every tensor must be on the input's device (", input.device(),
                "), got one on ", t->device());
  }
}

// The backward stage ops' common arguments: grad_out of pre_bn's shape, dtype and device, pre_bn's
// statistics, the BatchNorm parameters and the dropout.
inline void check_backward_stage(const at::Tensor& grad_out, const at::Tensor& pre_bn, const at::Tensor& mean,
                                 const at::Tensor& invstd, const c10::optional<at::Tensor>& bn_weight,
                                 const c10::optional<at::Tensor>& bn_bias, double dropout_p,
                                 const at::Tensor& seed_offset, const char* op) {
  check_pre_bn(pre_bn, /*batch_stats=*/false, op);
  TORCH_CHECK(grad_out.sizes() == pre_bn.sizes() && grad_out.scalar_type() == pre_bn.scalar_type() &&
                  grad_out.device() == pre_bn.device(),
              op, ": grad_out must have pre_bn's shape, dtype and device, got ", grad_out.sizes(), " ",
              grad_out.scalar_type());
  check_feature_stats(pre_bn, mean, invstd, op);
  check_bn_params(pre_bn, pre_bn.size(1), bn_weight, bn_bias, op);
  check_dropout(pre_bn, dropout_p, seed_offset, op);
}

// The per-feature sums bn_backward_finish takes: (features,) in the accumulation dtype, on pre_bn's
// device, as bn_backward_sums returns them (or their all-reduced totals).
inline void check_backward_sums(const at::Tensor& pre_bn, const at::Tensor& sum_dy, const at::Tensor& sum_dy_zhat,
                                const char* op) {
  const int64_t C = pre_bn.size(1);
  const auto acc = at::toOpMathType(pre_bn.scalar_type());
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"sum_dy", &sum_dy}, {"sum_dy_zhat", &sum_dy_zhat}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == acc && t->device() == pre_bn.device(), op, ": ",
                name, " must have shape (", C, "), dtype ", acc, " and pre_bn's device, got shape ", t->sizes(),
                " and dtype ", t->scalar_type());
  }
}

// bn_backward_finish's arguments: the layer's, the backward's saved tensors, the sums, and a count
// of at least this call's rows.
inline void check_backward_finish(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
                                  const at::Tensor& pre_bn, const at::Tensor& mean, const at::Tensor& invstd,
                                  const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
                                  const at::Tensor& sum_dy, const at::Tensor& sum_dy_zhat, int64_t count,
                                  double dropout_p, const at::Tensor& seed_offset, const char* op) {
  check_layer(input, weight, c10::nullopt, bn_weight, bn_bias, dropout_p, seed_offset, op);
  check_backward_tensors(grad_out, input, pre_bn, mean, invstd, weight.size(0), op);
  check_backward_sums(pre_bn, sum_dy, sum_dy_zhat, op);
  TORCH_CHECK(count >= input.size(0) && count > 0, op,
              ": count must be the number of rows the sums are over (at least ", input.size(0), "), got ", count);
}

FUSED_MLP_ISA_END
}  // namespace fused_mlp
