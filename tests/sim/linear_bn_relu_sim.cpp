// The Linear -> BatchNorm1d -> ReLU -> Dropout CUDA kernels run on CPU tensors through the CUDA
// simulation, with the same host sequence and launch configurations as the real launcher and an
// H100's limits (or fewer SMs). Built by tests/simulated.py with torch.utils.cpp_extension.load.
#include <torch/extension.h>

#include "sim/cuda_sim.h"

#include "cuda/linear_bn_relu_host.h"
#include "sim_launch.h"

namespace {

namespace dev = fused_mlp::cuda;
using sim_launch::SimLaunch;
using Optional = c10::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& weight, const Optional& bias, const Optional& bn_weight,
    const Optional& bn_bias, const Optional& running_mean, const Optional& running_var, bool use_batch_stats,
    double eps, double dropout_p, const at::Tensor& seed_offset) {
  return dev::linear_bn_relu_forward_device(SimLaunch{}, sim_launch::launch_limits(), input, weight, bias, bn_weight,
                                            bn_bias, running_mean, running_var, use_batch_stats, eps, dropout_p,
                                            seed_offset, "simulated linear_bn_relu_forward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const Optional& bias,
    const Optional& bn_weight, const Optional& bn_bias, const at::Tensor& saved, const at::Tensor& mean,
    const at::Tensor& invstd, bool use_batch_stats, double dropout_p, const at::Tensor& seed_offset,
    bool need_grad_input) {
  return dev::linear_bn_relu_backward_device(SimLaunch{}, sim_launch::launch_limits(), grad_out, input, weight, bias,
                                             bn_weight, bn_bias, saved, mean, invstd, use_batch_stats, dropout_p,
                                             seed_offset, need_grad_input, /*need_grad_weight=*/true,
                                             "simulated linear_bn_relu_backward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_batch_stats(const at::Tensor& pre_bn, double eps) {
  return dev::bn_batch_stats_device(SimLaunch{}, sim_launch::launch_limits(), pre_bn, eps, "simulated bn_batch_stats");
}

at::Tensor bn_relu_dropout(const at::Tensor& pre_bn, const at::Tensor& mean, const at::Tensor& invstd,
                           const Optional& bn_weight, const Optional& bn_bias, double dropout_p,
                           const at::Tensor& seed_offset) {
  return dev::bn_relu_dropout_device(SimLaunch{}, sim_launch::launch_limits(), pre_bn, mean, invstd, bn_weight, bn_bias,
                                     dropout_p, seed_offset, "simulated bn_relu_dropout");
}

std::tuple<at::Tensor, at::Tensor> bn_backward_sums(const at::Tensor& grad_out, const at::Tensor& pre_bn,
                                                    const at::Tensor& mean, const at::Tensor& invstd,
                                                    const Optional& bn_weight, const Optional& bn_bias,
                                                    double dropout_p, const at::Tensor& seed_offset) {
  return dev::bn_backward_sums_device(SimLaunch{}, sim_launch::launch_limits(), grad_out, pre_bn, mean, invstd,
                                      bn_weight, bn_bias, dropout_p, seed_offset, "simulated bn_backward_sums");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_finish(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& pre_bn,
    const at::Tensor& mean, const at::Tensor& invstd, const Optional& bn_weight, const Optional& bn_bias,
    const at::Tensor& sum_dy, const at::Tensor& sum_dy_zhat, int64_t count, double dropout_p,
    const at::Tensor& seed_offset, bool need_grad_input) {
  return dev::bn_backward_finish_device(SimLaunch{}, sim_launch::launch_limits(), grad_out, input, weight, pre_bn, mean,
                                        invstd, bn_weight, bn_bias, sum_dy, sum_dy_zhat, count, dropout_p, seed_offset,
                                        need_grad_input, "simulated bn_backward_finish");
}

at::Tensor linear_relu_dropout_forward(const at::Tensor& input, const at::Tensor& weight, const Optional& bias,
                                       double dropout_p, const at::Tensor& seed_offset) {
  return dev::linear_relu_dropout_forward_device(SimLaunch{}, sim_launch::launch_limits(), input, weight, bias,
                                                 dropout_p, seed_offset, "simulated linear_relu_dropout_forward");
}

// The device's (seed, offset) write, from a generator state given by value or, as during CUDA-graph
// capture, through pointers plus an offset within the graph.
at::Tensor write_seed_offset(bool captured, int64_t seed, int64_t offset, const at::Tensor& graph_seed_offset,
                             int64_t offset_intragraph) {
  dev::SeedSource source{};
  source.captured = captured;
  if (captured) {
    source.seed_ptr = graph_seed_offset.const_data_ptr<int64_t>();
    source.offset_ptr = graph_seed_offset.const_data_ptr<int64_t>() + 1;
    source.offset_intragraph = static_cast<uint64_t>(offset_intragraph);
  } else {
    source.seed = static_cast<uint64_t>(seed);
    source.offset = static_cast<uint64_t>(offset);
  }
  at::Tensor out = at::full({2}, -1, at::kLong);
  SimLaunch{}(dev::write_seed_offset_config(), dev::write_seed_offset<int64_t>, source,
              out.mutable_data_ptr<int64_t>());
  return out;
}

pybind11::dict reduce_config(int64_t rows, int64_t features, int64_t features_per_thread) {
  const int kF = static_cast<int>(features_per_thread);
  const int64_t rows_per_chunk = dev::bn_rows_per_chunk(rows, features, kF, sim_launch::launch_limits());
  const int64_t chunks = dev::bn_chunk_count(rows, rows_per_chunk);
  const dev::LaunchConfig cfg = dev::bn_column_reduce_config(features, kF, chunks);
  pybind11::dict d;
  d["grid_x"] = cfg.grid.x;
  d["grid_y"] = cfg.grid.y;
  d["block"] = cfg.block.x;
  d["rows_per_chunk"] = rows_per_chunk;
  d["chunks"] = chunks;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward, pybind11::arg("grad_out"), pybind11::arg("input"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("bn_weight"), pybind11::arg("bn_bias"), pybind11::arg("saved"),
        pybind11::arg("mean"), pybind11::arg("invstd"), pybind11::arg("use_batch_stats"), pybind11::arg("dropout_p"),
        pybind11::arg("seed_offset"), pybind11::arg("need_grad_input") = true);
  m.def("bn_batch_stats", &bn_batch_stats);
  m.def("bn_relu_dropout", &bn_relu_dropout);
  m.def("bn_backward_sums", &bn_backward_sums);
  m.def("bn_backward_finish", &bn_backward_finish, pybind11::arg("grad_out"), pybind11::arg("input"),
        pybind11::arg("weight"), pybind11::arg("pre_bn"), pybind11::arg("mean"), pybind11::arg("invstd"),
        pybind11::arg("bn_weight"), pybind11::arg("bn_bias"), pybind11::arg("sum_dy"), pybind11::arg("sum_dy_zhat"),
        pybind11::arg("count"), pybind11::arg("dropout_p"), pybind11::arg("seed_offset"),
        pybind11::arg("need_grad_input") = true);
  m.def("linear_relu_dropout_forward", &linear_relu_dropout_forward);
  m.def("write_seed_offset", &write_seed_offset);
  m.def("reduce_config", &reduce_config);
  m.def("set_sm_count", [](int64_t n) { sim_launch::limits.sm_count = static_cast<int>(n); });
  m.def("set_barrier_timeout_ms", [](int64_t ms) { cuda_sim::set_barrier_timeout(std::chrono::milliseconds(ms)); });
}
