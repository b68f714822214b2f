// The host side of the Linear -> BatchNorm1d -> ReLU -> Dropout device kernels: checks (shared
// with the CPU op), allocations, the GEMMs through ATen, and the sequence of launches, written once
// for any `launch` policy (see cross_entropy_host.h). linear_bn_relu_cuda.cu instantiates it with
// real launches on the current stream, tests/sim/linear_bn_relu_sim.cpp with the simulation.
// Nothing here reads a device value on the host: no synchronization.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t numel = y.numel();
  if (numel == 0) return;
  scalar_t* p = y.mutable_data_ptr<scalar_t>();
  const AffineReluDropoutArgs<scalar_t> args{.in = p,
                                             .A = nullptr,
                                             .B = ptr_or_null<acc_t>(bias_acc),
                                             .numel = numel,
                                             .C = y.size(1),
                                             .packed = packs_of_four<scalar_t>(p),
                                             .dropout = dropout,
                                             .out = p};
  launch(bn_elementwise_config((numel + kGroup - 1) / kGroup, limits), affine_relu_dropout<scalar_t>, args);
}

// How a column reduction over (N, C) runs: features per thread, rows per chunk of rows, the
// launch, and the two (chunks, C) buffers of per-chunk partial results.
struct ColumnReduction {
  int features_per_thread;
  int64_t rows_per_chunk, chunks;
  LaunchConfig config;
  at::Tensor part_a, part_b;
};

template <typename T, typename Launch>
ColumnReduction plan_column_reduction(const Launch& launch, const LaunchLimits& limits, int64_t N, int64_t C,
                                      std::initializer_list<const T*> rows, const at::TensorOptions& options) {
  ColumnReduction r;
  r.features_per_thread = reduce_features_per_thread<T>(C, rows);
  r.rows_per_chunk = bn_rows_per_chunk(N, C, r.features_per_thread, limits);
  r.chunks = bn_chunk_count(N, r.rows_per_chunk);
  r.config = bn_column_reduce_config(C, r.features_per_thread, r.chunks);
  r.part_a = at::empty({r.chunks * C}, options);
  r.part_b = at::empty({r.chunks * C}, options);
  launch.poison(r.part_a);
  launch.poison(r.part_b);
  return r;
}

// The per-feature mean, invstd and unbiased variance of z (N, C), and the folded BN affine [A; B]
// (A = gamma * invstd, B = beta - mean * A; gamma and beta acc tensors or undefined).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_batch_stats(const Launch& launch,
                                                                              const LaunchLimits& limits,
                                                                              const at::Tensor& z, double eps,
                                                                              const at::Tensor& gamma,
                                                                              const at::Tensor& beta) {
  const int64_t N = z.size(0), C = z.size(1);
  const auto stat_options = z.options().dtype(at::toOpMathType(z.scalar_type()));
  at::Tensor mean = at::empty({C}, stat_options), invstd = at::empty({C}, stat_options);
  at::Tensor var = at::empty({C}, stat_options), affine = at::empty({2 * C}, stat_options);
  for (at::Tensor* t : {&mean, &invstd, &var, &affine}) launch.poison(*t);
  if (C == 0) return {mean, invstd, var, affine};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_batch_stats_device", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const ColumnReduction plan = plan_column_reduction<scalar_t>(launch, limits, N, C, {zp}, stat_options);
    const BatchStatsArgs<scalar_t> stats{.z = zp,
                                         .N = N,
                                         .C = C,
                                         .rows_per_chunk = plan.rows_per_chunk,
                                         .chunks = plan.chunks,
                                         .eps = eps,
                                         .gamma = ptr_or_null<acc_t>(gamma),
                                         .beta = ptr_or_null<acc_t>(beta),
                                         .part_mean = plan.part_a.mutable_data_ptr<acc_t>(),
                                         .part_m2 = plan.part_b.mutable_data_ptr<acc_t>(),
                                         .mean = mean.mutable_data_ptr<acc_t>(),
                                         .invstd = invstd.mutable_data_ptr<acc_t>(),
                                         .var = var.mutable_data_ptr<acc_t>(),
                                         .affine = affine.mutable_data_ptr<acc_t>()};
    if (plan.features_per_thread == kGroup) {
      launch(plan.config, bn_stats_partial<scalar_t, kGroup>, stats);
    } else {
      launch(plan.config, bn_stats_partial<scalar_t, 1>, stats);
    }
    launch(bn_feature_config(C, limits), bn_stats_finalize<scalar_t>, stats);
  });
  return {mean, invstd, var, affine};
}

