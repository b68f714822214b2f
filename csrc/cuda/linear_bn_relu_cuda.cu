// The Linear -> BatchNorm1d -> ReLU -> Dropout ops on CUDA: real launches of the kernels of
// linear_bn_relu.cuh on the current stream, through the host sequence of linear_bn_relu_host.h
// (which the simulation shares); and the graph-safe (seed, offset) draw of the dropout masks.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>

#include "bn_running_stats.h"
#include "cuda/linear_bn_relu_host.h"
#include "cuda/stream_launch.h"

namespace fused_mlp::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool use_batch_stats,
    double eps, double dropout_p, const at::Tensor& seed_offset) {
  const c10::cuda::CUDAGuard guard(input.device());
  return linear_bn_relu_forward_device(current_stream_launch(input), device_limits(input.device().index()), input,
                                       weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats,
                                       eps, dropout_p, seed_offset, "fused_mlp::linear_bn_relu_forward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bn_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const at::Tensor& saved, const at::Tensor& mean, const at::Tensor& invstd,
    bool use_batch_stats, double dropout_p, const at::Tensor& seed_offset, bool need_grad_input) {
  const c10::cuda::CUDAGuard guard(input.device());
  return linear_bn_relu_backward_device(current_stream_launch(input), device_limits(input.device().index()), grad_out,
                                        input, weight, bias, bn_weight, bn_bias, saved, mean, invstd, use_batch_stats,
                                        dropout_p, seed_offset, need_grad_input, /*need_grad_weight=*/true,
                                        "fused_mlp::linear_bn_relu_backward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_batch_stats_cuda(const at::Tensor& pre_bn, double eps) {
  const c10::cuda::CUDAGuard guard(pre_bn.device());
  return bn_batch_stats_device(current_stream_launch(pre_bn), device_limits(pre_bn.device().index()), pre_bn, eps,
                               "fused_mlp::bn_batch_stats");
}

at::Tensor bn_relu_dropout_cuda(const at::Tensor& pre_bn, const at::Tensor& mean, const at::Tensor& invstd,
                                const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
                                double dropout_p, const at::Tensor& seed_offset) {
  const c10::cuda::CUDAGuard guard(pre_bn.device());
  return bn_relu_dropout_device(current_stream_launch(pre_bn), device_limits(pre_bn.device().index()), pre_bn, mean,
                                invstd, bn_weight, bn_bias, dropout_p, seed_offset, "fused_mlp::bn_relu_dropout");
}

std::tuple<at::Tensor, at::Tensor> bn_backward_sums_cuda(const at::Tensor& grad_out, const at::Tensor& pre_bn,
                                                         const at::Tensor& mean, const at::Tensor& invstd,
                                                         const c10::optional<at::Tensor>& bn_weight,
                                                         const c10::optional<at::Tensor>& bn_bias, double dropout_p,
                                                         const at::Tensor& seed_offset) {
  const c10::cuda::CUDAGuard guard(pre_bn.device());
  return bn_backward_sums_device(current_stream_launch(pre_bn), device_limits(pre_bn.device().index()), grad_out,
                                 pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset,
                                 "fused_mlp::bn_backward_sums");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_finish_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& pre_bn,
    const at::Tensor& mean, const at::Tensor& invstd, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const at::Tensor& sum_dy, const at::Tensor& sum_dy_zhat, int64_t count,
    double dropout_p, const at::Tensor& seed_offset, bool need_grad_input) {
  const c10::cuda::CUDAGuard guard(input.device());
  return bn_backward_finish_device(current_stream_launch(input), device_limits(input.device().index()), grad_out, input,
                                   weight, pre_bn, mean, invstd, bn_weight, bn_bias, sum_dy, sum_dy_zhat, count,
                                   dropout_p, seed_offset, need_grad_input, "fused_mlp::bn_backward_finish");
}

at::Tensor linear_relu_dropout_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias, double dropout_p,
                                            const at::Tensor& seed_offset) {
  const c10::cuda::CUDAGuard guard(input.device());
  return linear_relu_dropout_forward_device(current_stream_launch(input), device_limits(input.device().index()), input,
                                            weight, bias, dropout_p, seed_offset,
                                            "fused_mlp::linear_relu_dropout_forward");
}

// As PyTorch's dropout draws its Philox state: under the generator's lock, reserve an offset
// increment; the state holds either values or, during CUDA-graph capture, device pointers that
// each replay refreshes. A one-thread kernel turns it into (seed, offset) in device memory, so
// the layer's kernels (and a captured graph) read the values current at their own launch.
at::Tensor philox_seed_offset_cuda(const at::Tensor& like, const c10::optional<at::Generator>& generator) {
  const c10::cuda::CUDAGuard guard(like.device());
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(like.device().index()));
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    // Each mask's counters include the offset, so distinct offsets are all a call needs; 4 is the
    // smallest increment the generator accepts.
    state = gen->philox_cuda_state(4);
  }
  SeedSource source{};
  source.captured = state.captured_;
  if (state.captured_) {
    source.seed_ptr = state.seed_.ptr;
    source.offset_ptr = state.offset_.ptr;
    source.offset_intragraph = state.offset_intragraph_;
  } else {
    source.seed = state.seed_.val;
    source.offset = state.offset_.val;
  }
  at::Tensor out = at::empty({2}, like.options().dtype(at::kLong));
  current_stream_launch(like)(write_seed_offset_config(), write_seed_offset<int64_t>, source,
                              out.mutable_data_ptr<int64_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_mlp, CUDA, m) {
  m.impl("linear_bn_relu_forward", &linear_bn_relu_forward_cuda);
  m.impl("linear_bn_relu_backward", &linear_bn_relu_backward_cuda);
  m.impl("bn_batch_stats", &bn_batch_stats_cuda);
  m.impl("bn_relu_dropout", &bn_relu_dropout_cuda);
  m.impl("bn_backward_sums", &bn_backward_sums_cuda);
  m.impl("bn_backward_finish", &bn_backward_finish_cuda);
  m.impl("linear_relu_dropout_forward", &linear_relu_dropout_forward_cuda);
  m.impl("bn_update_running_stats_", &fused_mlp::bn_update_running_stats);
  m.impl("philox_seed_offset", &philox_seed_offset_cuda);
}

}  // namespace fused_mlp::cuda
