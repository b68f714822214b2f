// The cross-entropy ops on CUDA: real launches of the kernels of cross_entropy.cuh on the current
// stream, through the host sequence of cross_entropy_host.h (which the simulation shares).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cross_entropy_host.h"
#include "cuda/stream_launch.h"

namespace fused_mlp::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cuda(const at::Tensor& input, const at::Tensor& target,
                                                              const c10::optional<at::Tensor>& weight,
                                                              int64_t reduction, int64_t ignore_index,
                                                              double label_smoothing) {
  const c10::cuda::CUDAGuard guard(input.device());
  const StreamLaunch launch = current_stream_launch(input);
  return cross_entropy_forward_device(launch, device_limits(input.device().index()), input, target, weight, reduction,
                                      ignore_index, label_smoothing, "fused_mlp::cross_entropy_forward");
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                       const c10::optional<at::Tensor>& weight, const at::Tensor& logsumexp,
                                       int64_t reduction, int64_t ignore_index, double label_smoothing) {
  const c10::cuda::CUDAGuard guard(input.device());
  const StreamLaunch launch = current_stream_launch(input);
  return cross_entropy_backward_device(launch, device_limits(input.device().index()), grad_loss, input, target, weight,
                                       logsumexp, reduction, ignore_index, label_smoothing,
                                       "fused_mlp::cross_entropy_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_mlp, CUDA, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
}

}  // namespace fused_mlp::cuda