// relu(z * A + B) * dropout into a fresh tensor, with affine = [A; B].
template <typename Launch>
at::Tensor launch_affine_relu_dropout(const Launch& launch, const LaunchLimits& limits, const at::Tensor& z,
                                      const at::Tensor& affine, const DropoutArgs& dropout) {
  at::Tensor out = at::empty_like(z, at::MemoryFormat::Contiguous);
  launch.poison(out);
  const int64_t N = z.size(0), C = z.size(1);
  if (N * C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_relu_dropout_device", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const acc_t* af = affine.const_data_ptr<acc_t>();
    const AffineReluDropoutArgs<scalar_t> epilogue{.in = zp,
                                                   .A = af,
                                                   .B = af + C,
                                                   .numel = N * C,
                                                   .C = C,
                                                   .packed = all_packed<scalar_t>({zp, o}),
                                                   .dropout = dropout,
                                                   .out = o};
    launch(bn_elementwise_config((N * C + kGroup - 1) / kGroup, limits), affine_relu_dropout<scalar_t>, epilogue);
  });
  return out;
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
  TORCH_CHECK(limits.max_threads_per_block >= kColumnReduceThreads, op, ": the device allows fewer than ",
              kColumnReduceThreads, " threads per block");
  const int64_t C = weight_.size(0), K = weight_.size(1);
  check_statistics_mode(input_, C, use_batch_stats, running_mean, running_var, op);
  const auto acc = at::toOpMathType(input_.scalar_type());
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous();
  const at::Tensor gamma = as_acc(bn_weight, acc), beta = as_acc(bn_bias, acc);
  const auto stat_options = input.options().dtype(acc);
  const DeviceDropout dropout = device_dropout(dropout_p, seed_offset, input);
  at::Tensor out, pre_bn, mean, invstd, var;

  if (use_batch_stats) {
    pre_bn = defined(bias) ? at::addmm(*bias, input, weight.t()) : at::mm(input, weight.t());
    at::Tensor affine;
    std::tie(mean, invstd, var, affine) = launch_batch_stats(launch, limits, pre_bn, eps, gamma, beta);
    out = launch_affine_relu_dropout(launch, limits, pre_bn, affine, dropout.args);
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
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor bias_c = defined(bias) ? bias->contiguous() : at::Tensor();
    if (C > 0) {
      const BnAffineArgs<scalar_t> args{.C = C,
                                        .gamma = ptr_or_null<acc_t>(gamma),
                                        .beta = ptr_or_null<acc_t>(beta),
                                        .mean = mean.const_data_ptr<acc_t>(),
                                        .invstd = invstd.const_data_ptr<acc_t>(),
                                        .bias = ptr_or_null<scalar_t>(bias_c),
                                        .affine = affine.mutable_data_ptr<acc_t>(),
                                        .folded_bias = folded_bias.mutable_data_ptr<acc_t>()};
      launch(bn_feature_config(C, limits), bn_affine<scalar_t>, args);
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

// The stages of the forward with batch statistics after its GEMM, as ops of their own.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_batch_stats_device(const Launch& launch, const LaunchLimits& limits,
                                                                     const at::Tensor& pre_bn, double eps,
                                                                     const char* op) {
  check_pre_bn(pre_bn, /*batch_stats=*/true, op);
  TORCH_CHECK(limits.max_threads_per_block >= kColumnReduceThreads, op, ": the device allows fewer than ",
              kColumnReduceThreads, " threads per block");
  auto [mean, invstd, var, affine] =
      layer_detail::launch_batch_stats(launch, limits, pre_bn.contiguous(), eps, at::Tensor(), at::Tensor());
  return {mean, invstd, var};
}

template <typename Launch>
at::Tensor bn_relu_dropout_device(const Launch& launch, const LaunchLimits& limits, const at::Tensor& pre_bn_,
                                  const at::Tensor& mean_, const at::Tensor& invstd_,
                                  const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
                                  double dropout_p, const at::Tensor& seed_offset, const char* op) {
  using namespace layer_detail;
  check_pre_bn(pre_bn_, /*batch_stats=*/false, op);
  check_feature_stats(pre_bn_, mean_, invstd_, op);
  const int64_t C = pre_bn_.size(1);
  check_bn_params(pre_bn_, C, bn_weight, bn_bias, op);
  check_dropout(pre_bn_, dropout_p, seed_offset, op);
  const auto acc = at::toOpMathType(pre_bn_.scalar_type());
  const at::Tensor pre_bn = pre_bn_.contiguous(), mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const at::Tensor gamma = as_acc(bn_weight, acc), beta = as_acc(bn_bias, acc);
  const DeviceDropout dropout = device_dropout(dropout_p, seed_offset, pre_bn);
  at::Tensor affine = at::empty({2 * C}, pre_bn.options().dtype(acc));
  launch.poison(affine);
  if (C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre_bn.scalar_type(), "bn_relu_dropout_device", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const BnAffineArgs<scalar_t> args{.C = C,
                                        .gamma = ptr_or_null<acc_t>(gamma),
                                        .beta = ptr_or_null<acc_t>(beta),
                                        .mean = mean.const_data_ptr<acc_t>(),
                                        .invstd = invstd.const_data_ptr<acc_t>(),
                                        .bias = nullptr,
                                        .affine = affine.mutable_data_ptr<acc_t>(),
                                        .folded_bias = nullptr};
      launch(bn_feature_config(C, limits), bn_affine<scalar_t>, args);
    });
  }
  return launch_affine_relu_dropout(launch, limits, pre_bn, affine, dropout.args);
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_backward_device(
    const Launch& launch, const LaunchLimits& limits, const at::Tensor& grad_out_, const at::Tensor& input_,
    const at::Tensor& weight_, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const at::Tensor& saved_, const at::Tensor& mean_,
    const at::Tensor& invstd_, bool use_batch_stats, double dropout_p, const at::Tensor& seed_offset,
    bool need_grad_input, bool need_grad_weight, const char* op) {
  using namespace layer_detail;
  check_layer(input_, weight_, bias, bn_weight, bn_bias, dropout_p, seed_offset, op);
  TORCH_CHECK(limits.max_threads_per_block >= kColumnReduceThreads, op, ": the device allows fewer than ",
              kColumnReduceThreads, " threads per block");
  const int64_t N = input_.size(0), C = weight_.size(0), K = weight_.size(1);
  check_backward_tensors(grad_out_, input_, saved_, mean_, invstd_, C, op);
  const auto acc = at::toOpMathType(input_.scalar_type());
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
  at::Tensor grad_bias = use_batch_stats ? at::empty({C}, input.options()) : at::Tensor();
  for (at::Tensor* t : {&affine, &coef, &sum_dy, &sum_dy_zhat, &dz}) launch.poison(*t);
  if (use_batch_stats) launch.poison(grad_bias);
  at::Tensor grad_input, grad_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_bn_relu_backward_device", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* mu = mean.const_data_ptr<acc_t>();
    const acc_t* is = invstd.const_data_ptr<acc_t>();
    const acc_t* af = affine.const_data_ptr<acc_t>();
    if (C > 0) {
      const BnAffineArgs<scalar_t> args{.C = C,
                                        .gamma = ptr_or_null<acc_t>(gamma),
                                        .beta = ptr_or_null<acc_t>(beta),
                                        .mean = mu,
                                        .invstd = is,
                                        .bias = nullptr,
                                        .affine = affine.mutable_data_ptr<acc_t>(),
                                        .folded_bias = nullptr};
      launch(bn_feature_config(C, limits), bn_affine<scalar_t>, args);
    }
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = saved.const_data_ptr<scalar_t>();
    if (N == 0 || C == 0) {  // no rows: every sum is zero
      sum_dy.zero_();
      sum_dy_zhat.zero_();
      coef.zero_();
      if (use_batch_stats) grad_bias.zero_();
    } else {
      const ColumnReduction plan = plan_column_reduction<scalar_t>(launch, limits, N, C, {gp, sp}, stat_options);
      scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
      const BnBackwardArgs<scalar_t> args{
          .grad = gp,
          .saved = sp,
          .N = N,
          .C = C,
          .rows_per_chunk = plan.rows_per_chunk,
          .chunks = plan.chunks,
          .count = N,
          .use_batch_stats = use_batch_stats,
          .packed = all_packed<scalar_t>({gp, sp, dzp}),
          .affine = af,
          .mean = mu,
          .invstd = is,
          .dropout = dropout.args,
          .part_dy = plan.part_a.mutable_data_ptr<acc_t>(),
          .part_dy_zhat = plan.part_b.mutable_data_ptr<acc_t>(),
          .sum_dy = sum_dy.mutable_data_ptr<acc_t>(),
          .sum_dy_zhat = sum_dy_zhat.mutable_data_ptr<acc_t>(),
          .coef = coef.mutable_data_ptr<acc_t>(),
          .dz = dzp,
          .grad_bias = use_batch_stats ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr};
      if (plan.features_per_thread == kGroup) {
        launch(plan.config, bn_backward_partial<scalar_t, kGroup>, args);
      } else {
        launch(plan.config, bn_backward_partial<scalar_t, 1>, args);
      }
      launch(bn_feature_config(C, limits), bn_backward_finalize<scalar_t>, args);
      launch(bn_elementwise_config((N * C + kGroup - 1) / kGroup, limits), bn_backward_input<scalar_t>, args);
    }
    const at::Tensor no_grad_input = at::empty({0}, input.options());
    if (use_batch_stats) {
      grad_input = need_grad_input ? at::mm(dz, weight) : no_grad_input;
      grad_weight = need_grad_weight ? at::mm(dz.t(), input) : no_grad_input;
      return;  // grad_bias: written by bn_backward_finalize
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
      const FoldedWeightGradArgs<scalar_t> args{.G = G.const_data_ptr<scalar_t>(),
                                                .weight = weight.const_data_ptr<scalar_t>(),
                                                .bias = ptr_or_null<scalar_t>(bias_c),
                                                .affine = af,
                                                .mean = mu,
                                                .invstd = is,
                                                .sum_dy = sum_dy.const_data_ptr<acc_t>(),
                                                .C = C,
                                                .K = K,
                                                .grad_weight = grad_weight.mutable_data_ptr<scalar_t>(),
                                                .grad_gamma = sum_dy_zhat.mutable_data_ptr<acc_t>(),
                                                .grad_bias = grad_bias.mutable_data_ptr<scalar_t>()};
      launch(bn_warp_per_feature_config(C, limits), folded_weight_grad<scalar_t>, args);
    }
  });
  return {grad_input, grad_weight, grad_bias, sum_dy_zhat.to(param_type(bn_weight, acc)),
          sum_dy.to(param_type(bn_bias, acc))};
}

