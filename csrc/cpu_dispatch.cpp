// The CPU ops as PyTorch sees them: one registration per op, calling the variant of the kernels
// (csrc/cpu/*.cpp, compiled once per instruction set) that suits the running CPU.
//
// Compiled for the baseline instruction set, like ops.cpp: nothing here may assume more.
#include <ATen/Version.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randint.h>
#include <torch/library.h>

#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "mlp_network.h"
#include "mlp_train_step.h"

namespace fused_mlp::cpu {
namespace {

// The best variant this CPU can run, by the same CPUID features ATen requires for its own AVX2 and
// AVX512 kernels, plus F16C, which the float16 conversions of both use.
CpuCapability hardware_capability() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  const bool fma_f16c = __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (fma_f16c && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return CpuCapability::kAvx512;
  }
  if (fma_f16c && __builtin_cpu_supports("avx2")) return CpuCapability::kAvx2;
#endif
  return CpuCapability::kDefault;
}

// ATen's own choice (its DispatchStub's): the CPU's best unless ATEN_CPU_CAPABILITY asks for less.
CpuCapability aten_capability() {
  const std::string name = at::get_cpu_capability();
  if (name == "AVX512") return CpuCapability::kAvx512;
  if (name == "AVX2") return CpuCapability::kAvx2;
  return CpuCapability::kDefault;
}

CpuCapability built_capability() {
#if defined(FUSED_MLP_CPU_HAVE_AVX512)
  return CpuCapability::kAvx512;
#elif defined(FUSED_MLP_CPU_HAVE_AVX2)
  return CpuCapability::kAvx2;
#else
  return CpuCapability::kDefault;
#endif
}

const CrossEntropyKernels& cross_entropy() {
  static const CrossEntropyKernels& table = FUSED_MLP_SELECT_CPU_VARIANT(cross_entropy_kernels);
  return table;
}
const LinearBnReluKernels& linear_bn_relu() {
  static const LinearBnReluKernels& table = FUSED_MLP_SELECT_CPU_VARIANT(linear_bn_relu_kernels);
  return table;
}
const DropoutKernels& dropout() {
  static const DropoutKernels& table = FUSED_MLP_SELECT_CPU_VARIANT(dropout_kernels);
  return table;
}
const GemmKernels& gemm() {
  static const GemmKernels& table = FUSED_MLP_SELECT_CPU_VARIANT(gemm_kernels);
  return table;
}
const OptimizerKernels& optimizer() {
  static const OptimizerKernels& table = FUSED_MLP_SELECT_CPU_VARIANT(optimizer_kernels);
  return table;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& input, const at::Tensor& target,
                                                         const OptionalTensor& weight, int64_t reduction,
                                                         int64_t ignore_index, double label_smoothing) {
  return cross_entropy().forward(input, target, weight, reduction, ignore_index, label_smoothing);
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                  const OptionalTensor& weight, const at::Tensor& logsumexp, int64_t reduction,
                                  int64_t ignore_index, double label_smoothing) {
  return cross_entropy().backward(grad_loss, input, target, weight, logsumexp, reduction, ignore_index,
                                  label_smoothing);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_forward(
    const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias, const OptionalTensor& bn_weight,
    const OptionalTensor& bn_bias, const OptionalTensor& running_mean, const OptionalTensor& running_var,
    bool use_batch_stats, double eps, double dropout_p, const at::Tensor& seed_offset) {
  return linear_bn_relu().forward(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats,
                                  eps, dropout_p, seed_offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
    const OptionalTensor& bn_weight, const OptionalTensor& bn_bias, const at::Tensor& saved, const at::Tensor& mean,
    const at::Tensor& invstd, bool use_batch_stats, double dropout_p, const at::Tensor& seed_offset,
    bool need_grad_input) {
  return linear_bn_relu().backward(grad_out, input, weight, bias, bn_weight, bn_bias, saved, mean, invstd,
                                   use_batch_stats, dropout_p, seed_offset, need_grad_input, /*need_grad_weight=*/true,
                                   /*output=*/at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_batch_stats(const at::Tensor& pre_bn, double eps) {
  return linear_bn_relu().batch_stats(pre_bn, eps);
}

at::Tensor bn_relu_dropout(const at::Tensor& pre_bn, const at::Tensor& mean, const at::Tensor& invstd,
                           const OptionalTensor& bn_weight, const OptionalTensor& bn_bias, double dropout_p,
                           const at::Tensor& seed_offset) {
  return linear_bn_relu().bn_relu_dropout(pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset);
}

std::tuple<at::Tensor, at::Tensor> bn_backward_sums(const at::Tensor& grad_out, const at::Tensor& pre_bn,
                                                    const at::Tensor& mean, const at::Tensor& invstd,
                                                    const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
                                                    double dropout_p, const at::Tensor& seed_offset) {
  return linear_bn_relu().backward_sums(grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_finish(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& pre_bn,
    const at::Tensor& mean, const at::Tensor& invstd, const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
    const at::Tensor& sum_dy, const at::Tensor& sum_dy_zhat, int64_t count, double dropout_p,
    const at::Tensor& seed_offset, bool need_grad_input) {
  return linear_bn_relu().backward_finish(grad_out, input, weight, pre_bn, mean, invstd, bn_weight, bn_bias, sum_dy,
                                          sum_dy_zhat, count, dropout_p, seed_offset, need_grad_input);
}

at::Tensor linear_relu_dropout_forward(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                                       double dropout_p, const at::Tensor& seed_offset) {
  return linear_bn_relu().linear_relu_dropout_forward(input, weight, bias, dropout_p, seed_offset);
}

void bn_update_running_stats_(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& batch_mean,
                              const at::Tensor& batch_var, double factor) {
  linear_bn_relu().update_running_stats(running_mean, running_var, batch_mean, batch_var, factor);
}

at::Tensor philox4x32_10(const at::Tensor& counter, const at::Tensor& key) {
  return dropout().philox4x32_10(counter, key);
}

at::Tensor dropout_mask(const at::Tensor& seed_offset, int64_t numel, double p, int64_t start) {
  return dropout().dropout_mask(seed_offset, numel, p, start);
}

// The layer kernels of the whole-network ops (csrc/mlp_network.h): this CPU's variants.
struct CpuLayers {
  const LinearBnReluKernels& kernels = linear_bn_relu();
  const GemmKernels& gemms = gemm();

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias, const OptionalTensor& bn_weight,
      const OptionalTensor& bn_bias, const OptionalTensor& running_mean, const OptionalTensor& running_var,
      bool use_batch_stats, double eps, double dropout_p, const at::Tensor& seed_offset) const {
    return kernels.forward(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps,
                           dropout_p, seed_offset);
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
      const OptionalTensor& bn_weight, const OptionalTensor& bn_bias, const at::Tensor& saved, const at::Tensor& mean,
      const at::Tensor& invstd, bool use_batch_stats, double dropout_p, const at::Tensor& seed_offset,
      bool need_grad_input, bool need_grad_weight, const at::Tensor& output) const {
    return kernels.backward(grad_out, input, weight, bias, bn_weight, bn_bias, saved, mean, invstd, use_batch_stats,
                            dropout_p, seed_offset, need_grad_input, need_grad_weight, output);
  }
  at::Tensor linear_relu_dropout(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                                 double dropout_p, const at::Tensor& seed_offset) const {
    return kernels.linear_relu_dropout_forward(input, weight, bias, dropout_p, seed_offset);
  }
  at::Tensor bn_relu_dropout(const at::Tensor& pre_bn, const at::Tensor& mean, const at::Tensor& invstd,
                             const OptionalTensor& bn_weight, const OptionalTensor& bn_bias, double dropout_p,
                             const at::Tensor& seed_offset) const {
    return kernels.bn_relu_dropout(pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset);
  }
  at::Tensor relu_dropout_backward(const at::Tensor& grad_out, const at::Tensor& output, double dropout_p,
                                   const at::Tensor& seed_offset) const {
    return kernels.relu_dropout_backward(grad_out, output, dropout_p, seed_offset);
  }
  at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias) const {
    return gemms.nt(input, weight, bias);
  }
  at::Tensor matmul(const at::Tensor& a, const at::Tensor& b) const { return gemms.nn(a, b); }
  at::Tensor matmul_tn(const at::Tensor& a, const at::Tensor& b) const { return gemms.tn(a, b); }
  void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& batch_mean,
                            const at::Tensor& batch_var, double factor) const {
    kernels.update_running_stats(running_mean, running_var, batch_mean, batch_var, factor);
  }
};

std::tuple<at::Tensor, TensorVector, TensorVector, TensorVector, TensorVector, TensorVector> mlp_forward_cpu(
    const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases,
    const OptionalTensorList& bn_weights, const OptionalTensorList& bn_biases, const OptionalTensorList& running_means,
    const OptionalTensorList& running_vars, bool batch_norm, bool use_batch_stats, double eps, double dropout_p,
    const at::Tensor& seed_offset) {
  return mlp_forward(CpuLayers{}, input, weights, biases, bn_weights, bn_biases, running_means, running_vars,
                     batch_norm, use_batch_stats, eps, dropout_p, seed_offset, "fused_mlp::mlp_forward");
}

std::tuple<at::Tensor, TensorVector, TensorVector, TensorVector, TensorVector> mlp_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases,
    const OptionalTensorList& bn_weights, const OptionalTensorList& bn_biases, at::TensorList hidden,
    at::TensorList pre_bn, at::TensorList mean, at::TensorList invstd, bool batch_norm, bool use_batch_stats,
    double dropout_p, const at::Tensor& seed_offset, bool need_grad_input, const c10::List<bool>& need_layer_grads) {
  return mlp_backward(CpuLayers{}, grad_out, input, weights, biases, bn_weights, bn_biases, hidden, pre_bn, mean,
                      invstd, batch_norm, use_batch_stats, dropout_p, seed_offset, need_grad_input, need_layer_grads,
                      "fused_mlp::mlp_backward");
}

at::Tensor mlp_inference_cpu(const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases) {
  return mlp_inference(CpuLayers{}, input, weights, biases, "fused_mlp::mlp_inference");
}

// The loss of a training step: the mean cross-entropy over class-index targets.
struct CpuLoss {
  const CrossEntropyKernels& kernels = cross_entropy();

  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                             double label_smoothing) const {
    return kernels.forward(logits, target, std::nullopt, at::Reduction::Mean, -100, label_smoothing);
  }
  at::Tensor backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                      double label_smoothing) const {
    // The gradient the standard path's backward starts from: d loss / d loss, a 0-dim one.
    const at::Tensor one = at::ones({}, logits.options());
    return kernels.backward(one, logits, target, std::nullopt, lse, at::Reduction::Mean, -100, label_smoothing);
  }
};

// The optimizer's update of one parameter of a training step, on the CPU: each step counter (a CPU
// tensor, as torch.optim keeps it for CPU parameters) advanced here, the bias corrections from it.
struct CpuOptimizer {
  const OptimizerKernels& kernels;
  const OptimizerArgs& opt;

