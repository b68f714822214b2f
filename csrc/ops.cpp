// Every op schema of the fused_mlp namespace, in one place.
// Kernels are registered per backend: csrc/cpu_dispatch.cpp (CPU, over the per-instruction-set
// kernels of csrc/cpu/*.cpp), csrc/cuda/*.cu (CUDA).
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

namespace {

// _C.cpu_capability(): the instruction set of the CPU kernels this process runs.
PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fused_mlp::cpu::cpu_capability_name(fused_mlp::cpu::cpu_capability()));
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction set (DEFAULT, AVX2 or AVX512) of the CPU kernels in use: the best this CPU supports, "
     "or less if ATEN_CPU_CAPABILITY asks for less."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// An importable module, so `import fused_mlp._C` loads the library and runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

// fused_mlp/ops.py holds the same schema strings (ops.SCHEMAS), for the reference backend that
// defines the ops when this library is not built; tests/test_autograd.py holds the two equal.
TORCH_LIBRARY(fused_mlp, m) {
  // Cross-entropy over the last dimension of a 2-D input (rows, classes).
  // target: int64 class indices of shape (rows,), or class probabilities of the input's shape.
  // reduction: 0 = none, 1 = mean, 2 = sum (the values of at::Reduction).
  // Returns the loss (shape (rows,) for none, () otherwise) and each row's logsumexp, in float64
  // whatever the input dtype: all the backward needs besides the input itself.
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing) -> (Tensor loss, Tensor logsumexp)");
  // grad_input = scale * (softmax(input) - target distribution), one pass, from the saved logsumexp.
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor logsumexp, int reduction, int ignore_index, float label_smoothing) -> Tensor");

  // Linear -> BatchNorm1d -> ReLU -> Dropout over a (batch, in_features) input.
  // use_batch_stats: normalize with the batch's mean and biased variance (training, or
  // track_running_stats=False); else with running_mean / running_var, folded into the GEMM.
  // Dropout (p = dropout_p, 0 for none) follows csrc/common/philox.h's mapping; seed_offset is an
  // int64 tensor (seed, offset), on the CPU or on the input's device. Returns: out; the pre-BN activation z = x W^T + b
  // (batch statistics; empty otherwise); the per-feature mean and invstd used; the unbiased batch variance (batch
  // statistics; the running variance otherwise). Mean, invstd and variance are float32 (float64 for float64 input).
  m.def(
      "linear_bn_relu_forward(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, "
      "Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, bool use_batch_stats, float eps, "
      "float dropout_p, Tensor seed_offset) -> (Tensor out, Tensor pre_bn, Tensor mean, "
      "Tensor invstd, Tensor batch_var)");
  // saved: the forward's pre_bn (batch statistics) or its out (running statistics).
  // Returns the gradients of input, weight, bias, bn_weight and bn_bias; without need_grad_input
  // (the first layer of a network, whose input needs no gradient) grad_input is an empty tensor
  // and its GEMM is skipped.
  m.def(
      "linear_bn_relu_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor saved, Tensor mean, Tensor invstd, "
      "bool use_batch_stats, float dropout_p, Tensor seed_offset, bool need_grad_input=True) -> (Tensor grad_input, "
      "Tensor grad_weight, Tensor grad_bias, Tensor grad_bn_weight, Tensor grad_bn_bias)");
  // The forward with batch statistics after its GEMM is these two stages, also ops of their own:
  // the per-feature mean, invstd and unbiased variance of the pre-BN activation (as the forward
  // returns them; reduced in a fixed order, so the same bits at any thread count), and the
  // normalize -> ReLU -> dropout epilogue.
  m.def("bn_batch_stats(Tensor pre_bn, float eps) -> (Tensor mean, Tensor invstd, Tensor batch_var)");
  m.def(
      "bn_relu_dropout(Tensor pre_bn, Tensor mean, Tensor invstd, Tensor? bn_weight, Tensor? bn_bias, "
      "float dropout_p, Tensor seed_offset) -> Tensor");
  // The backward with batch statistics after its relu/dropout is these two stages, also ops of their
  // own, so that a caller can all-reduce the sums across processes in between (synchronized
  // BatchNorm): the per-feature sums of dy and dy * zhat over this call's rows (dy: grad_out through
  // dropout and ReLU, recomputed from pre_bn), then, from sums over `count` rows in all, the
  // gradients linear_bn_relu_backward returns (grad_bn_weight and grad_bn_bias are the sums given).
  m.def(
      "bn_backward_sums(Tensor grad_out, Tensor pre_bn, Tensor mean, Tensor invstd, Tensor? bn_weight, "
      "Tensor? bn_bias, float dropout_p, Tensor seed_offset) -> (Tensor sum_dy, Tensor sum_dy_zhat)");
  m.def(
      "bn_backward_finish(Tensor grad_out, Tensor input, Tensor weight, Tensor pre_bn, Tensor mean, Tensor invstd, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor sum_dy, Tensor sum_dy_zhat, int count, float dropout_p, "
      "Tensor seed_offset, bool need_grad_input=True) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_bn_weight, Tensor grad_bn_bias)");
  // running = (1 - factor) * running + factor * batch, in place: BatchNorm's running statistics.
  m.def(
      "bn_update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor batch_mean, "
      "Tensor batch_var, float factor) -> ()");

  // relu(input weight^T + bias) * dropout: the inference form of the layer once BatchNorm is
  // folded into weight and bias (no autograd).
  m.def(
      "linear_relu_dropout_forward(Tensor input, Tensor weight, Tensor? bias, float dropout_p, "
      "Tensor seed_offset) -> Tensor");
  // The dropout generator itself (csrc/common/philox.h), for verification: Philox4x32-10 of each
  // row of counter ((n, 4) int64 holding 32-bit words) under key ((2,) likewise); and the keep mask
  // of elements [start, start + numel) for (seed, offset) and probability p.
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");
  m.def("dropout_mask(Tensor seed_offset, int numel, float p, int start=0) -> Tensor");
  // A fresh (seed, offset) for one dropout mask on like's device, drawn from generator (default:
  // that device's default generator). On CUDA the device writes it itself, so that a CUDA graph
  // replays it with new values as PyTorch's own dropout does.
  m.def("philox_seed_offset(Tensor like, Generator? generator=None) -> Tensor", {at::Tag::nondeterministic_seeded});

  // The whole MLP, one op per pass (csrc/mlp_network.h): hidden layers Linear -> BatchNorm1d ->
  // ReLU -> Dropout (batch_norm) or Linear -> ReLU -> Dropout, then the output Linear. weights and
  // biases hold one entry per Linear, the output layer's last; the BatchNorm lists one per hidden
  // layer (empty without BatchNorm, or without affine / running statistics). Hidden layer i drops
  // out with (seed, offset + i). Returns the logits, each hidden layer's output, and per hidden
  // layer what linear_bn_relu_forward returns (pre_bn, mean, invstd, batch_var; empty lists
  // without BatchNorm).
  m.def(
      "mlp_forward(Tensor input, Tensor[] weights, Tensor?[] biases, Tensor?[] bn_weights, Tensor?[] bn_biases, "
      "Tensor?[] running_means, Tensor?[] running_vars, bool batch_norm, bool use_batch_stats, float eps, "
      "float dropout_p, Tensor seed_offset) -> (Tensor out, Tensor[] hidden, Tensor[] pre_bn, Tensor[] mean, "
      "Tensor[] invstd, Tensor[] batch_var)");
  // Every gradient of mlp_forward's logits, from what it returned (with batch statistics, hidden
  // may be empty: each hidden output is then recomputed from pre_bn). need_layer_grads: one flag per
  // Linear; a layer without it gets empty gradients and no weight GEMM, and no input GEMM runs
  // below the lowest layer that needs one (grad_input is empty without need_grad_input).
  m.def(
      "mlp_backward(Tensor grad_out, Tensor input, Tensor[] weights, Tensor?[] biases, Tensor?[] bn_weights, "
      "Tensor?[] bn_biases, Tensor[] hidden, Tensor[] pre_bn, Tensor[] mean, Tensor[] invstd, bool batch_norm, "
      "bool use_batch_stats, float dropout_p, Tensor seed_offset, bool need_grad_input, bool[] need_layer_grads) "
      "-> (Tensor grad_input, Tensor[] grad_weights, Tensor[] grad_biases, Tensor[] grad_bn_weights, "
      "Tensor[] grad_bn_biases)");
  // Inference on weights with BatchNorm folded in: relu(x W^T + b) per hidden layer, then the
  // output Linear.
  m.def("mlp_inference(Tensor input, Tensor[] weights, Tensor?[] biases) -> Tensor");
  // bn_update_running_stats_ for every hidden layer, each with its own factor.
  m.def(
      "mlp_update_running_stats_(Tensor(a!)[] running_means, Tensor(b!)[] running_vars, Tensor[] batch_means, "
      "Tensor[] batch_vars, float[] factors) -> ()");
  // A whole training step (csrc/mlp_train_step.h): mlp_forward, the mean cross-entropy of the logits
  // against class-index targets (label_smoothing as cross_entropy_forward's), the running-statistics
  // update (momenta: one factor per hidden layer, or empty for none), the backward, and the
  // optimizer's update of every parameter in place, each layer's as soon as the backward is done
  // with it. optimizer: 0 SGD, 1 Adam, 2 AdamW; group_hyperparameters: float64 (groups, 6) rows of
  // (lr, weight_decay, beta1 or momentum, beta2 or dampening, eps, flags: 1 maximize, 2 amsgrad or
  // nesterov, 4 first momentum step); param_groups: each parameter's row. The state lists follow
  // the parameters' flat order (per Linear: weight, bias, BatchNorm weight, BatchNorm bias, where
  // present): steps (Adam), first_moments (exp_avg, or SGD's momentum_buffer), second_moments
  // (exp_avg_sq), max_second_moments (amsgrad), each empty where the optimizer has none; grads,
  // when given, receive the gradients. Returns the loss, detached.
  m.def(
      "mlp_train_step(Tensor input, Tensor target, Tensor(a!)[] weights, Tensor(b!)?[] biases, "
      "Tensor(c!)?[] bn_weights, Tensor(d!)?[] bn_biases, Tensor(e!)?[] running_means, Tensor(f!)?[] running_vars, "
      "float[] momenta, bool batch_norm, bool use_batch_stats, float eps, float dropout_p, Tensor seed_offset, "
      "float label_smoothing, int optimizer, Tensor group_hyperparameters, int[] param_groups, Tensor(g!)[] steps, "
      "Tensor(h!)[] first_moments, Tensor(i!)[] second_moments, Tensor(j!)[] max_second_moments, "
      "Tensor(k!)[] grads) -> Tensor");
}