// The backward with batch statistics as two stages, for a caller that reduces the sums across
// processes in between (synchronized BatchNorm): the per-feature sums of dy and dy * zhat over
// this process's rows, then, from sums over `count` rows in all, the input and parameter
// gradients. Both recompute dy from grad_out and pre_bn, as the one-call backward does.
namespace layer_detail {

template <typename scalar_t>
struct BnBackwardStage {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor g, z, mean, invstd, affine;
  BnBackwardArgs<scalar_t> args{};
};

// The affine [A; B] and the arguments every backward kernel shares, for (N, C) grad_out and pre_bn.
template <typename scalar_t, typename Launch>
BnBackwardStage<scalar_t> bn_backward_stage(const Launch& launch, const LaunchLimits& limits,
                                            const at::Tensor& grad_out, const at::Tensor& pre_bn,
                                            const at::Tensor& mean, const at::Tensor& invstd,
                                            const c10::optional<at::Tensor>& bn_weight,
                                            const c10::optional<at::Tensor>& bn_bias, const DeviceDropout& dropout) {
  using acc_t = at::opmath_type<scalar_t>;
  BnBackwardStage<scalar_t> st;
  const auto acc = at::toOpMathType(pre_bn.scalar_type());
  st.g = grad_out.contiguous();
  st.z = pre_bn.contiguous();
  st.mean = mean.contiguous();
  st.invstd = invstd.contiguous();
  const int64_t N = st.z.size(0), C = st.z.size(1);
  st.affine = at::empty({2 * C}, st.z.options().dtype(acc));
  launch.poison(st.affine);
  const at::Tensor gamma = as_acc(bn_weight, acc), beta = as_acc(bn_bias, acc);
  if (C > 0) {
    const BnAffineArgs<scalar_t> affine_args{.C = C,
                                             .gamma = ptr_or_null<acc_t>(gamma),
                                             .beta = ptr_or_null<acc_t>(beta),
                                             .mean = st.mean.template const_data_ptr<acc_t>(),
                                             .invstd = st.invstd.template const_data_ptr<acc_t>(),
                                             .bias = nullptr,
                                             .affine = st.affine.template mutable_data_ptr<acc_t>(),
                                             .folded_bias = nullptr};
    launch(bn_feature_config(C, limits), bn_affine<scalar_t>, affine_args);
  }
  st.args.grad = st.g.template const_data_ptr<scalar_t>();
  st.args.saved = st.z.template const_data_ptr<scalar_t>();
  st.args.N = N;
  st.args.C = C;
  st.args.count = N;
  st.args.use_batch_stats = true;
  st.args.affine = st.affine.template const_data_ptr<acc_t>();
  st.args.mean = st.mean.template const_data_ptr<acc_t>();
  st.args.invstd = st.invstd.template const_data_ptr<acc_t>();
  st.args.dropout = dropout.args;
  return st;
}

}  // namespace layer_detail

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> bn_backward_sums_device(const Launch& launch, const LaunchLimits& limits,
                                                           const at::Tensor& grad_out, const at::Tensor& pre_bn,
                                                           const at::Tensor& mean, const at::Tensor& invstd,
                                                           const c10::optional<at::Tensor>& bn_weight,
                                                           const c10::optional<at::Tensor>& bn_bias, double dropout_p,
                                                           const at::Tensor& seed_offset, const char* op) {
  using namespace layer_detail;
  check_backward_stage(grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset, op);
  const int64_t N = pre_bn.size(0), C = pre_bn.size(1);
  const auto stat_options = pre_bn.options().dtype(at::toOpMathType(pre_bn.scalar_type()));
  at::Tensor sum_dy = at::zeros({C}, stat_options), sum_dy_zhat = at::zeros({C}, stat_options);
  at::Tensor coef = at::empty({2 * C}, stat_options);
  const DeviceDropout dropout = device_dropout(dropout_p, seed_offset, pre_bn);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre_bn.scalar_type(), "bn_backward_sums_device", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BnBackwardStage<scalar_t> st =
        bn_backward_stage<scalar_t>(launch, limits, grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, dropout);
    if (N == 0 || C == 0) return;
    const ColumnReduction plan =
        plan_column_reduction<scalar_t>(launch, limits, N, C, {st.args.grad, st.args.saved}, stat_options);
    BnBackwardArgs<scalar_t> args = st.args;
    args.rows_per_chunk = plan.rows_per_chunk;
    args.chunks = plan.chunks;
    args.packed = all_packed<scalar_t>({st.args.grad, st.args.saved});
    args.part_dy = plan.part_a.template mutable_data_ptr<acc_t>();
    args.part_dy_zhat = plan.part_b.template mutable_data_ptr<acc_t>();
    args.sum_dy = sum_dy.mutable_data_ptr<acc_t>();
    args.sum_dy_zhat = sum_dy_zhat.mutable_data_ptr<acc_t>();
    args.coef = coef.mutable_data_ptr<acc_t>();
    if (plan.features_per_thread == kGroup) {
      launch(plan.config, bn_backward_partial<scalar_t, kGroup>, args);
    } else {
      launch(plan.config, bn_backward_partial<scalar_t, 1>, args);
    }
    launch(bn_feature_config(C, limits), bn_backward_finalize<scalar_t>, args);
  });
  return {sum_dy, sum_dy_zhat};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_finish_device(
    const Launch& launch, const LaunchLimits& limits, const at::Tensor& grad_out, const at::Tensor& input_,
    const at::Tensor& weight_, const at::Tensor& pre_bn, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias, const at::Tensor& sum_dy_,
    const at::Tensor& sum_dy_zhat_, int64_t count, double dropout_p, const at::Tensor& seed_offset,
    bool need_grad_input, const char* op) {
  using namespace layer_detail;
  check_backward_finish(grad_out, input_, weight_, pre_bn, mean, invstd, bn_weight, bn_bias, sum_dy_, sum_dy_zhat_,
                        count, dropout_p, seed_offset, op);
  const int64_t N = input_.size(0), C = weight_.size(0);
  const auto acc = at::toOpMathType(input_.scalar_type());
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous();
  const at::Tensor sum_dy = sum_dy_.contiguous(), sum_dy_zhat = sum_dy_zhat_.contiguous();
  const DeviceDropout dropout = device_dropout(dropout_p, seed_offset, input);
  at::Tensor dz = at::empty({N, C}, input.options());
  at::Tensor coef = at::empty({2 * C}, input.options().dtype(acc));
  at::Tensor sums_copy = at::empty({2 * C}, input.options().dtype(acc));
  at::Tensor grad_bias = at::empty({C}, input.options());
  for (at::Tensor* t : {&dz, &coef, &sums_copy, &grad_bias}) launch.poison(*t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_finish_device", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BnBackwardStage<scalar_t> st =
        bn_backward_stage<scalar_t>(launch, limits, grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, dropout);
    if (N == 0 || C == 0) {
      dz.zero_();
      grad_bias.zero_();
      return;
    }
    // The finalize kernel over one "chunk", the given sums: the coefficients from `count` rows.
    BnBackwardArgs<scalar_t> args = st.args;
    args.count = count;
    args.rows_per_chunk = N;
    args.chunks = 1;
    args.packed = all_packed<scalar_t>({st.args.grad, st.args.saved, dz.const_data_ptr<scalar_t>()});
    args.part_dy = const_cast<acc_t*>(sum_dy.const_data_ptr<acc_t>());  // read only, with chunks = 1
    args.part_dy_zhat = const_cast<acc_t*>(sum_dy_zhat.const_data_ptr<acc_t>());
    args.sum_dy = sums_copy.mutable_data_ptr<acc_t>();
    args.sum_dy_zhat = sums_copy.mutable_data_ptr<acc_t>() + C;
    args.coef = coef.mutable_data_ptr<acc_t>();
    args.dz = dz.mutable_data_ptr<scalar_t>();
    args.grad_bias = grad_bias.mutable_data_ptr<scalar_t>();
    launch(bn_feature_config(C, limits), bn_backward_finalize<scalar_t>, args);
    launch(bn_elementwise_config((N * C + kGroup - 1) / kGroup, limits), bn_backward_input<scalar_t>, args);
  });
  at::Tensor grad_input = need_grad_input ? at::mm(dz, weight) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::mm(dz.t(), input);
  return {grad_input, grad_weight, grad_bias, sum_dy_zhat.to(param_type(bn_weight, acc)),
          sum_dy.to(param_type(bn_bias, acc))};
}

