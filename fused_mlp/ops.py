"""The ``torch.ops.fused_mlp`` ops: where they come from, and their fake (meta) implementations.

With the compiled extension loaded, the ops and their kernels are the C++ ones (schemas in
csrc/ops.cpp). Without it, the same schemas are defined here, with the functions of
``fused_mlp.reference`` as their CPU and CUDA kernels. Either way ``torch.ops.fused_mlp.*`` exists
with the same names and schemas, and everything registered on top of the ops (fakes here, autograd
in ``fused_mlp.autograd``, vmap rules in ``fused_mlp.batching``) serves both backends.

Every function here takes and returns exactly what the op of the same name does.
"""

import torch

from . import _extension, reference

#: "extension" (the compiled kernels) or "reference" (plain PyTorch), fixed at import.
BACKEND = _extension.load()

#: The op schemas, as csrc/ops.cpp defines them (tests/test_autograd.py holds the two to each other).
SCHEMAS = {
    "cross_entropy_forward": "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int reduction, "
    "int ignore_index, float label_smoothing) -> (Tensor loss, Tensor logsumexp)",
    "cross_entropy_backward": "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
    "Tensor logsumexp, int reduction, int ignore_index, float label_smoothing) -> Tensor",
    "linear_bn_relu_forward": "linear_bn_relu_forward(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, "
    "Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, bool use_batch_stats, float eps, float dropout_p, "
    "Tensor seed_offset) -> (Tensor out, Tensor pre_bn, Tensor mean, Tensor invstd, Tensor batch_var)",
    "linear_bn_relu_backward": "linear_bn_relu_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor? bias, "
    "Tensor? bn_weight, Tensor? bn_bias, Tensor saved, Tensor mean, Tensor invstd, bool use_batch_stats, "
    "float dropout_p, Tensor seed_offset, bool need_grad_input=True) -> (Tensor grad_input, Tensor grad_weight, "
    "Tensor grad_bias, Tensor grad_bn_weight, Tensor grad_bn_bias)",
    "bn_batch_stats": "bn_batch_stats(Tensor pre_bn, float eps) -> (Tensor mean, Tensor invstd, Tensor batch_var)",
    "bn_relu_dropout": "bn_relu_dropout(Tensor pre_bn, Tensor mean, Tensor invstd, Tensor? bn_weight, "
    "Tensor? bn_bias, float dropout_p, Tensor seed_offset) -> Tensor",
    "bn_backward_sums": "bn_backward_sums(Tensor grad_out, Tensor pre_bn, Tensor mean, Tensor invstd, "
    "Tensor? bn_weight, Tensor? bn_bias, float dropout_p, Tensor seed_offset) -> (Tensor sum_dy, Tensor sum_dy_zhat)",
    "bn_backward_finish": "bn_backward_finish(Tensor grad_out, Tensor input, Tensor weight, Tensor pre_bn, "
    "Tensor mean, Tensor invstd, Tensor? bn_weight, Tensor? bn_bias, Tensor sum_dy, Tensor sum_dy_zhat, int count, "
    "float dropout_p, Tensor seed_offset, bool need_grad_input=True) -> (Tensor grad_input, Tensor grad_weight, "
    "Tensor grad_bias, Tensor grad_bn_weight, Tensor grad_bn_bias)",
    "bn_update_running_stats_": "bn_update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, "
    "Tensor batch_mean, Tensor batch_var, float factor) -> ()",
    "linear_relu_dropout_forward": "linear_relu_dropout_forward(Tensor input, Tensor weight, Tensor? bias, "
    "float dropout_p, Tensor seed_offset) -> Tensor",
    "philox4x32_10": "philox4x32_10(Tensor counter, Tensor key) -> Tensor",
    "dropout_mask": "dropout_mask(Tensor seed_offset, int numel, float p, int start=0) -> Tensor",
    "philox_seed_offset": "philox_seed_offset(Tensor like, Generator? generator=None) -> Tensor",
    "mlp_forward": "mlp_forward(Tensor input, Tensor[] weights, Tensor?[] biases, Tensor?[] bn_weights, "
    "Tensor?[] bn_biases, Tensor?[] running_means, Tensor?[] running_vars, bool batch_norm, bool use_batch_stats, "
    "float eps, float dropout_p, Tensor seed_offset) -> (Tensor out, Tensor[] hidden, Tensor[] pre_bn, "
    "Tensor[] mean, Tensor[] invstd, Tensor[] batch_var)",
    "mlp_backward": "mlp_backward(Tensor grad_out, Tensor input, Tensor[] weights, Tensor?[] biases, "
    "Tensor?[] bn_weights, Tensor?[] bn_biases, Tensor[] hidden, Tensor[] pre_bn, Tensor[] mean, Tensor[] invstd, "
    "bool batch_norm, bool use_batch_stats, float dropout_p, Tensor seed_offset, bool need_grad_input, "
    "bool[] need_layer_grads) -> (Tensor grad_input, Tensor[] grad_weights, Tensor[] grad_biases, "
    "Tensor[] grad_bn_weights, Tensor[] grad_bn_biases)",
    "mlp_inference": "mlp_inference(Tensor input, Tensor[] weights, Tensor?[] biases) -> Tensor",
    "mlp_update_running_stats_": "mlp_update_running_stats_(Tensor(a!)[] running_means, Tensor(b!)[] running_vars, "
    "Tensor[] batch_means, Tensor[] batch_vars, float[] factors) -> ()",
    "mlp_train_step": "mlp_train_step(Tensor input, Tensor target, Tensor(a!)[] weights, Tensor(b!)?[] biases, "
    "Tensor(c!)?[] bn_weights, Tensor(d!)?[] bn_biases, Tensor(e!)?[] running_means, Tensor(f!)?[] running_vars, "
    "float[] momenta, bool batch_norm, bool use_batch_stats, float eps, float dropout_p, Tensor seed_offset, "
    "float label_smoothing, int optimizer, Tensor group_hyperparameters, int[] param_groups, Tensor(g!)[] steps, "
    "Tensor(h!)[] first_moments, Tensor(i!)[] second_moments, Tensor(j!)[] max_second_moments, "
    "Tensor(k!)[] grads) -> Tensor",
}

