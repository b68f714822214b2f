// The host side of the cross-entropy device kernels: checks, allocations and the sequence of
// launches, written once for any `launch` policy (callable as launch(config, kernel, args...),
// with launch.poison(tensor) called on every fresh output: a no-op on a GPU, NaN in the
// simulation, so a value a kernel forgets to write shows). cross_entropy_cuda.cu instantiates it with real
// <<<...>>> launches on the current stream; tests/sim/cross_entropy_sim.cpp with the CUDA
// simulation on CPU tensors. Both therefore run the same kernels with the same configurations.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <tuple>

#include "cross_entropy_checks.h"
#include "cuda/cross_entropy.cuh"

namespace fused_mlp::cuda {

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_device(const Launch& launch, const LaunchLimits& limits,
                                                                const at::Tensor& input_, const at::Tensor& target_,
                                                                const c10::optional<at::Tensor>& weight_,
                                                                int64_t reduction, int64_t ignore_index,
                                                                double label_smoothing, const char* op) {
  const Problem pb = check_problem(input_, target_, weight_, reduction, ignore_index, label_smoothing, op);
  const at::Tensor input = input_.contiguous(), target = target_.contiguous();
  const at::Tensor weight = weight_.has_value() ? weight_->contiguous() : at::Tensor();
  const auto acc = at::toOpMathType(input.scalar_type());
  at::Tensor lse = at::empty({pb.rows}, input.options().dtype(at::kDouble));
  at::Tensor row_loss = at::empty({pb.rows}, input.options().dtype(acc));
  at::Tensor loss =
      pb.reduction == at::Reduction::None ? at::empty({pb.rows}, input.options()) : at::empty({}, input.options());
  at::Tensor scalars = at::empty({2}, input.options().dtype(at::kDouble));
  for (at::Tensor* t : {&lse, &row_loss, &loss, &scalars}) launch.poison(*t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_forward_device", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t> args{.input = input.const_data_ptr<scalar_t>(),
                                     .target = pb.prob_target ? nullptr : target.const_data_ptr<int64_t>(),
                                     .prob_target = pb.prob_target ? target.const_data_ptr<scalar_t>() : nullptr,
                                     .weight = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr,
                                     .rows = pb.rows,
                                     .classes = pb.classes,
                                     .ignore_index = pb.ignore_index,
                                     .label_smoothing = pb.label_smoothing,
                                     .row_loss = row_loss.mutable_data_ptr<acc_t>(),
                                     .logsumexp = lse.mutable_data_ptr<double>()};
    if (pb.rows > 0) {
      const LaunchConfig rows_cfg = cross_entropy_rows_config(pb.rows, pb.classes, limits);
      if (cross_entropy_warp_per_row(pb.classes)) {
        launch_warp_rows<scalar_t>(launch, rows_cfg, args);
      } else {
        launch(rows_cfg, cross_entropy_forward_block_rows<scalar_t>, args);
      }
    }
    if (pb.reduction == at::Reduction::None) {
      if (pb.rows > 0) {
        launch(cross_entropy_elementwise_config(pb.rows, limits), cross_entropy_write_row_losses<scalar_t>,
               static_cast<const acc_t*>(row_loss.const_data_ptr<acc_t>()), pb.rows, loss.mutable_data_ptr<scalar_t>());
      }
      return;
    }
    const LaunchConfig one_block = cross_entropy_reduce_config(limits);
    launch(one_block, cross_entropy_batch_scalars<scalar_t>, args.target, args.weight, pb.rows, pb.classes,
           pb.ignore_index, scalars.mutable_data_ptr<double>());
    launch(one_block, cross_entropy_reduce_loss<scalar_t>, static_cast<const acc_t*>(row_loss.const_data_ptr<acc_t>()),
           pb.rows, pb.reduction, static_cast<const double*>(scalars.const_data_ptr<double>()),
           loss.mutable_data_ptr<scalar_t>());
  });
  return {loss, lse};
}

template <typename Launch>
at::Tensor cross_entropy_backward_device(const Launch& launch, const LaunchLimits& limits, const at::Tensor& grad_loss_,
                                         const at::Tensor& input_, const at::Tensor& target_,
                                         const c10::optional<at::Tensor>& weight_, const at::Tensor& lse_,
                                         int64_t reduction, int64_t ignore_index, double label_smoothing,
                                         const char* op) {
  const Problem pb = check_problem(input_, target_, weight_, reduction, ignore_index, label_smoothing, op);
  check_backward(pb, input_, grad_loss_, lse_, op);
  const at::Tensor input = input_.contiguous(), target = target_.contiguous(), lse = lse_.contiguous();
  const at::Tensor weight = weight_.has_value() ? weight_->contiguous() : at::Tensor();
  const auto acc = at::toOpMathType(input.scalar_type());
  at::Tensor grad = at::empty_like(input, at::MemoryFormat::Contiguous);
  at::Tensor scalars = at::empty({2}, input.options().dtype(at::kDouble));
  at::Tensor prob_mass = at::empty({pb.prob_target ? pb.rows : 0}, input.options().dtype(acc));
  for (at::Tensor* t : {&grad, &scalars, &prob_mass}) launch.poison(*t);
  if (pb.rows == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_backward_device", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* t = pb.prob_target ? nullptr : target.const_data_ptr<int64_t>();
    const scalar_t* pt = pb.prob_target ? target.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    launch(cross_entropy_reduce_config(limits), cross_entropy_batch_scalars<scalar_t>, t, w, pb.rows, pb.classes,
           pb.ignore_index, scalars.mutable_data_ptr<double>());
    if (pb.prob_target) {
      const ForwardArgs<scalar_t> fa{.input = input.const_data_ptr<scalar_t>(),
                                     .target = t,
                                     .prob_target = pt,
                                     .weight = w,
                                     .rows = pb.rows,
                                     .classes = pb.classes,
                                     .ignore_index = pb.ignore_index,
                                     .label_smoothing = pb.label_smoothing,
                                     .row_loss = nullptr,
                                     .logsumexp = nullptr};
      const LaunchConfig cfg = cross_entropy_warp_per_row_config(pb.rows, limits);
      launch(cfg, cross_entropy_prob_mass<scalar_t>, fa, prob_mass.mutable_data_ptr<acc_t>());
    }
    const BackwardArgs<scalar_t> args{.grad_loss = grad_loss_.const_data_ptr<scalar_t>(),
                                      .grad_stride = pb.reduction == at::Reduction::None ? grad_loss_.stride(0) : 0,
                                      .input = input.const_data_ptr<scalar_t>(),
                                      .target = t,
                                      .prob_target = pt,
                                      .weight = w,
                                      .logsumexp = lse.const_data_ptr<double>(),
                                      .scalars = scalars.const_data_ptr<double>(),
                                      .prob_mass = pb.prob_target ? prob_mass.const_data_ptr<acc_t>() : nullptr,
                                      .rows = pb.rows,
                                      .classes = pb.classes,
                                      .ignore_index = pb.ignore_index,
                                      .reduction = pb.reduction,
                                      .label_smoothing = pb.label_smoothing,
                                      .grad_input = grad.mutable_data_ptr<scalar_t>()};
    launch(cross_entropy_elementwise_config(pb.rows * pb.classes, limits), cross_entropy_backward_elementwise<scalar_t>,
           args);
  });
  return grad;
}

}  // namespace fused_mlp::cuda
