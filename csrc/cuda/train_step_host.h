// The host side of mlp_train_step on the device: the loss and optimizer policies of
// csrc/mlp_train_step.h over the cross-entropy host sequence and the update kernel of
// optimizer.cuh, for any launch policy. mlp_cuda.cu uses them with real launches on the current
// stream, tests/sim/mlp_sim.cpp with the simulation. Nothing here reads a device value: a step
// counter on the device is advanced there, and one on the host (where torch.optim keeps it unless
// the optimizer is fused or capturable) is advanced here.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/ones.h>

#include <optional>
#include <tuple>

#include "cuda/cross_entropy_host.h"
#include "cuda/optimizer.cuh"
#include "mlp_train_step.h"

namespace fused_mlp::cuda {

template <typename Launch>
struct DeviceLoss {
  Launch launch;
  LaunchLimits limits;

  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                             double label_smoothing) const {
    return cross_entropy_forward_device(launch, limits, logits, target, std::nullopt, at::Reduction::Mean, -100,
                                        label_smoothing, "fused_mlp::mlp_train_step (the loss)");
  }
  at::Tensor backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                      double label_smoothing) const {
    const at::Tensor one = at::ones({}, logits.options());
    return cross_entropy_backward_device(launch, limits, one, logits, target, std::nullopt, lse, at::Reduction::Mean,
                                         -100, label_smoothing, "fused_mlp::mlp_train_step (the loss)");
  }
};

template <typename Launch>
struct DeviceOptimizer {
  Launch launch;
  LaunchLimits limits;
  const OptimizerArgs& opt;

  void operator()(int64_t k, const at::Tensor& param, const at::Tensor& grad) const {
    constexpr const char* op = "fused_mlp::mlp_train_step";
    const at::Tensor& hyper = opt.group_hyperparameters;
    TORCH_CHECK(hyper.device() == param.device(), op, ": group_hyperparameters must be on the parameters' device, ",
                param.device());
    const double* row = hyper.const_data_ptr<double>() + opt.param_groups[k] * kHyperColumns;
    const at::Tensor none;
    const bool adam = opt.kind != OptimizerKind::kSgd;
    const float* step = nullptr;
    double step_value = 0.0;
    if (adam) {
      const at::Tensor& counter = opt.steps[k];
      if (counter.device() == param.device()) {
        TORCH_CHECK(counter.scalar_type() == at::kFloat, op, ": steps[", k,
                    "] on the device must be float32, as torch.optim keeps it for fused and capturable optimizers");
        float* p = counter.mutable_data_ptr<float>();
        launch(one_thread_config(), advance_step<float>, p);
        step = p;
      } else {
        TORCH_CHECK(counter.device().is_cpu(), op, ": steps[", k, "] must be on the CPU or on ", param.device());
        step_value = advance_host_step(counter);
      }
    }
    AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "optimizer_update", [&] {
      auto ptr = [](const at::TensorList list, int64_t i) -> scalar_t* {
        return list.empty() ? nullptr : list[i].mutable_data_ptr<scalar_t>();
      };
      const OptimizerUpdateArgs<scalar_t> args{param.mutable_data_ptr<scalar_t>(),
                                               grad.const_data_ptr<scalar_t>(),
                                               ptr(opt.first_moments, k),
                                               ptr(opt.second_moments, k),
                                               ptr(opt.max_second_moments, k),
                                               param.numel(),
                                               row,
                                               step,
                                               step_value,
                                               opt.kind};
      if (param.numel() > 0) launch(optimizer_update_config(param.numel(), limits), optimizer_update<scalar_t>, args);
    });
  }
};

}  // namespace fused_mlp::cuda
