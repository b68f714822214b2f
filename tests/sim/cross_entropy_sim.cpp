// The cross-entropy CUDA kernels run on CPU tensors through the CUDA simulation, with the same
// host sequence and launch configurations as the real launcher and an H100's limits. Built by
// tests/simulated.py with torch.utils.cpp_extension.load.
#include <torch/extension.h>

#include "sim/cuda_sim.h"

#include "cuda/cross_entropy_host.h"
#include "sim_launch.h"

namespace {

using fused_mlp::cuda::LaunchConfig;
using fused_mlp::cuda::LaunchLimits;

using sim_launch::SimLaunch;
LaunchLimits limits() {
  return sim_launch::launch_limits();
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& target,
                                           const c10::optional<at::Tensor>& weight, int64_t reduction,
                                           int64_t ignore_index, double label_smoothing) {
  return fused_mlp::cuda::cross_entropy_forward_device(SimLaunch{}, limits(), input, target, weight, reduction,
                                                       ignore_index, label_smoothing,
                                                       "simulated cross_entropy_forward");
}

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                    const c10::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t reduction,
                    int64_t ignore_index, double label_smoothing) {
  return fused_mlp::cuda::cross_entropy_backward_device(SimLaunch{}, limits(), grad_loss, input, target, weight, lse,
                                                        reduction, ignore_index, label_smoothing,
                                                        "simulated cross_entropy_backward");
}

// Shrinks the simulated device (fewer SMs), so that a small input already needs more rows than
// one grid covers and the kernels' grid-stride loops run.
void set_sm_count(int64_t sm_count) {
  sim_launch::limits.sm_count = static_cast<int>(sm_count);
}

pybind11::dict launch_config(int64_t rows, int64_t classes) {
  namespace dev = fused_mlp::cuda;
  const LaunchConfig cfg = dev::cross_entropy_rows_config(rows, classes, limits());
  const bool warp_per_row = dev::cross_entropy_warp_per_row(classes);
  pybind11::dict d;
  d["grid"] = cfg.grid.x;
  d["block"] = cfg.block.x;
  d["warp_per_row"] = warp_per_row;
  d["lanes_per_row"] = warp_per_row ? dev::cross_entropy_lanes_per_row(classes) : 0;
  d["values_per_lane"] = warp_per_row ? dev::cross_entropy_values_per_lane(classes) : 0;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("set_sm_count", &set_sm_count);
  m.def("launch_config", &launch_config);
  m.def("set_barrier_timeout_ms", [](int64_t ms) { cuda_sim::set_barrier_timeout(std::chrono::milliseconds(ms)); });
}
