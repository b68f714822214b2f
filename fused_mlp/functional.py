"""The fused ops as functions, with hand-written backward passes (autograd.Functions).

Each autograd.Function calls only the ops of ``fused_mlp.ops`` in its forward and its backward,
so torch.compile traces it whole; none supports double backward.
"""

import torch
from torch.autograd.function import once_differentiable

from . import ops

__all__ = ["cross_entropy", "fold_batch_norm", "linear_bn_relu"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


class _CrossEntropy(torch.autograd.Function):
    """Cross-entropy over the rows of a 2-D input. Saved for backward: the logits the caller
    already holds, the target, and one logsumexp per row; never the log-probabilities."""

    # forward(ctx, ...) rather than forward + setup_context: the latter makes every apply() bind
    # the arguments with inspect.signature, which costs more than the whole op at small sizes.
    @staticmethod
    def forward(ctx, input, target, weight, reduction, ignore_index, label_smoothing):
        loss, logsumexp = ops.cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing)
        ctx.save_for_backward(input, target, weight, logsumexp)
        ctx.mark_non_differentiable(logsumexp)
        ctx.options = (reduction, ignore_index, label_smoothing)
        return loss, logsumexp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_logsumexp):
        input, target, weight, logsumexp = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = ops.cross_entropy_backward(grad_loss, input, target, weight, logsumexp, *ctx.options)
        return grad_input, None, None, None, None, None


def _check_cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing):
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(
            "cross_entropy: input must be a floating-point tensor of logits, got "
            f"{input.dtype if isinstance(input, torch.Tensor) else type(input).__name__}"
        )
    if input.dim() == 0:
        raise ValueError("cross_entropy: input must have shape (C), (N, C) or (N, C, d1, ...), got a scalar")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"cross_entropy: target must be a tensor, got {type(target).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float))
        or not 0.0 <= label_smoothing <= 1.0
    ):
        raise ValueError(f"cross_entropy: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    if target.device != input.device:
        raise ValueError(f"cross_entropy: target is on {target.device} but input is on {input.device}")
    classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                "cross_entropy: a probability target must have the input's shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
    else:
        if target.dtype not in (torch.int64, torch.uint8):
            raise TypeError(
                "cross_entropy: target must hold class indices as int64 (or uint8), "
                f"or class probabilities as floats; got {target.dtype}"
            )
        expected = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])
        if target.shape != expected:
            raise ValueError(
                f"cross_entropy: a class-index target for input of shape "
                f"{tuple(input.shape)} must have shape {tuple(expected)}, got "
                f"{tuple(target.shape)}"
            )
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError("cross_entropy: weight must be a floating-point tensor or None")
        if weight.shape != (classes,):
            raise ValueError(
                f"cross_entropy: weight must have one entry per class, shape ({classes},), got {tuple(weight.shape)}"
            )
        if weight.device != input.device:
            raise ValueError(f"cross_entropy: weight is on {weight.device} but input is on {input.device}")
        if not target.is_floating_point() and weight.dtype != input.dtype:
            raise TypeError(f"cross_entropy: weight must have the input's dtype {input.dtype}, got {weight.dtype}")


