"""Argument checks shared by the public functions (fused_mlp.functional) and the modules
(fused_mlp.nn): each names the argument at fault and what it expected."""

import torch

__all__ = [
    "REDUCTIONS",
    "batch_statistics_rows",
    "class_index_target",
    "cross_entropy_args",
    "dropout_probability",
    "linear_bn_relu_args",
    "network_input",
]

#: Reduction names and the ops' codes for them (the values of at::Reduction).
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing):
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(
            "cross_entropy: input must be a floating-point tensor of logits, got "
            f"{input.dtype if isinstance(input, torch.Tensor) else type(input).__name__}"
        )
    if input.dim() == 0:
        raise ValueError("cross_entropy: input must have shape (C), (N, C) or (N, C, d1, ...), got a scalar")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"cross_entropy: target must be a tensor, got {type(target).__name__}")
    if reduction not in REDUCTIONS:
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
        if ignore_index != -100:
            raise ValueError(
                f"cross_entropy: ignore_index ({ignore_index}) applies to class-index targets only, not to "
                "probability targets (as in F.cross_entropy)"
            )
        if target.shape != input.shape:
            raise ValueError(
                "cross_entropy: a probability target must have the input's shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
    else:
        class_index_target(target, input.shape)
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
        if not target.is_floating_point() and weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "cross_entropy: the loss is not differentiable with respect to weight for class-index targets "
                "(as in F.cross_entropy), so weight cannot require grad; pass weight.detach()"
            )


def class_index_target(target, input_shape):
    """A class-index target for logits of input_shape: int64 or uint8, of the input's shape without
    the class dim (dim 1; a 1-D input is one sample). Its values are checked by the op."""
    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(
            "cross_entropy: target must hold class indices as int64 (or uint8), "
            f"or class probabilities as floats; got {target.dtype}"
        )
    expected = input_shape[:1] + input_shape[2:] if len(input_shape) >= 2 else torch.Size([])
    if target.shape != expected:
        raise ValueError(
            f"cross_entropy: a class-index target for input of shape "
            f"{tuple(input_shape)} must have shape {tuple(expected)}, got "
            f"{tuple(target.shape)}"
        )


def linear_bn_relu_args(
    input, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, dropout, synchronized=False
):
    """synchronized: the batch statistics merge several processes' rows, so one process may hold a
    single row (or none); the global count is checked when the processes exchange it."""
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
    dropout_probability(dropout, name)
    if training and not synchronized:
        batch_statistics_rows(input)


def batch_statistics_rows(input):
    """BatchNorm's batch statistics need more than one row, as nn.BatchNorm1d says."""
    if input.shape[0] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")


def dropout_probability(p, name):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: dropout must be a probability in [0, 1), got {p!r}")


def network_input(input, weight, name):
    """The input of a whole network: a floating-point (batch, in_features) tensor on the first
    weight's device, of its dtype (autocast aside)."""
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(f"{name}: input must be a floating-point tensor")
    if input.dim() != 2:
        raise ValueError(f"{name}: input must have shape (batch, in_features), got {tuple(input.shape)}")
    if input.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: input has {input.shape[1]} features but the network expects {weight.shape[1]}")
    if input.device != weight.device:
        raise ValueError(f"{name}: input is on {input.device} but the parameters are on {weight.device}")
    if input.dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type):
        raise TypeError(f"{name}: input dtype {input.dtype} does not match the parameters' dtype {weight.dtype}")
