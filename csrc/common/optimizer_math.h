// The optimizer updates of a training step (fused_mlp::mlp_train_step), as torch.optim defines them,
// one element at a time: the scalar form the CUDA kernels and the CPU kernels' tails use. The CPU
// kernels vectorize the same expressions in the same order (csrc/cpu/optimizer.cpp).
//
// Adam / AdamW (torch.optim.Adam, AdamW), with the step counter t already advanced:
//   g = maximize ? -grad : grad
//   Adam, weight decay:  g = g + wd * p          AdamW:  p = p * (1 - lr * wd)
//   m = m + (1 - beta1) * (g - m)                (lerp toward g)
//   v = v * beta2 + g * g * (1 - beta2)
//   amsgrad: v_max = max(v_max, v), read in place of v below
//   p = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// SGD (torch.optim.SGD):
//   g = maximize ? -grad : grad;  g = g + wd * p
//   momentum: b = first step ? g : momentum * b + (1 - dampening) * g;  g = nesterov ? g + momentum * b : b
//   p = p - lr * g
#pragma once

#include <math.h>

#include <cstdint>

#include "common/host_device.h"

namespace fused_mlp {

// Plain data, the same in every build (the CPU kernel tables take these structs): outside the
// per-instruction-set namespace, with no functions of their own.

// Which optimizer a training step applies (the `optimizer` argument of mlp_train_step).
enum class OptimizerKind : int64_t { kSgd = 0, kAdam = 1, kAdamW = 2 };

// The columns of a parameter group's row of hyperparameters (mlp_train_step's
// group_hyperparameters: float64, one row per group).
enum HyperColumn : int64_t {
  kLr = 0,
  kWeightDecay = 1,
  kBeta1OrMomentum = 2,
  kBeta2OrDampening = 3,
  kEps = 4,
  kFlags = 5,
  kHyperColumns = 6
};
// The bits of the flags column.
enum HyperFlag : int64_t {
  kMaximize = 1,
  kAmsgradOrNesterov = 2,
  kFirstMomentumStep = 4  // SGD: no momentum buffer yet; it starts as the gradient itself
};

// One Adam / AdamW update's scalars, from a group's row and the advanced step counter.
struct AdamScalars {
  double lr, weight_decay, beta1, beta2, eps;
  double step_size;              // lr / (1 - beta1^t)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  bool amsgrad, maximize, decoupled;
};

struct SgdScalars {
  double lr, weight_decay, momentum, dampening;
  bool nesterov, maximize, first;
};

FUSED_MLP_ISA_BEGIN

FUSED_MLP_HD AdamScalars adam_scalars(const double* row, double step, bool decoupled) {
  const auto flags = static_cast<int64_t>(row[kFlags]);
  AdamScalars s{};  // the pow and sqrt of <math.h>: double on the host and the device alike
  s.lr = row[kLr];
  s.weight_decay = row[kWeightDecay];
  s.beta1 = row[kBeta1OrMomentum];
  s.beta2 = row[kBeta2OrDampening];
  s.eps = row[kEps];
  s.step_size = s.lr / (1.0 - pow(s.beta1, step));
  s.bias_correction2_sqrt = sqrt(1.0 - pow(s.beta2, step));
  s.amsgrad = (flags & kAmsgradOrNesterov) != 0;
  s.maximize = (flags & kMaximize) != 0;
  s.decoupled = decoupled;
  return s;
}

FUSED_MLP_HD SgdScalars sgd_scalars(const double* row) {
  const auto flags = static_cast<int64_t>(row[kFlags]);
  return {row[kLr],
          row[kWeightDecay],
          row[kBeta1OrMomentum],
          row[kBeta2OrDampening],
          (flags & kAmsgradOrNesterov) != 0,
          (flags & kMaximize) != 0,
          (flags & kFirstMomentumStep) != 0};
}

// The update of one element; T is the accumulation type (float for float parameters).
template <typename T>
struct AdamElement {
  T lr_wd, weight_decay, beta1_complement, beta2, beta2_complement, eps, step_size, bias_correction2_sqrt;
  bool amsgrad, maximize, decoupled;

  FUSED_MLP_HD explicit AdamElement(const AdamScalars& s)
      : lr_wd(static_cast<T>(1.0 - s.lr * s.weight_decay)),
        weight_decay(static_cast<T>(s.weight_decay)),
        beta1_complement(static_cast<T>(1.0 - s.beta1)),
        beta2(static_cast<T>(s.beta2)),
        beta2_complement(static_cast<T>(1.0 - s.beta2)),
        eps(static_cast<T>(s.eps)),
        step_size(static_cast<T>(s.step_size)),
        bias_correction2_sqrt(static_cast<T>(s.bias_correction2_sqrt)),
        amsgrad(s.amsgrad),
        maximize(s.maximize),
        decoupled(s.decoupled) {}

  FUSED_MLP_HD void operator()(T& p, T grad, T& m, T& v, T* v_max) const {
    T g = maximize ? -grad : grad;
    if (weight_decay != T(0)) {
      if (decoupled) {
        p = p * lr_wd;
      } else {
        g = g + p * weight_decay;
      }
    }
    m = m + beta1_complement * (g - m);
    v = v * beta2 + g * g * beta2_complement;
    T second = v;
    if (amsgrad) {
      *v_max = *v_max < v ? v : *v_max;
      second = *v_max;
    }
    const T denom = sqrt(second) / bias_correction2_sqrt + eps;
    p = p - step_size * m / denom;
  }
};

template <typename T>
struct SgdElement {
  T lr, weight_decay, momentum, dampening_complement;
  bool nesterov, maximize, first, has_momentum;

  FUSED_MLP_HD explicit SgdElement(const SgdScalars& s)
      : lr(static_cast<T>(s.lr)),
        weight_decay(static_cast<T>(s.weight_decay)),
        momentum(static_cast<T>(s.momentum)),
        dampening_complement(static_cast<T>(1.0 - s.dampening)),
        nesterov(s.nesterov),
        maximize(s.maximize),
        first(s.first),
        has_momentum(s.momentum != 0.0) {}

  FUSED_MLP_HD void operator()(T& p, T grad, T* buf) const {
    T g = maximize ? -grad : grad;
    if (weight_decay != T(0)) g = g + p * weight_decay;
    if (has_momentum) {
      *buf = first ? g : momentum * *buf + dampening_complement * g;
      g = nesterov ? g + momentum * *buf : *buf;
    }
    p = p - lr * g;
  }
};

FUSED_MLP_ISA_END
}  // namespace fused_mlp
