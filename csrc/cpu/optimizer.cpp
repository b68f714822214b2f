// The optimizer updates of a training step on the CPU (fused_mlp::mlp_train_step): Adam, AdamW and
// SGD over one parameter, its gradient and its state, in place. The maths is
// csrc/common/optimizer_math.h, vectorized here in the same order; every element, the last partial
// vector's included, takes the vector form, so no element's rounding depends on where a thread's
// range ends.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "common/optimizer_math.h"
#include "cpu/kernels.h"

namespace fused_mlp::cpu {
FUSED_MLP_ISA_BEGIN
namespace {

// Vectors per parallel task: an update reads and writes a few arrays once, and a parallel region
// costs about as much as updating a few thousand elements.
constexpr int64_t kGrainElements = 16384;

template <typename T, typename Body>
void for_each_vector(int64_t n, Body body) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t vectors = (n + W - 1) / W;
  at::parallel_for(0, vectors, std::max<int64_t>(1, kGrainElements / W), [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) body(v * W, std::min(W, n - v * W));
  });
}

template <typename T>
void adam_update(T* p, const T* grad, T* m, T* v, T* v_max, int64_t n, const AdamScalars& s) {
  using Vec = at::vec::Vectorized<T>;
  const AdamElement<T> e(s);
  const Vec lr_wd(e.lr_wd), weight_decay(e.weight_decay), beta1_complement(e.beta1_complement), beta2(e.beta2);
  const Vec beta2_complement(e.beta2_complement), eps(e.eps), step_size(e.step_size);
  const Vec bias_correction2_sqrt(e.bias_correction2_sqrt);
  for_each_vector<T>(n, [&](int64_t i, int64_t len) {
    Vec pv = Vec::loadu(p + i, len), g = Vec::loadu(grad + i, len);
    if (e.maximize) g = g.neg();
    if (e.weight_decay != T(0)) {
      if (e.decoupled) {
        pv = pv * lr_wd;
      } else {
        g = g + pv * weight_decay;
      }
    }
    Vec mv = Vec::loadu(m + i, len);
    mv = mv + beta1_complement * (g - mv);
    Vec vv = Vec::loadu(v + i, len);
    vv = vv * beta2 + g * g * beta2_complement;
    Vec second = vv;
    if (e.amsgrad) {
      const Vec old = Vec::loadu(v_max + i, len);
      second = Vec::blendv(old, vv, old < vv);
      second.store(v_max + i, len);
    }
    const Vec denom = second.sqrt() / bias_correction2_sqrt + eps;
    pv = pv - step_size * mv / denom;
    pv.store(p + i, len);
    mv.store(m + i, len);
    vv.store(v + i, len);
  });
}

template <typename T>
void sgd_update(T* p, const T* grad, T* buf, int64_t n, const SgdScalars& s) {
  using Vec = at::vec::Vectorized<T>;
  const SgdElement<T> e(s);
  const Vec lr(e.lr), weight_decay(e.weight_decay), momentum(e.momentum);
  const Vec dampening_complement(e.dampening_complement);
  for_each_vector<T>(n, [&](int64_t i, int64_t len) {
    Vec pv = Vec::loadu(p + i, len), g = Vec::loadu(grad + i, len);
    if (e.maximize) g = g.neg();
    if (e.weight_decay != T(0)) g = g + pv * weight_decay;
    if (e.has_momentum) {
      Vec b = e.first ? g : momentum * Vec::loadu(buf + i, len) + dampening_complement * g;
      b.store(buf + i, len);
      g = e.nesterov ? g + momentum * b : b;
    }
    pv = pv - lr * g;
    pv.store(p + i, len);
  });
}

// The tensors are contiguous, of one float or double dtype and of one size (checked by the caller).
void adam_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
              const at::Tensor& max_exp_avg_sq, const AdamScalars& s) {
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "adam_update", [&] {
    adam_update<scalar_t>(param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                          exp_avg.mutable_data_ptr<scalar_t>(), exp_avg_sq.mutable_data_ptr<scalar_t>(),
                          s.amsgrad ? max_exp_avg_sq.mutable_data_ptr<scalar_t>() : nullptr, param.numel(), s);
  });
}

void sgd_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& momentum_buffer, const SgdScalars& s) {
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_update", [&] {
    sgd_update<scalar_t>(param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                         s.momentum != 0.0 ? momentum_buffer.mutable_data_ptr<scalar_t>() : nullptr, param.numel(), s);
  });
}

}  // namespace
FUSED_MLP_ISA_END

const OptimizerKernels& FUSED_MLP_THIS_CPU_VARIANT(optimizer_kernels)() {
  static constexpr OptimizerKernels kernels{&adam_cpu, &sgd_cpu};
  return kernels;
}

}  // namespace fused_mlp::cpu