if BACKEND == "reference":
    # The reference maths as the ops' kernels, on the keys the extension registers.
    _LIBRARY = torch.library.Library("fused_mlp", "DEF")
    for _name, _schema in SCHEMAS.items():
        tags = (torch.Tag.nondeterministic_seeded,) if _name == "philox_seed_offset" else ()
        _LIBRARY.define(_schema, tags=tags)
        for _key in ("CPU", "CUDA"):
            _LIBRARY.impl(_name, getattr(reference, _name), _key)

_fused = torch.ops.fused_mlp


def cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing):
    """(rows, classes) logits -> (loss, logsumexp); loss has shape (rows,) for reduction 0
    (none) and () for 1 (mean) and 2 (sum)."""
    return _fused.cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing)


def cross_entropy_backward(grad_loss, input, target, weight, logsumexp, reduction, ignore_index, label_smoothing):
    """The gradient of cross_entropy_forward's loss with respect to its input."""
    return _fused.cross_entropy_backward(
        grad_loss, input, target, weight, logsumexp, reduction, ignore_index, label_smoothing
    )


def linear_bn_relu_forward(
    input, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, dropout_p, seed_offset
):
    """-> (out, pre_bn, mean, invstd, batch_var); see csrc/ops.cpp."""
    return _fused.linear_bn_relu_forward(
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, dropout_p, seed_offset
    )


def linear_bn_relu_backward(
    grad_out,
    input,
    weight,
    bias,
    bn_weight,
    bn_bias,
    saved,
    mean,
    invstd,
    use_batch_stats,
    dropout_p,
    seed_offset,
    need_grad_input=True,
):
    """-> (grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias); grad_input is empty
    (its GEMM skipped) without need_grad_input."""
    return _fused.linear_bn_relu_backward(
        grad_out,
        input,
        weight,
        bias,
        bn_weight,
        bn_bias,
        saved,
        mean,
        invstd,
        use_batch_stats,
        dropout_p,
        seed_offset,
        need_grad_input,
    )


def bn_batch_stats(pre_bn, eps):
    """-> (mean, invstd, batch_var) of pre_bn's columns: the forward's statistics stage."""
    return _fused.bn_batch_stats(pre_bn, eps)


def bn_relu_dropout(pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset):
    """relu(bn_weight * (pre_bn - mean) * invstd + bn_bias) * dropout: the forward's epilogue stage."""
    return _fused.bn_relu_dropout(pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset)


def bn_backward_sums(grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset):
    """-> (sum_dy, sum_dy_zhat) over pre_bn's rows: the backward's first stage (batch statistics)."""
    return _fused.bn_backward_sums(grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset)


def bn_backward_finish(*args):
    """-> linear_bn_relu_backward's gradients from sums over `count` rows: the second stage."""
    return _fused.bn_backward_finish(*args)


def bn_update_running_stats_(running_mean, running_var, batch_mean, batch_var, factor):
    """running = (1 - factor) * running + factor * batch, in place."""
    _fused.bn_update_running_stats_(running_mean, running_var, batch_mean, batch_var, factor)


