// The host side of the Linear -> BatchNorm1d -> ReLU -> Dropout device kernels: checks (shared
// with the CPU op), allocations, the GEMMs through ATen, and the sequence of launches, written once
// for any `launch` policy (see cross_entropy_host.h). linear_bn_relu_cuda.cu instantiates it with
// real launches on the current stream, tests/sim/linear_bn_relu_sim.cpp with the simulation.
// Nothing here reads a device value on the host: no synchronization.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <tuple>
#include <utility>

#include "cuda/linear_bn_relu.cuh"
#include "linear_bn_relu_checks.h"

namespace fused_mlp::cuda {

namespace layer_detail {

// The dropout arguments of a launch; (seed, offset) moved to the input's device when given on the
// CPU (the Python layer draws CUDA tensors' on the device already).
struct DeviceDropout {
  at::Tensor seed_offset;
  DropoutArgs args;
};
inline DeviceDropout device_dropout(double p, const at::Tensor& seed_offset, const at::Tensor& input) {
  if (p <= 0.0) return {at::Tensor(), DropoutArgs{nullptr, 0.f, 1.0}};
  at::Tensor so = seed_offset.to(input.device()).contiguous();
  return {so, DropoutArgs{so.const_data_ptr<int64_t>(), static_cast<float>(p), 1.0 / (1.0 - p)}};
}

template <typename T>
bool all_packed(std::initializer_list<const T*> ptrs) {
  for (const T* p : ptrs) {
    if (!packs_of_four(p)) return false;
  }
  return true;
}

// Four adjacent features per thread in the row reductions when every row starts aligned.
template <typename T>
int reduce_features_per_thread(int64_t C, std::initializer_list<const T*> ptrs) {
  return C % kGroup == 0 && all_packed<T>(ptrs) ? kGroup : 1;
}

// relu(y + bias) * dropout in place on a GEMM's (N, C) output.
template <typename scalar_t, typename Launch>
void launch_bias_relu_dropout(const Launch& launch, const LaunchLimits& limits, at::Tensor& y,
                              const at::Tensor& bias_acc, const DropoutArgs& dropout) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t numel = y.numel();
  if (numel == 0) return;
  scalar_t* p = y.mutable_data_ptr<scalar_t>();
  launch(bn_elementwise_config((numel + kGroup - 1) / kGroup, limits), affine_relu_dropout<scalar_t>,
         static_cast<const scalar_t*>(p), static_cast<const acc_t*>(nullptr), ptr_or_null<acc_t>(bias_acc), numel,
         y.size(1), packs_of_four<scalar_t>(p), dropout, p);
}

// The per-chunk partial results of a row reduction: two (chunks, C) buffers.
template <typename Launch>
std::pair<at::Tensor, at::Tensor> partial_buffers(const Launch& launch, const ReduceConfig& cfg, int64_t C,
                                                  const at::TensorOptions& options) {
  at::Tensor a = at::empty({cfg.chunks * C}, options), b = at::empty({cfg.chunks * C}, options);
  launch.poison(a);
  launch.poison(b);
  return {a, b};
}

}  // namespace layer_detail

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_forward_device(
    const Launch& launch, const LaunchLimits& limits, const at::Tensor& input_, const at::Tensor& weight_,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool use_batch_stats, double eps, double dropout_p,
    const at::Tensor& seed_offset, const char* op) {
  using namespace layer_detail;
  check_layer(input_, weight_, bias, bn_weight, bn_bias, dropout_p, seed_offset, op);
  TORCH_CHECK(limits.max_threads_per_block >= kReduceThreads, op, ": the device allows fewer than ", kReduceThreads,
              " threads per block");
  const int64_t N = input_.size(0), C = weight_.size(0), K = weight_.size(1);
  check_statistics_mode(input_, C, use_batch_stats, running_mean, running_var, op);
  const auto acc = acc_type(input_);
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous();
  const at::Tensor gamma = as_acc(bn_weight, acc), beta = as_acc(bn_bias, acc);
  const auto stat_options = input.options().dtype(acc);
  const DeviceDropout dropout = device_dropout(dropout_p, seed_offset, input);
  at::Tensor out, pre_bn, mean, invstd, var;

  if (use_batch_stats) {
    pre_bn = defined(bias) ? at::addmm(*bias, input, weight.t()) : at::mm(input, weight.t());
    mean = at::empty({C}, stat_options);
    invstd = at::empty({C}, stat_options);
    var = at::empty({C}, stat_options);
    out = at::empty_like(pre_bn);
    at::Tensor affine = at::empty({2 * C}, stat_options);
    for (at::Tensor* t : {&mean, &invstd, &var, &out, &affine}) launch.poison(*t);
    if (C == 0) return {out, pre_bn, mean, invstd, var};
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "linear_bn_relu_forward_device", [&] {
          using acc_t = typename AccType<scalar_t>::type;
          const scalar_t* z = pre_bn.const_data_ptr<scalar_t>();
          scalar_t* o = out.mutable_data_ptr<scalar_t>();
          const int kF = reduce_features_per_thread<scalar_t>(C, {z});
          const ReduceConfig cfg = bn_reduce_config(N, C, kF, limits);
          const std::pair<at::Tensor, at::Tensor> parts = partial_buffers(launch, cfg, C, stat_options);
          const at::Tensor& part_mean = parts.first;
          const at::Tensor& part_m2 = parts.second;
          if (kF == kGroup) {
            launch(cfg, bn_stats_partial<scalar_t, kGroup>, z, N, C, cfg.rows_per_chunk,
                   part_mean.mutable_data_ptr<acc_t>(), part_m2.mutable_data_ptr<acc_t>());
          } else {
            launch(cfg, bn_stats_partial<scalar_t, 1>, z, N, C, cfg.rows_per_chunk, part_mean.mutable_data_ptr<acc_t>(),
                   part_m2.mutable_data_ptr<acc_t>());
          }
          launch(bn_feature_config(C, limits), bn_stats_finalize<acc_t>,
                 static_cast<const acc_t*>(part_mean.const_data_ptr<acc_t>()),
                 static_cast<const acc_t*>(part_m2.const_data_ptr<acc_t>()), N, C, cfg.rows_per_chunk, cfg.chunks, eps,
                 ptr_or_null<acc_t>(gamma), ptr_or_null<acc_t>(beta), mean.mutable_data_ptr<acc_t>(),
                 invstd.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(), affine.mutable_data_ptr<acc_t>());
          const acc_t* af = affine.const_data_ptr<acc_t>();
          launch(bn_elementwise_config((N * C + kGroup - 1) / kGroup, limits), affine_relu_dropout<scalar_t>, z, af,
                 af + C, N * C, C, all_packed<scalar_t>({z, o}), dropout.args, o);
        });
    return {out, pre_bn, mean, invstd, var};
  }

  // Running statistics: fold the BN affine into the GEMM, then bias + ReLU (+ dropout) in place.
  mean = running_mean->to(acc).contiguous().clone();
  var = running_var->to(acc).contiguous().clone();
  invstd = (var + eps).rsqrt();
  pre_bn = at::empty({0}, input.options());
  at::Tensor affine = at::empty({2 * C}, stat_options);
  at::Tensor folded_bias = at::empty({C}, stat_options);
  at::Tensor folded_weight = at::empty_like(weight);
  for (at::Tensor* t : {&affine, &folded_bias, &folded_weight}) launch.poison(*t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_bn_relu_forward_device", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const at::Tensor bias_c = defined(bias) ? bias->contiguous() : at::Tensor();
    if (C > 0) {
      launch(bn_feature_config(C, limits), bn_affine<scalar_t>, C, ptr_or_null<acc_t>(gamma), ptr_or_null<acc_t>(beta),
             static_cast<const acc_t*>(mean.const_data_ptr<acc_t>()),
             static_cast<const acc_t*>(invstd.const_data_ptr<acc_t>()), ptr_or_null<scalar_t>(bias_c),
             affine.mutable_data_ptr<acc_t>(), folded_bias.mutable_data_ptr<acc_t>());
    }
    if (C * K > 0) {
      launch(bn_elementwise_config(C * K, limits), scale_weight_rows<scalar_t>, weight.const_data_ptr<scalar_t>(),
             static_cast<const acc_t*>(affine.const_data_ptr<acc_t>()), C, K,
             folded_weight.mutable_data_ptr<scalar_t>());
    }
    out = at::mm(input, folded_weight.t());
    launch_bias_relu_dropout<scalar_t>(launch, limits, out, folded_bias, dropout.args);
  });
  return {out, pre_bn, mean, invstd, var};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_backward_device(
    const Launch& launch, const LaunchLimits& limits, const at::Tensor& grad_out_, const at::Tensor& input_,
    const at::Tensor& weight_, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const at::Tensor& saved_, const at::Tensor& mean_,
    const at::Tensor& invstd_, bool use_batch_stats, double dropout_p, const at::Tensor& seed_offset,
    bool need_grad_input, const char* op) {
  using namespace layer_detail;
  check_layer(input_, weight_, bias, bn_weight, bn_bias, dropout_p, seed_offset, op);
  TORCH_CHECK(limits.max_threads_per_block >= kReduceThreads, op, ": the device allows fewer than ", kReduceThreads,
              " threads per block");
  const int64_t N = input_.size(0), C = weight_.size(0), K = weight_.size(1);
  check_backward_tensors(grad_out_, input_, saved_, mean_, invstd_, C, op);
  const auto acc = acc_type(input_);
  const at::Tensor g = grad_out_.contiguous(), input = input_.contiguous(), weight = weight_.contiguous();
  const at::Tensor saved = saved_.contiguous(), mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const at::Tensor gamma = as_acc(bn_weight, acc), beta = as_acc(bn_bias, acc);
  const auto stat_options = input.options().dtype(acc);
  const DeviceDropout dropout = device_dropout(dropout_p, seed_offset, input);

  at::Tensor affine = at::empty({2 * C}, stat_options);
  at::Tensor coef = at::empty({2 * C}, stat_options);
  at::Tensor sum_dy = at::empty({C}, stat_options);
  at::Tensor sum_dy_zhat = at::empty({C}, stat_options);
  at::Tensor dz = at::empty({N, C}, input.options());
  for (at::Tensor* t : {&affine, &coef, &sum_dy, &sum_dy_zhat, &dz}) launch.poison(*t);
  at::Tensor grad_input, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_bn_relu_backward_device", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const acc_t* mu = mean.const_data_ptr<acc_t>();
    const acc_t* is = invstd.const_data_ptr<acc_t>();
    const acc_t* af = affine.const_data_ptr<acc_t>();
    if (C > 0) {
      launch(bn_feature_config(C, limits), bn_affine<scalar_t>, C, ptr_or_null<acc_t>(gamma), ptr_or_null<acc_t>(beta),
             mu, is, static_cast<const scalar_t*>(nullptr), affine.mutable_data_ptr<acc_t>(),
             static_cast<acc_t*>(nullptr));
    }
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = saved.const_data_ptr<scalar_t>();
    if (N == 0 || C == 0) {  // no rows: every sum is zero
      sum_dy.zero_();
      sum_dy_zhat.zero_();
      coef.zero_();
    } else {
      const int kF = reduce_features_per_thread<scalar_t>(C, {gp, sp});
      const ReduceConfig cfg = bn_reduce_config(N, C, kF, limits);
      const std::pair<at::Tensor, at::Tensor> parts = partial_buffers(launch, cfg, C, stat_options);
      const at::Tensor& part_dy = parts.first;
      const at::Tensor& part_dyz = parts.second;
      if (kF == kGroup) {
        launch(cfg, bn_backward_partial<scalar_t, kGroup>, gp, sp, N, C, cfg.rows_per_chunk, use_batch_stats, af, mu,
               is, dropout.args, part_dy.mutable_data_ptr<acc_t>(), part_dyz.mutable_data_ptr<acc_t>());
      } else {
        launch(cfg, bn_backward_partial<scalar_t, 1>, gp, sp, N, C, cfg.rows_per_chunk, use_batch_stats, af, mu, is,
               dropout.args, part_dy.mutable_data_ptr<acc_t>(), part_dyz.mutable_data_ptr<acc_t>());
      }
      launch(bn_feature_config(C, limits), bn_backward_finalize<acc_t>,
             static_cast<const acc_t*>(part_dy.const_data_ptr<acc_t>()),
             static_cast<const acc_t*>(part_dyz.const_data_ptr<acc_t>()), N, C, cfg.chunks, use_batch_stats, af, mu, is,
             sum_dy.mutable_data_ptr<acc_t>(), sum_dy_zhat.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>());
      scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
      launch(bn_elementwise_config((N * C + kGroup - 1) / kGroup, limits), bn_backward_input<scalar_t>, gp, sp, N * C,
             C, all_packed<scalar_t>({gp, sp, dzp}), use_batch_stats, af,
             static_cast<const acc_t*>(coef.const_data_ptr<acc_t>()), dropout.args, dzp);
    }
    const at::Tensor no_grad_input = at::empty({0}, input.options());
    if (use_batch_stats) {
      grad_input = need_grad_input ? at::mm(dz, weight) : no_grad_input;
      grad_weight = at::mm(dz.t(), input);
      // Exactly zero: BatchNorm with batch statistics cancels any constant added before it.
      grad_bias = at::zeros({C}, input.options());
      return;
    }
    // Running statistics: y = x W'^T + b' with W' = W * A, b' = (b - mean) * A + beta.
    grad_input = no_grad_input;
    if (need_grad_input) {
      at::Tensor folded_weight = at::empty_like(weight);
      launch.poison(folded_weight);
      if (C * K > 0) {
        launch(bn_elementwise_config(C * K, limits), scale_weight_rows<scalar_t>, weight.const_data_ptr<scalar_t>(), af,
               C, K, folded_weight.mutable_data_ptr<scalar_t>());
      }
      grad_input = at::mm(dz, folded_weight);
    }
    const at::Tensor G = at::mm(dz.t(), input);  // dL/dW'
    grad_weight = at::empty_like(weight);
    grad_bias = at::empty({C}, input.options());
    launch.poison(grad_weight);
    launch.poison(grad_bias);
    const at::Tensor bias_c = defined(bias) ? bias->contiguous() : at::Tensor();
    if (C > 0) {
      launch(bn_warp_per_feature_config(C, limits), folded_weight_grad<scalar_t>, G.const_data_ptr<scalar_t>(),
             weight.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias_c), af, mu, is,
             static_cast<const acc_t*>(sum_dy.const_data_ptr<acc_t>()), C, K, grad_weight.mutable_data_ptr<scalar_t>(),
             sum_dy_zhat.mutable_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<scalar_t>());
    }
  });
  return {grad_input, grad_weight, grad_bias, sum_dy_zhat.to(param_type(bn_weight, acc)),
          sum_dy.to(param_type(bn_bias, acc))};
}

// Inference with BN already folded into (weight, bias): relu(x W^T + b) * dropout.
template <typename Launch>
at::Tensor linear_relu_dropout_forward_device(const Launch& launch, const LaunchLimits& limits, const at::Tensor& input,
                                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                              double dropout_p, const at::Tensor& seed_offset, const char* op) {
  using namespace layer_detail;
  check_layer(input, weight, bias, c10::nullopt, c10::nullopt, dropout_p, seed_offset, op);
  const DeviceDropout dropout = device_dropout(dropout_p, seed_offset, input);
  at::Tensor out = at::mm(input.contiguous(), weight.contiguous().t());
  const at::Tensor bias_acc = defined(bias) ? bias->to(acc_type(input)).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "linear_relu_dropout_forward_device",
      [&] { launch_bias_relu_dropout<scalar_t>(launch, limits, out, bias_acc, dropout.args); });
  return out;
}

}  // namespace fused_mlp::cuda
