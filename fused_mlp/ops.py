"""Thin wrappers over the ``torch.ops.fused_mlp`` ops, and their fake (meta) implementations.

Every function here takes and returns exactly what the op of the same name does (schemas in
csrc/ops.cpp). When the extension is not loaded, the same-named function of
``fused_mlp.reference`` runs instead.
"""

import torch

from . import _extension, reference

#: "extension" (the compiled kernels) or "reference" (plain PyTorch), fixed at import.
BACKEND = _extension.load()
# Where the ops come from: chosen once, so each wrapper below is a single call.
_impl = reference if BACKEND == "reference" else torch.ops.fused_mlp


def cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing):
    """(rows, classes) logits -> (loss, logsumexp); loss has shape (rows,) for reduction 0
    (none) and () for 1 (mean) and 2 (sum)."""
    return _impl.cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing)


def cross_entropy_backward(grad_loss, input, target, weight, logsumexp, reduction, ignore_index, label_smoothing):
    """The gradient of cross_entropy_forward's loss with respect to its input."""
    return _impl.cross_entropy_backward(
        grad_loss, input, target, weight, logsumexp, reduction, ignore_index, label_smoothing
    )


def linear_bn_relu_forward(
    input, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, dropout_p, seed_offset
):
    """-> (out, pre_bn, mean, invstd, batch_var); see csrc/ops.cpp."""
    return _impl.linear_bn_relu_forward(
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
    return _impl.linear_bn_relu_backward(
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
    return _impl.bn_batch_stats(pre_bn, eps)


def bn_relu_dropout(pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset):
    """relu(bn_weight * (pre_bn - mean) * invstd + bn_bias) * dropout: the forward's epilogue stage."""
    return _impl.bn_relu_dropout(pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset)


def bn_update_running_stats_(running_mean, running_var, batch_mean, batch_var, factor):
    """running = (1 - factor) * running + factor * batch, in place."""
    _impl.bn_update_running_stats_(running_mean, running_var, batch_mean, batch_var, factor)


def linear_relu_dropout_forward(input, weight, bias, dropout_p, seed_offset):
    """relu(input @ weight.T + bias) * dropout, no autograd: inference with BN folded in."""
    return _impl.linear_relu_dropout_forward(input, weight, bias, dropout_p, seed_offset)


def philox_seed_offset(like, generator=None):
    """A fresh (seed, offset) for one dropout mask, written on like's CUDA device from generator
    (default: the device's default generator); the compiled extension's CUDA kernels only."""
    return torch.ops.fused_mlp.philox_seed_offset(like, generator)


if BACKEND == "extension":

    @torch.library.register_fake("fused_mlp::cross_entropy_forward")
    def _cross_entropy_forward_fake(input, target, weight, reduction, ignore_index, label_smoothing):
        torch._check(input.dim() == 2, lambda: "cross_entropy_forward: input must be 2-D")
        rows = input.shape[0]
        loss = input.new_empty((rows,) if reduction == reference.REDUCTION_NONE else ())
        return loss, input.new_empty((rows,), dtype=torch.float64)

    @torch.library.register_fake("fused_mlp::cross_entropy_backward")
    def _cross_entropy_backward_fake(
        grad_loss, input, target, weight, logsumexp, reduction, ignore_index, label_smoothing
    ):
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
