"""The fused ops as functions, with hand-written backward passes (autograd.Functions).

Each autograd.Function calls only the ops of ``fused_mlp.ops`` in its forward and its backward,
so torch.compile traces it whole; none supports double backward.
"""

import torch
from torch.autograd.function import once_differentiable

from . import ops

__all__ = ["cross_entropy"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


class _CrossEntropy(torch.autograd.Function):
    """Cross-entropy over the rows of a 2-D input. Saved for backward: the logits the caller
    already holds, the target, and one logsumexp per row; never the log-probabilities."""

    # forward(ctx, ...) rather than forward + setup_context: the latter makes every apply() bind
    # the arguments with inspect.signature, which costs more than the whole op at small sizes.
    @staticmethod
    def forward(ctx, input, target, weight, reduction, ignore_index, label_smoothing):
        loss, logsumexp = ops.cross_entropy_forward(input, target, weight, reduction, ignore_index,
                                                    label_smoothing)
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
            grad_input = ops.cross_entropy_backward(grad_loss, input, target, weight, logsumexp,
                                                    *ctx.options)
        return grad_input, None, None, None, None, None


def _check_cross_entropy_args(input, target, weight, ignore_index, reduction, label_smoothing):
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError("cross_entropy: input must be a floating-point tensor of logits, got "
                        f"{input.dtype if isinstance(input, torch.Tensor) else type(input).__name__}")
    if input.dim() == 0:
        raise ValueError("cross_entropy: input must have shape (C), (N, C) or (N, C, d1, ...), "
                         "got a scalar")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"cross_entropy: target must be a tensor, got {type(target).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    if target.device != input.device:
        raise ValueError(f"cross_entropy: target is on {target.device} but input is on {input.device}")
    classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError("cross_entropy: a probability target must have the input's shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
    else:
        if target.dtype not in (torch.int64, torch.uint8):
            raise TypeError("cross_entropy: target must hold class indices as int64 (or uint8), "
                            f"or class probabilities as floats; got {target.dtype}")
        expected = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])
        if target.shape != expected:
            raise ValueError(f"cross_entropy: a class-index target for input of shape "
                             f"{tuple(input.shape)} must have shape {tuple(expected)}, got "
                             f"{tuple(target.shape)}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError("cross_entropy: weight must be a floating-point tensor or None")
        if weight.shape != (classes,):
            raise ValueError(f"cross_entropy: weight must have one entry per class, shape "
                             f"({classes},), got {tuple(weight.shape)}")
        if weight.device != input.device:
            raise ValueError(f"cross_entropy: weight is on {weight.device} but input is on {input.device}")
        if not target.is_floating_point() and weight.dtype != input.dtype:
            raise TypeError(f"cross_entropy: weight must have the input's dtype {input.dtype}, "
                            f"got {weight.dtype}")


def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0):
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
            raise NotImplementedError("cross_entropy: gradients with respect to a probability "
                                      "target are not supported; pass target.detach()")
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
        rows_target = (target.movedim(1, -1).reshape(-1, classes) if prob_target
                       else target.reshape(-1))
        out_shape = input.shape[:1] + input.shape[2:]

    loss, _ = _CrossEntropy.apply(rows_input, rows_target, weight, _REDUCTIONS[reduction],
                                  ignore_index, float(label_smoothing))
    if reduction == "none":
        loss = loss.reshape(out_shape)
    return loss