def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Log-softmax + negative log-likelihood in one fused op: ``F.cross_entropy`` with the same
    arguments and results.

    input: logits of shape (C), (N, C) or (N, C, d1, ..., dk), classes along dim 1 (dim 0 for 1-D).
    target: class indices (int64 or uint8) of the input's shape without the class dim, or class
    probabilities of the input's shape.
    weight: optional per-class weights, shape (C).
    ignore_index: class-index targets equal to it add no loss and no gradient.
    reduction: "none" (one loss per target), "mean" (divided by the summed weight of the counted
    targets, or by the number of rows for probability targets) or "sum".
    label_smoothing: in [0, 1]; mixes the target with the uniform distribution.

    The softmax is computed with max-subtraction, so logits of any magnitude are safe, and only one
    logsumexp per row is kept for the backward pass. Double backward is not supported.
    """
    _check_cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing)
    prob_target = target.is_floating_point()
    if prob_target:
        if target.requires_grad:
            raise NotImplementedError(
                "cross_entropy: gradients with respect to a probability target are not supported; pass target.detach()"
            )
        dtype = torch.promote_types(input.dtype, target.dtype)
        input, target = input.to(dtype), target.to(dtype)
        if weight is not None:
            weight = weight.to(dtype)
    elif target.dtype == torch.uint8:
        target = target.long()

    if input.dim() == 1:  # a single sample
        rows_input, rows_target = input.unsqueeze(0), target.unsqueeze(0)
        out_shape = torch.Size([])
    elif input.dim() == 2:
        rows_input, rows_target = input, target
        out_shape = input.shape[:1]
    else:  # (N, C, d1, ...): one row per position, classes last
        classes = input.shape[1]
        rows_input = input.movedim(1, -1).reshape(-1, classes)
        rows_target = target.movedim(1, -1).reshape(-1, classes) if prob_target else target.reshape(-1)
        out_shape = input.shape[:1] + input.shape[2:]

    loss, _ = _CrossEntropy.apply(
        rows_input, rows_target, weight, _REDUCTIONS[reduction], ignore_index, float(label_smoothing)
    )
    if reduction == "none":
        loss = loss.reshape(out_shape)
    return loss


# --- Linear -> BatchNorm1d -> ReLU -> Dropout --------------------------------------------------------

# (seed, offset) when no dropout is applied; never written.
_NO_DROPOUT_SEED = torch.zeros(2, dtype=torch.int64)


def _dropout_seed_offset(dropout, generator, like):
    """The (seed, offset) of one dropout mask for the tensor `like`, drawn from `generator`
    (default: the default generator of like's device), so torch.manual_seed reproduces it; nothing
    is drawn without dropout. For CUDA tensors the device writes them from the CUDA generator's
    Philox state, as PyTorch's own dropout does, so they stay correct under CUDA-graph capture."""
    if dropout <= 0:
        return _NO_DROPOUT_SEED
    if like.device.type == "cuda" and ops.BACKEND == "extension":
        return ops.philox_seed_offset(like, generator)
    device = generator.device if generator is not None else like.device
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=generator, device=device)


