// The argument checks of the cross-entropy ops, shared by every backend's launcher.
#pragma once

#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common/host_device.h"

namespace fused_mlp {
FUSED_MLP_ISA_BEGIN

struct Problem {
  int64_t rows, classes;
  bool prob_target;
  at::Reduction::Reduction reduction;
  int64_t ignore_index;
  double label_smoothing;
};

inline Problem check_problem(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                             int64_t reduction, int64_t ignore_index, double label_smoothing, const char* op) {
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape (rows, classes), got shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": expected a floating-point input, got ",
              input.scalar_type());
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(input.size(1) > 0, op, ": input must have at least one class, got shape ", input.sizes());
  TORCH_CHECK(target.device() == input.device(), op, ": target is on ", target.device(), " but input is on ",
              input.device());
  const bool prob = at::isFloatingType(target.scalar_type());
  if (prob) {
    TORCH_CHECK(target.sizes() == input.sizes(), op, ": a probability target must have the input's shape ",
                input.sizes(), ", got ", target.sizes());
    TORCH_CHECK(target.scalar_type() == input.scalar_type(), op, ": a probability target must have the input's dtype ",
                input.scalar_type(), ", got ", target.scalar_type());
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, op,
                ": expected int64 class indices or a floating-point probability target, got ", target.scalar_type());
    TORCH_CHECK(target.dim() == 1 && target.size(0) == input.size(0), op, ": class-index target must have shape (",
                input.size(0), "), got ", target.sizes());
  }
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.device() == input.device(), op, ": weight is on ", w.device(), " but input is on ", input.device());
    TORCH_CHECK(w.dim() == 1 && w.size(0) == input.size(1), op,
                ": weight must be a 1-D tensor with one entry per class (", input.size(1), "), got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == input.scalar_type(), op, ": weight must have the input's dtype ",
                input.scalar_type(), ", got ", w.scalar_type());
  }
  return {input.size(0), input.size(1),  prob, static_cast<at::Reduction::Reduction>(reduction),
          ignore_index,  label_smoothing};
}

// The backward's tensors besides the forward's arguments: the forward's logsumexp, and a grad_loss
// of the loss's shape and the input's dtype.
inline void check_backward(const Problem& pb, const at::Tensor& input, const at::Tensor& grad_loss,
                           const at::Tensor& logsumexp, const char* op) {
  TORCH_CHECK(logsumexp.dim() == 1 && logsumexp.size(0) == pb.rows && logsumexp.scalar_type() == at::kDouble, op,
              ": logsumexp must be the forward's (shape (", pb.rows, "), dtype float64), got shape ", logsumexp.sizes(),
              " and dtype ", logsumexp.scalar_type());
  TORCH_CHECK(logsumexp.device() == input.device(), op, ": logsumexp is on ", logsumexp.device(), " but input is on ",
              input.device());
  if (pb.reduction == at::Reduction::None) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == pb.rows, op, ": grad_loss must have shape (", pb.rows,
                ") for reduction none, got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.dim() == 0, op, ": grad_loss must be a scalar for reduction mean/sum, got shape ",
                grad_loss.sizes());
  }
  TORCH_CHECK(grad_loss.scalar_type() == input.scalar_type(), op, ": grad_loss must have the input's dtype ",
              input.scalar_type(), ", got ", grad_loss.scalar_type());
  TORCH_CHECK(grad_loss.device() == input.device(), op, ": grad_loss is on ", grad_loss.device(), " but input is on ",
              input.device());
}

FUSED_MLP_ISA_END
}  // namespace fused_mlp