def linear_relu_dropout_forward(input, weight, bias, dropout_p, seed_offset):
    """relu(input @ weight.T + bias) * dropout: inference with BN folded in."""
    return _fused.linear_relu_dropout_forward(input, weight, bias, dropout_p, seed_offset)


def philox_seed_offset(like, generator=None):
    """A fresh (seed, offset) for one dropout mask, drawn on like's device from generator
    (default: the device's default generator); the extension has it for CUDA tensors only, where
    the device writes it, so that a CUDA graph replays it with new values."""
    return _fused.philox_seed_offset(like, generator)


def mlp_forward(*args):
    """-> (out, hidden, pre_bn, mean, invstd, batch_var); see csrc/ops.cpp."""
    return _fused.mlp_forward(*args)


def mlp_backward(*args):
    """-> (grad_input, grad_weights, grad_biases, grad_bn_weights, grad_bn_biases); see csrc/ops.cpp."""
    return _fused.mlp_backward(*args)


def mlp_inference(input, weights, biases):
    """The network on folded weights: relu(x W^T + b) per hidden layer, then the output Linear."""
    return _fused.mlp_inference(input, weights, biases)


def mlp_update_running_stats_(running_means, running_vars, batch_means, batch_vars, factors):
    """bn_update_running_stats_ for every hidden layer, each with its own factor."""
    _fused.mlp_update_running_stats_(running_means, running_vars, batch_means, batch_vars, factors)


# The fakes: shapes and dtypes only, for torch.compile and FakeTensor; a dynamic batch size is fine.


@torch.library.register_fake("fused_mlp::cross_entropy_forward")
def _cross_entropy_forward_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    torch._check(input.dim() == 2, lambda: "cross_entropy_forward: input must be 2-D")
    rows = input.shape[0]
    loss = input.new_empty((rows,) if reduction == reference.REDUCTION_NONE else ())
    return loss, input.new_empty((rows,), dtype=torch.float64)