// The gradient of relu(z) * dropout with respect to z, read off the saved output (a layer without
// BatchNorm): grad_out where the output is positive or NaN, scaled as the forward scaled it.
template <typename Launch>
at::Tensor relu_dropout_backward_device(const Launch& launch, const LaunchLimits& limits, const at::Tensor& grad_out_,
                                        const at::Tensor& output_, double dropout_p, const at::Tensor& seed_offset) {
  using namespace layer_detail;
  const at::Tensor g = grad_out_.contiguous(), out = output_.contiguous();
  const int64_t N = out.size(0), C = out.size(1);
  const DeviceDropout dropout = device_dropout(dropout_p, seed_offset, out);
  at::Tensor gz = at::empty({N, C}, out.options());
  launch.poison(gz);
  if (N * C == 0) return gz;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "relu_dropout_backward_device", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = out.const_data_ptr<scalar_t>();
    scalar_t* dzp = gz.mutable_data_ptr<scalar_t>();
    const BnBackwardArgs<scalar_t> args{.grad = gp,
                                        .saved = sp,
                                        .N = N,
                                        .C = C,
                                        .rows_per_chunk = 0,
                                        .chunks = 0,
                                        .count = N,
                                        .use_batch_stats = false,
                                        .packed = all_packed<scalar_t>({gp, sp, dzp}),
                                        .affine = nullptr,
                                        .mean = nullptr,
                                        .invstd = nullptr,
                                        .dropout = dropout.args,
                                        .part_dy = nullptr,
                                        .part_dy_zhat = nullptr,
                                        .sum_dy = nullptr,
                                        .sum_dy_zhat = nullptr,
                                        .coef = nullptr,
                                        .dz = dzp,
                                        .grad_bias = nullptr};
    launch(bn_elementwise_config((N * C + kGroup - 1) / kGroup, limits), bn_backward_input<scalar_t>, args);
  });
  return gz;
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
  const at::Tensor bias_acc =
      defined(bias) ? bias->to(at::toOpMathType(input.scalar_type())).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "linear_relu_dropout_forward_device",
      [&] { launch_bias_relu_dropout<scalar_t>(launch, limits, out, bias_acc, dropout.args); });
  return out;
}

}  // namespace fused_mlp::cuda
