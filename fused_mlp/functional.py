"""The fused ops as functions: argument handling, then the ops with their autograd
(fused_mlp.autograd), so each is differentiable to any order and works under torch.func and
torch.compile.
"""

import torch

from . import autograd, checks, ops

__all__ = [
    "cross_entropy",
    "autocast_linears",
    "dropout_seed_offset",
    "fold_batch_norm",
    "folded_linear_relu_dropout",
    "linear_bn_relu",
    "mlp_checked",
    "mlp_inference",
]


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
    logsumexp per row is kept for the backward pass. Differentiable with respect to the input, a
    probability target and (with probability targets) the weight, to any order.
    """
    checks.cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing)
    prob_target = target.is_floating_point()
    if prob_target:
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

    loss, _ = autograd.CROSS_ENTROPY(
        rows_input, rows_target, weight, checks.REDUCTIONS[reduction], ignore_index, float(label_smoothing)
    )
    if reduction == "none":
        loss = loss.reshape(out_shape)
    return loss


# --- Linear -> BatchNorm1d -> ReLU -> Dropout --------------------------------------------------------


def autocast_linears(input, weights, biases):
    """(input, weights, biases) in the autocast dtype of input's device when autocast is on there,
    as the stock Linear's GEMM runs; unchanged otherwise. BatchNorm's tensors keep their dtype."""
    if not torch.is_autocast_enabled(input.device.type):
        return input, weights, biases
    dtype = torch.get_autocast_dtype(input.device.type)
    return input.to(dtype), [w.to(dtype) for w in weights], [None if b is None else b.to(dtype) for b in biases]


# (seed, offset) when no dropout is applied; never written.
_NO_DROPOUT_SEED = torch.zeros(2, dtype=torch.int64)


def dropout_seed_offset(dropout, generator, like):
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
    checks.linear_bn_relu_args(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, dropout)
    return linear_bn_relu_checked(
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, dropout, generator
    )


def linear_bn_relu_checked(
    input, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, dropout, generator=None
):
    """linear_bn_relu, positional, on arguments checks.linear_bn_relu_args has accepted (the module
    checks them before it touches its state)."""
    if training and running_mean is not None and autograd.transforms_active():
        raise RuntimeError(RUNNING_STATS_UNDER_TRANSFORM)
    input, (weight,), (bias,) = autocast_linears(input, (weight,), (bias,))
    seed_offset = dropout_seed_offset(dropout, generator, input)
    out, _, mean, _, batch_var = autograd.LINEAR_BN_RELU(
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


#: What a running-statistics update under a torch.func transform raises, as nn.BatchNorm1d does,
#: with the fix named.
RUNNING_STATS_UNDER_TRANSFORM = (
    "linear_bn_relu: the running statistics cannot be updated in place under a torch.func transform "
    "(under vmap each sample even has its own batch statistics). Turn the update off as for "
    "nn.BatchNorm1d: torch.func.replace_all_batch_norm_modules_(model), or track_running_stats=False, "
    "or pass running_mean=running_var=None"
)


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
    """Inference of the layer with BatchNorm already folded into weight and bias
    (fold_batch_norm): one GEMM, then ReLU and dropout in place on its output."""
    input, (weight,), (bias,) = autocast_linears(input, (weight,), (bias,))
    return autograd.LINEAR_RELU_DROPOUT(
        input, weight, bias, float(dropout), dropout_seed_offset(dropout, generator, input)
    )


# --- the whole MLP -------------------------------------------------------------------------------


def mlp_checked(
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
    dropout,
    generator=None,
):
    """The whole MLP in one op per pass (fused_mlp.nn.FusedMLP's forward), on arguments the module
    has checked: hidden layers Linear -> BatchNorm1d -> ReLU -> Dropout (or Linear -> ReLU ->
    Dropout without batch_norm), then the output Linear. weights and biases: one per Linear, the
    output layer's last; the BatchNorm lists one entry per hidden layer (None for an absent
    parameter; running statistics only to normalize with them, use_batch_stats=False), empty
    without BatchNorm. Hidden layer i drops out with (seed, offset + i) of one draw from generator.

    Returns (logits, mean, batch_var): with batch statistics, each layer's batch mean and unbiased
    variance, for the caller's running-statistics update (ops.mlp_update_running_stats_).
    Under torch.autocast the Linears run in the autocast dtype, BatchNorm in its parameters' dtype.
    """
    input, weights, biases = autocast_linears(input, weights, biases)
    seed_offset = dropout_seed_offset(dropout, generator, input)
    layers = len(weights) - 1
    config = autograd.MLPConfig(layers, batch_norm, use_batch_stats, float(eps), float(dropout), len(bn_weights))
    tensors = (*weights, *biases, *bn_weights, *bn_biases, *running_means, *running_vars, seed_offset)
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (input.requires_grad or any(t is not None and t.requires_grad for t in tensors))
    ):
        outputs = autograd.MLP.apply(config, input, *tensors)
        statistics = outputs[1:]
        return outputs[0], statistics[: len(statistics) // 2], statistics[len(statistics) // 2 :]
    with torch._C._AutoDispatchBelowAutograd():  # nothing to record: skip the autograd kernel
        logits, _, _, mean, _, batch_var = ops.mlp_forward(*config.forward_args(input, tensors))
    return logits, mean, batch_var


def mlp_inference(input, weights, biases):
    """The network on weights with BatchNorm folded in (fold_batch_norm per layer): one GEMM per
    layer, with the hidden layers' ReLU in its epilogue or in place on its output. No autograd."""
    input, weights, biases = autocast_linears(input, weights, biases)
    with torch._C._AutoDispatchBelowAutograd():
        return ops.mlp_inference(input, weights, biases)
