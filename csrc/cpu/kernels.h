// The CPU ops, compiled once per instruction set and chosen at run time, as ATen does for its own
// kernels (setup.py builds every csrc/cpu/*.cpp as DEFAULT, AVX2 and AVX512).
//
// Each source defines, for its variant, a function returning the table of the ops it implements,
// named <table>_<variant> (FUSED_MLP_THIS_CPU_VARIANT). csrc/cpu_dispatch.cpp registers the ops
// with PyTorch and calls through the table of the running CPU's variant. The tables hold plain
// function pointers, constant-initialized: loading the extension runs no code of a variant the
// CPU cannot execute.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/optimizer_math.h"

namespace fused_mlp::cpu {

using OptionalTensor = std::optional<at::Tensor>;

struct CrossEntropyKernels {
  std::tuple<at::Tensor, at::Tensor> (*forward)(const at::Tensor& input, const at::Tensor& target,
                                                const OptionalTensor& weight, int64_t reduction, int64_t ignore_index,
                                                double label_smoothing);
  at::Tensor (*backward)(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                         const OptionalTensor& weight, const at::Tensor& logsumexp, int64_t reduction,
                         int64_t ignore_index, double label_smoothing);
};

struct LinearBnReluKernels {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*forward)(
      const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias, const OptionalTensor& bn_weight,
      const OptionalTensor& bn_bias, const OptionalTensor& running_mean, const OptionalTensor& running_var,
      bool use_batch_stats, double eps, double dropout_p, const at::Tensor& seed_offset);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*backward)(
      const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
      const OptionalTensor& bn_weight, const OptionalTensor& bn_bias, const at::Tensor& saved, const at::Tensor& mean,
      const at::Tensor& invstd, bool use_batch_stats, double dropout_p, const at::Tensor& seed_offset,
      bool need_grad_input, bool need_grad_weight, const at::Tensor& output);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*batch_stats)(const at::Tensor& pre_bn, double eps);
  at::Tensor (*bn_relu_dropout)(const at::Tensor& pre_bn, const at::Tensor& mean, const at::Tensor& invstd,
                                const OptionalTensor& bn_weight, const OptionalTensor& bn_bias, double dropout_p,
                                const at::Tensor& seed_offset);
  at::Tensor (*linear_relu_dropout_forward)(const at::Tensor& input, const at::Tensor& weight,
                                            const OptionalTensor& bias, double dropout_p,
                                            const at::Tensor& seed_offset);
  void (*update_running_stats)(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& batch_mean,
                               const at::Tensor& batch_var, double factor);
  std::tuple<at::Tensor, at::Tensor> (*backward_sums)(const at::Tensor& grad_out, const at::Tensor& pre_bn,
                                                      const at::Tensor& mean, const at::Tensor& invstd,
                                                      const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
                                                      double dropout_p, const at::Tensor& seed_offset);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*backward_finish)(
      const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& pre_bn,
      const at::Tensor& mean, const at::Tensor& invstd, const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
      const at::Tensor& sum_dy, const at::Tensor& sum_dy_zhat, int64_t count, double dropout_p,
      const at::Tensor& seed_offset, bool need_grad_input);
  // The ReLU and dropout backward of a layer without BatchNorm, from its saved output.
  at::Tensor (*relu_dropout_backward)(const at::Tensor& grad_out, const at::Tensor& output, double dropout_p,
                                      const at::Tensor& seed_offset);
};

// The optimizer updates of mlp_train_step, in place on contiguous float or double tensors of one
// size; max_exp_avg_sq is read only with amsgrad, momentum_buffer only with momentum.
struct OptimizerKernels {
  void (*adam)(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
               const at::Tensor& max_exp_avg_sq, const AdamScalars& scalars);
  void (*sgd)(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& momentum_buffer,
              const SgdScalars& scalars);
};

// The GEMMs of csrc/cpu/gemm.h, for the code compiled once (the network loop's output layer).
struct GemmKernels {
  at::Tensor (*nt)(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias);
  at::Tensor (*nn)(const at::Tensor& a, const at::Tensor& b);
  at::Tensor (*tn)(const at::Tensor& a, const at::Tensor& b);
};

struct DropoutKernels {
  at::Tensor (*philox4x32_10)(const at::Tensor& counter, const at::Tensor& key);
  at::Tensor (*dropout_mask)(const at::Tensor& seed_offset, int64_t numel, double p, int64_t start);
};

#define FUSED_MLP_DECLARE_CPU_VARIANTS(Table, name) \
  const Table& name##_DEFAULT();                    \
  const Table& name##_AVX2();                       \
  const Table& name##_AVX512();

FUSED_MLP_DECLARE_CPU_VARIANTS(CrossEntropyKernels, cross_entropy_kernels)
FUSED_MLP_DECLARE_CPU_VARIANTS(LinearBnReluKernels, linear_bn_relu_kernels)
FUSED_MLP_DECLARE_CPU_VARIANTS(DropoutKernels, dropout_kernels)
FUSED_MLP_DECLARE_CPU_VARIANTS(OptimizerKernels, optimizer_kernels)
FUSED_MLP_DECLARE_CPU_VARIANTS(GemmKernels, gemm_kernels)

// The instruction sets, in increasing order.
enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The variant the ops run: the highest that this build has, this CPU supports, and ATen itself
// chose (ATen's choice honours ATEN_CPU_CAPABILITY). Decided once per process.
CpuCapability cpu_capability();
const char* cpu_capability_name(CpuCapability capability);

template <typename Table>
using VariantTable = const Table& (*)();

// std::type_identity_t of C++20, for the torch releases that build extensions as C++17: a parameter
// whose type is not deduced from it.
template <typename T>
struct NotDeduced {
  using type = T;
};

// avx2 and avx512 are null when the build lacks them (not an x86-64 build).
template <typename Table>
const Table& select_variant(VariantTable<Table> default_variant, typename NotDeduced<VariantTable<Table>>::type avx2,
                            typename NotDeduced<VariantTable<Table>>::type avx512) {
  switch (cpu_capability()) {
    case CpuCapability::kAvx512:
      return avx512();
    case CpuCapability::kAvx2:
      return avx2();
    default:
      return default_variant();
  }
}

}  // namespace fused_mlp::cpu

#define FUSED_MLP_CONCAT_(a, b) a##b
#define FUSED_MLP_CONCAT(a, b) FUSED_MLP_CONCAT_(a, b)
// In a per-instruction-set build: name_<CPU_CAPABILITY>, this variant's table function.
#define FUSED_MLP_THIS_CPU_VARIANT(name) FUSED_MLP_CONCAT(name##_, CPU_CAPABILITY)

#if defined(FUSED_MLP_CPU_HAVE_AVX2)
#define FUSED_MLP_CPU_VARIANT_AVX2(name) &name##_AVX2
#else
#define FUSED_MLP_CPU_VARIANT_AVX2(name) nullptr
#endif
#if defined(FUSED_MLP_CPU_HAVE_AVX512)
#define FUSED_MLP_CPU_VARIANT_AVX512(name) &name##_AVX512
#else
#define FUSED_MLP_CPU_VARIANT_AVX512(name) nullptr
#endif
// The running CPU's table of name (cpu_capability never picks a variant the build lacks).
#define FUSED_MLP_SELECT_CPU_VARIANT(name)                                            \
  ::fused_mlp::cpu::select_variant(&name##_DEFAULT, FUSED_MLP_CPU_VARIANT_AVX2(name), \
                                   FUSED_MLP_CPU_VARIANT_AVX512(name))