class _LinearBNReLU(torch.autograd.Function):
    """Saved for backward: the input, the parameters, and with batch statistics the pre-BN
    activation, the mean and invstd, and the dropout's (seed, offset); the mask is regenerated,
    never stored. With running statistics the output is saved instead of the pre-BN activation
    (the next layer keeps it anyway): its zeros are exactly the units ReLU or dropout cut."""

    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        use_batch_stats,
        eps,
        dropout_p,
        seed_offset,
    ):
        out, pre_bn, mean, invstd, batch_var = ops.linear_bn_relu_forward(
            input,
            weight,
            bias,
            bn_weight,
            bn_bias,
            running_mean,
            running_var,
            use_batch_stats,
            eps,
            dropout_p,
            seed_offset,
        )
        saved = pre_bn if use_batch_stats else out
        ctx.save_for_backward(input, weight, bias, bn_weight, bn_bias, saved, mean, invstd, seed_offset)
        ctx.options = (use_batch_stats, dropout_p)
        ctx.mark_non_differentiable(mean, batch_var)
        return out, mean, batch_var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        input, weight, bias, bn_weight, bn_bias, saved, mean, invstd, seed_offset = ctx.saved_tensors
        use_batch_stats, dropout_p = ctx.options
        need = ctx.needs_input_grad
        # A first layer's input needs no gradient: its GEMM, the largest of the backward, is skipped.
        grads = ops.linear_bn_relu_backward(
            grad_out.contiguous(),
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
            need[0],
        )
        grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias = grads
        return (
            grad_input if need[0] else None,
            grad_weight if need[1] else None,
            grad_bias if need[2] else None,
            grad_bn_weight if need[3] else None,
            grad_bn_bias if need[4] else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _check_linear_bn_relu_args(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, dropout):
    name = "linear_bn_relu"
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(f"{name}: input must be a floating-point tensor")
    if input.dim() != 2:
        raise ValueError(f"{name}: input must have shape (batch, in_features), got {tuple(input.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if input.shape[1] != in_features:
        raise ValueError(f"{name}: input has {input.shape[1]} features but the layer expects in_features={in_features}")
    for arg, t in (
        ("weight", weight),
        ("bias", bias),
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None and t.device != input.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but input is on {input.device}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{name}: input dtype {input.dtype} does not match the Linear weight dtype {weight.dtype}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != input.dtype):
        raise ValueError(
            f"{name}: bias must have shape ({out_features},) and dtype {input.dtype}, got "
            f"{tuple(bias.shape)} {bias.dtype}"
        )
    for arg, t in (
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None and t.shape != (out_features,):
            raise ValueError(f"{name}: {arg} must have shape ({out_features},), got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError(f"{name}: running_mean and running_var are required when training=False")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be a probability in [0, 1), got {dropout!r}")
    if training and input.shape[0] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")


def linear_bn_relu(
    input,
    weight,
    bias=None,
    *,
    bn_weight=None,
    bn_bias=None,
    running_mean=None,
    running_var=None,
    training=True,
    momentum=0.1,
    eps=1e-5,
    dropout=0.0,
    generator=None,
):
    """``dropout(relu(batch_norm(linear(input))))`` in one fused op.

    training: normalize with the batch's statistics and, when running statistics are given,
    update them in place with ``momentum`` (as ``F.batch_norm(training=True)``); otherwise
    normalize with ``running_mean`` / ``running_var`` (required then), BN folded into the GEMM.
    dropout: the probability of zeroing each output (applied whenever > 0, as
    ``F.dropout(training=True)``); survivors are scaled by 1 / (1 - dropout). The mask comes from
    Philox4x32-10 seeded from ``generator`` (default: the default generator of the input's
    device), so ``torch.manual_seed`` reproduces it.

    Under ``torch.autocast`` the Linear runs in the autocast dtype and BatchNorm keeps its
    parameters' dtype, as the stock modules behave.
    """
    _check_linear_bn_relu_args(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, dropout)
    return _linear_bn_relu(
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, dropout, generator
    )


def _linear_bn_relu(
    input, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, dropout, generator=None
):
    """linear_bn_relu on arguments already checked (LinearBNReLU checks them before it touches
    its state)."""
    if torch.is_autocast_enabled(input.device.type):
        dtype = torch.get_autocast_dtype(input.device.type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    seed_offset = _dropout_seed_offset(dropout, generator, input)
    out, mean, batch_var = _LinearBNReLU.apply(
        input,
        weight,
        bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        bool(training),
        float(eps),
        float(dropout),
        seed_offset,
    )
    if training and running_mean is not None:
        with torch.no_grad():
            ops.bn_update_running_stats_(running_mean, running_var, mean, batch_var, float(momentum))
    return out


def fold_batch_norm(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    """(W', b') with x W'^T + b' == batch_norm(x W^T + b) under the running statistics:
    W' = W * A per output row, b' = b * A + (beta - mean * A), A = gamma / sqrt(var + eps).
    Computed in float32 (float64 for float64 weights) and returned in the weight's dtype."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    a = (running_var.to(acc) + eps).rsqrt()
    if bn_weight is not None:
        a = bn_weight.to(acc) * a
    shift = -running_mean.to(acc) * a
    if bn_bias is not None:
        shift = bn_bias.to(acc) + shift
    folded_bias = shift if bias is None else bias.to(acc) * a + shift
    return (weight.to(acc) * a[:, None]).to(weight.dtype), folded_bias.to(weight.dtype)


def folded_linear_relu_dropout(input, weight, bias, *, dropout=0.0, generator=None):
    """Inference (no autograd) of the layer with BatchNorm already folded into weight and bias
    (fold_batch_norm): one GEMM, then ReLU and dropout in place on its output."""
    if torch.is_autocast_enabled(input.device.type):
        dtype = torch.get_autocast_dtype(input.device.type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return ops.linear_relu_dropout_forward(
        input, weight, bias, float(dropout), _dropout_seed_offset(dropout, generator, input)
    )
