// Argument checks of the Linear -> BatchNorm1d -> ReLU -> Dropout ops, shared by the CPU kernels and
// the CUDA host sequence, so both refuse the same input with the same message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fused_mlp {

inline void check_layer(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
                        double dropout_p, const at::Tensor& seed_offset, const char* op) {
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape (batch, in_features), got shape ",
              input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": expected a floating-point input, got ",
              input.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == input.size(1), op,
              ": weight must have shape (out_features, ", input.size(1), "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op, ": weight is on ", weight.device(),
              " but input is on ", input.device());
  const int64_t C = weight.size(0);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape (", C, "), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " does not match input dtype ", input.scalar_type());
    TORCH_CHECK(bias->device() == input.device(), op, ": bias is on ", bias->device(), " but input is on ",
                input.device());
  }
  for (const auto* t : {&bn_weight, &bn_bias}) {
    if (t->has_value() && (*t)->defined()) {
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == C, op,
                  ": BatchNorm weight and bias must have shape (", C, "), got ", (*t)->sizes());
      TORCH_CHECK(at::isFloatingType((*t)->scalar_type()), op, ": BatchNorm parameters must be floating-point");
      TORCH_CHECK((*t)->device() == input.device(), op, ": BatchNorm parameters are on ", (*t)->device(),
                  " but input is on ", input.device());
    }
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    // On the CPU, or on the input's device (where a CUDA generator's (seed, offset) lives).
    TORCH_CHECK(seed_offset.scalar_type() == at::kLong && seed_offset.numel() == 2 &&
                    (seed_offset.device().is_cpu() || seed_offset.device() == input.device()), op,
                ": seed_offset must be a CPU int64 tensor holding (seed, offset), or one on the input's device");
  }
}

}  // namespace fused_mlp
