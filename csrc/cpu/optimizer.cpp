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

// body.apply(i, len) over the vectors of n elements, split among threads: whole vectors (len == W, a
// compile-time constant there, so the inlined loads and stores are plain ones) then the last partial
// one (masked). The body's state is copied into each thread's locals, so the loop reads no captured
// references.
template <typename T, typename Body>
void for_each_vector(int64_t n, const Body& body) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t vectors = (n + W - 1) / W, whole = n / W;
  at::parallel_for(0, vectors, std::max<int64_t>(1, kGrainElements / W), [&](int64_t begin, int64_t end) {
    const Body local = body;
    const int64_t whole_end = std::min(end, whole);
    for (int64_t v = begin; v < whole_end; ++v) local.apply(v * W, W);
    if (end > whole_end) local.apply(whole_end * W, n - whole_end * W);
  });
}

// Adam's update (AdamElement's expressions, in its order) of the vector at element i of each array.
template <typename T>
struct AdamVectors {
  using Vec = at::vec::Vectorized<T>;
  T* p;
  const T* grad;
  T* m;
  T* v;
  T* v_max;
  Vec lr_wd, weight_decay, beta1_complement, beta2, beta2_complement, eps, step_size, bias_correction2_sqrt;
  bool maximize, decay, decoupled, amsgrad;

  AdamVectors(T* p_, const T* grad_, T* m_, T* v_, T* v_max_, const AdamElement<T>& e)
      : p(p_),
        grad(grad_),
        m(m_),
        v(v_),
        v_max(v_max_),
        lr_wd(e.lr_wd),
        weight_decay(e.weight_decay),
        beta1_complement(e.beta1_complement),
        beta2(e.beta2),
        beta2_complement(e.beta2_complement),
        eps(e.eps),
        step_size(e.step_size),
        bias_correction2_sqrt(e.bias_correction2_sqrt),
        maximize(e.maximize),
        decay(e.weight_decay != T(0)),
        decoupled(e.decoupled),
        amsgrad(e.amsgrad) {}

  C10_ALWAYS_INLINE void apply(int64_t i, int64_t len) const {
    Vec pv = Vec::loadu(p + i, len), g = Vec::loadu(grad + i, len);
    if (maximize) g = g.neg();
    if (decay) {
      if (decoupled) {
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
    if (amsgrad) {
      const Vec old = Vec::loadu(v_max + i, len);
      second = Vec::blendv(old, vv, old < vv);
      second.store(v_max + i, len);
    }
    const Vec denom = second.sqrt() / bias_correction2_sqrt + eps;
    pv = pv - step_size * mv / denom;
    pv.store(p + i, len);
    mv.store(m + i, len);
    vv.store(v + i, len);
  }
};

template <typename T>
void adam_update(T* p, const T* grad, T* m, T* v, T* v_max, int64_t n, const AdamScalars& s) {
  for_each_vector<T>(n, AdamVectors<T>(p, grad, m, v, v_max, AdamElement<T>(s)));
}

// SGD's update (SgdElement's expressions, in its order) of the vector at element i of each array.
template <typename T>
struct SgdVectors {
  using Vec = at::vec::Vectorized<T>;
  T* p;
  const T* grad;
  T* buf;
  Vec lr, weight_decay, momentum, dampening_complement;
  bool maximize, decay, has_momentum, first, nesterov;

  SgdVectors(T* p_, const T* grad_, T* buf_, const SgdElement<T>& e)
      : p(p_),
        grad(grad_),
        buf(buf_),
        lr(e.lr),
        weight_decay(e.weight_decay),
        momentum(e.momentum),
        dampening_complement(e.dampening_complement),
        maximize(e.maximize),
        decay(e.weight_decay != T(0)),
        has_momentum(e.has_momentum),
        first(e.first),
        nesterov(e.nesterov) {}

  C10_ALWAYS_INLINE void apply(int64_t i, int64_t len) const {
    Vec pv = Vec::loadu(p + i, len), g = Vec::loadu(grad + i, len);
    if (maximize) g = g.neg();
    if (decay) g = g + pv * weight_decay;
    if (has_momentum) {
      const Vec b = first ? g : momentum * Vec::loadu(buf + i, len) + dampening_complement * g;
      b.store(buf + i, len);
      g = nesterov ? g + momentum * b : b;
    }
    pv = pv - lr * g;
    pv.store(p + i, len);
  }
};

template <typename T>
void sgd_update(T* p, const T* grad, T* buf, int64_t n, const SgdScalars& s) {
  for_each_vector<T>(n, SgdVectors<T>(p, grad, buf, SgdElement<T>(s)));
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