@torch.library.register_fake("fused_mlp::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_loss, input, target, weight, logsumexp, reduction, ignore_index, label_smoothing):
    torch._check(input.dim() == 2, lambda: "cross_entropy_backward: input must be 2-D")
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("fused_mlp::linear_relu_dropout_forward")
def _linear_relu_dropout_forward_fake(input, weight, bias, dropout_p, seed_offset):
    return input.new_empty((input.shape[0], weight.shape[0]))


@torch.library.register_fake("fused_mlp::linear_bn_relu_forward")
def _linear_bn_relu_forward_fake(
    input, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, dropout_p, seed_offset
):
    torch._check(input.dim() == 2, lambda: "linear_bn_relu_forward: input must be 2-D")
    rows, features = input.shape[0], weight.shape[0]
    out = input.new_empty((rows, features))
    pre_bn = input.new_empty((rows, features) if use_batch_stats else (0,))
    stat = lambda: input.new_empty((features,), dtype=reference._acc_dtype(input.dtype))  # noqa: E731
    return out, pre_bn, stat(), stat(), stat()


@torch.library.register_fake("fused_mlp::linear_bn_relu_backward")
def _linear_bn_relu_backward_fake(
    grad_out,
    input,
    weight,
    bias,
    bn_weight,
    bn_bias,
    saved,
    mean,
    invstd,
    use_batch_stats,
    dropout_p,
    seed_offset,
    need_grad_input=True,
):
    features = weight.shape[0]

    def param(t):
        return input.new_empty((features,), dtype=reference._acc_dtype(input.dtype) if t is None else t.dtype)

    grad_input = (
        torch.empty_like(input, memory_format=torch.contiguous_format) if need_grad_input else input.new_empty((0,))
    )
    return (
        grad_input,
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        input.new_empty((features,)),
        param(bn_weight),
        param(bn_bias),
    )


@torch.library.register_fake("fused_mlp::bn_batch_stats")
def _bn_batch_stats_fake(pre_bn, eps):
    torch._check(pre_bn.dim() == 2, lambda: "bn_batch_stats: pre_bn must be 2-D")
    stat = pre_bn.new_empty((pre_bn.shape[1],), dtype=reference._acc_dtype(pre_bn.dtype))
    return stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.register_fake("fused_mlp::bn_relu_dropout")
def _bn_relu_dropout_fake(pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset):
    torch._check(pre_bn.dim() == 2, lambda: "bn_relu_dropout: pre_bn must be 2-D")
    return torch.empty_like(pre_bn, memory_format=torch.contiguous_format)


@torch.library.register_fake("fused_mlp::bn_backward_sums")
def _bn_backward_sums_fake(grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset):
    torch._check(pre_bn.dim() == 2, lambda: "bn_backward_sums: pre_bn must be 2-D")
    stat = pre_bn.new_empty((pre_bn.shape[1],), dtype=reference._acc_dtype(pre_bn.dtype))
    return stat, torch.empty_like(stat)


@torch.library.register_fake("fused_mlp::bn_backward_finish")
def _bn_backward_finish_fake(
    grad_out,
    input,
    weight,
    pre_bn,
    mean,
    invstd,
    bn_weight,
    bn_bias,
    sum_dy,
    sum_dy_zhat,
    count,
    dropout_p,
    seed_offset,
    need_grad_input=True,
):
    return _linear_bn_relu_backward_fake(
        grad_out,
        input,
        weight,
        None,
        bn_weight,
        bn_bias,
        pre_bn,
        mean,
        invstd,
        True,
        dropout_p,
        seed_offset,
        need_grad_input,
    )


@torch.library.register_fake("fused_mlp::bn_update_running_stats_")
def _bn_update_running_stats_fake(running_mean, running_var, batch_mean, batch_var, factor):
    return None


@torch.library.register_fake("fused_mlp::philox4x32_10")
def _philox4x32_10_fake(counter, key):
    return torch.empty_like(counter)


@torch.library.register_fake("fused_mlp::philox_seed_offset")
def _philox_seed_offset_fake(like, generator=None):
    return like.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("fused_mlp::dropout_mask")
def _dropout_mask_fake(seed_offset, numel, p, start=0):
    return seed_offset.new_empty((numel,), dtype=torch.bool)


@torch.library.register_fake("fused_mlp::mlp_forward")
def _mlp_forward_fake(
    input,
    weights,
    biases,
    bn_weights,
    bn_biases,
    running_means,
    running_vars,
    batch_norm,
    use_batch_stats,
    eps,
    dropout_p,
    seed_offset,
):
    torch._check(input.dim() == 2, lambda: "mlp_forward: input must be 2-D")
    rows, acc = input.shape[0], reference._acc_dtype(input.dtype)
    hidden = [input.new_empty((rows, w.shape[0])) for w in weights[:-1]]
    if not batch_norm:
        return input.new_empty((rows, weights[-1].shape[0])), hidden, [], [], [], []
    pre_bn = [input.new_empty((rows, w.shape[0]) if use_batch_stats else (0,)) for w in weights[:-1]]
    stats = [[input.new_empty((w.shape[0],), dtype=acc) for w in weights[:-1]] for _ in range(3)]
    return input.new_empty((rows, weights[-1].shape[0])), hidden, pre_bn, *stats


@torch.library.register_fake("fused_mlp::mlp_backward")
def _mlp_backward_fake(
    grad_out,
    input,
    weights,
    biases,
    bn_weights,
    bn_biases,
    hidden,
    pre_bn,
    mean,
    invstd,
    batch_norm,
    use_batch_stats,
    dropout_p,
    seed_offset,
    need_grad_input,
    need_layer_grads,
):
    none = lambda: input.new_empty((0,))  # noqa: E731

    def grad(t, need):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else none()

    layers = len(weights) - 1
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if need_grad_input else none()
    grad_weights = [grad(w, n) for w, n in zip(weights, need_layer_grads)]
    grad_biases = [grad(b, n) for b, n in zip(biases, need_layer_grads)]
    count = layers if batch_norm else 0
    grad_bn_weights = [grad(reference._entry(bn_weights, i), need_layer_grads[i]) for i in range(count)]
    grad_bn_biases = [grad(reference._entry(bn_biases, i), need_layer_grads[i]) for i in range(count)]
    return grad_input, grad_weights, grad_biases, grad_bn_weights, grad_bn_biases


@torch.library.register_fake("fused_mlp::mlp_inference")
def _mlp_inference_fake(input, weights, biases):
    torch._check(input.dim() == 2, lambda: "mlp_inference: input must be 2-D")
    return input.new_empty((input.shape[0], weights[-1].shape[0]))


def mlp_train_step(*args):
    """One whole training step in place (csrc/mlp_train_step.h); returns the loss. fused_mlp.step.TrainStep
    builds the arguments."""
    return _fused.mlp_train_step(*args)


@torch.library.register_fake("fused_mlp::mlp_train_step")
def _mlp_train_step_fake(input, *_):
    return input.new_empty(())


@torch.library.register_fake("fused_mlp::mlp_update_running_stats_")
def _mlp_update_running_stats_fake(running_means, running_vars, batch_means, batch_vars, factors):
    return None