  void operator()(int64_t k, const at::Tensor& param, const at::Tensor& grad) const {
    const double* row = opt.group_hyperparameters.const_data_ptr<double>() + opt.param_groups[k] * kHyperColumns;
    const at::Tensor none;
    if (opt.kind == OptimizerKind::kSgd) {
      const SgdScalars scalars = sgd_scalars(row);
      TORCH_CHECK(scalars.momentum == 0.0 || !opt.first_moments.empty(), "fused_mlp::mlp_train_step: SGD with ",
                  "momentum needs first_moments (the momentum buffers)");
      kernels.sgd(param, grad, opt.first_moments.empty() ? none : opt.first_moments[k], scalars);
      return;
    }
    TORCH_CHECK(opt.steps[k].device().is_cpu(), "fused_mlp::mlp_train_step: steps[", k,
                "] must be on the CPU with the parameters, as torch.optim keeps it there");
    const AdamScalars scalars = adam_scalars(row, advance_host_step(opt.steps[k]), opt.kind == OptimizerKind::kAdamW);
    kernels.adam(param, grad, opt.first_moments[k], opt.second_moments[k],
                 opt.max_second_moments.empty() ? none : opt.max_second_moments[k], scalars);
  }
};

at::Tensor mlp_train_step_cpu(const at::Tensor& input, const at::Tensor& target, at::TensorList weights,
                              const OptionalTensorList& biases, const OptionalTensorList& bn_weights,
                              const OptionalTensorList& bn_biases, const OptionalTensorList& running_means,
                              const OptionalTensorList& running_vars, c10::ArrayRef<double> momenta, bool batch_norm,
                              bool use_batch_stats, double eps, double dropout_p, const at::Tensor& seed_offset,
                              double label_smoothing, int64_t optimizer_kind, const at::Tensor& group_hyperparameters,
                              c10::IntArrayRef param_groups, at::TensorList steps, at::TensorList first_moments,
                              at::TensorList second_moments, at::TensorList max_second_moments, at::TensorList grads) {
  constexpr const char* op = "fused_mlp::mlp_train_step";
  TORCH_CHECK(group_hyperparameters.device().is_cpu(), op, ": group_hyperparameters must be on the CPU");
  const OptimizerArgs opt = optimizer_args(optimizer_kind, group_hyperparameters, param_groups, steps, first_moments,
                                           second_moments, max_second_moments, grads);
  return mlp_train_step(CpuLayers{}, CpuLoss{}, CpuOptimizer{optimizer(), opt}, input, target, weights, biases,
                        bn_weights, bn_biases, running_means, running_vars, momenta, batch_norm, use_batch_stats, eps,
                        dropout_p, seed_offset, label_smoothing, opt, op);
}

void mlp_update_running_stats_cpu(at::TensorList running_means, at::TensorList running_vars, at::TensorList batch_means,
                                  at::TensorList batch_vars, c10::ArrayRef<double> factors) {
  mlp_update_running_stats(CpuLayers{}, running_means, running_vars, batch_means, batch_vars, factors,
                           "fused_mlp::mlp_update_running_stats_");
}

}  // namespace

at::Tensor onednn_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  const auto dtype = input.scalar_type();
  if (!handle.has_value() || (dtype != at::kFloat && dtype != at::kBFloat16)) return at::Tensor();
  try {
    c10::List<std::optional<at::Scalar>> scalars;
    scalars.push_back(std::nullopt);
    torch::jit::Stack stack{input,
                            weight,
                            bias.has_value() ? c10::IValue(*bias) : c10::IValue(),
                            c10::IValue(std::string("none")),
                            c10::IValue(scalars),
                            c10::IValue()};
    handle->callBoxed(stack);
    return stack.at(0).toTensor();
  } catch (const c10::Error&) {
    return at::Tensor();  // ATen's GEMM then
  }
}

CpuCapability cpu_capability() {
  static const CpuCapability chosen = std::min({hardware_capability(), aten_capability(), built_capability()});
  return chosen;
}

const char* cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::kAvx512:
      return "AVX512";
    case CpuCapability::kAvx2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

namespace {

// (seed, offset) of one dropout mask from the CPU generator: the draw torch.randint(0, 2**62, (2,))
// makes, so the op and fused_mlp.functional's own draw give the same mask for the same seed.
at::Tensor philox_seed_offset(const at::Tensor& like, const c10::optional<at::Generator>& generator) {
  return at::randint(0, int64_t{1} << 62, {2}, generator, like.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_mlp, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("linear_bn_relu_forward", &linear_bn_relu_forward);
  m.impl("linear_bn_relu_backward", &linear_bn_relu_backward);
  m.impl("bn_batch_stats", &bn_batch_stats);
  m.impl("bn_relu_dropout", &bn_relu_dropout);
  m.impl("bn_backward_sums", &bn_backward_sums);
  m.impl("bn_backward_finish", &bn_backward_finish);
  m.impl("linear_relu_dropout_forward", &linear_relu_dropout_forward);
  m.impl("bn_update_running_stats_", &bn_update_running_stats_);
  m.impl("philox4x32_10", &philox4x32_10);
  m.impl("dropout_mask", &dropout_mask);
  m.impl("philox_seed_offset", &philox_seed_offset);
  m.impl("mlp_forward", &mlp_forward_cpu);
  m.impl("mlp_backward", &mlp_backward_cpu);
  m.impl("mlp_inference", &mlp_inference_cpu);
  m.impl("mlp_update_running_stats_", &mlp_update_running_stats_cpu);
  m.impl("mlp_train_step", &mlp_train_step_cpu);
}

}  // namespace fused_mlp::cpu
