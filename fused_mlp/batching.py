"""vmap rules for the ops (torch.library.register_vmap), for both backends.

Cross-entropy folds the vmapped dimension into the rows: one call of the fused kernel over
(batch * rows, classes) with reduction "none", then each sample's own reduction. That is what
per-sample gradients run through (``vmap(grad(...))``).

The layer's ops run their reference maths, which take leading batch dimensions, on the batched
tensors: stock batched PyTorch ops (one GEMM per call for a shared weight), no per-sample loop.
With batch statistics that is also what vmap means: each sample is an independent batch with its
own statistics, as functional batch norm behaves under vmap. A batched (seed, offset), which
``torch.vmap(randomness="different")`` gives, draws each sample's dropout mask from its own seed;
an unbatched one gives every sample the same mask.

(Rules cannot re-enter torch.vmap: functorch asserts inside a nested vmap started from a rule.)
"""

import torch

from . import (
    ops,  # noqa: F401  (defines the ops on the reference backend before they get rules)
    reference,
)

_fused = torch.ops.fused_mlp


def _batched(x, dim, size):
    """x with its vmapped dimension first; an unbatched x expanded to it."""
    if dim is None:
        return x.expand(size, *x.shape)
    return x.movedim(dim, 0)


def _reference_rule(name, output_ranks):
    """The rule that runs reference.<name>, written for leading batch dimensions, on the batched
    arguments with their vmapped dimension first. output_ranks(args): each output's rank per
    sample, which tells a batched output from one that depends on no batched input."""
    fn = getattr(reference, name)

    def rule(info, in_dims, *args):
        args = [a if d is None else a.movedim(d, 0) for a, d in zip(args, in_dims)]
        output = fn(*args)
        ranks = output_ranks(args)
        if isinstance(output, tuple):
            return output, tuple(0 if o.dim() == r + 1 else None for o, r in zip(output, ranks))
        return output, 0 if output.dim() == ranks + 1 else None

    return rule


_PER_SAMPLE_WEIGHT = (
    "fused_mlp.cross_entropy under vmap: a class weight per sample (a vmapped weight) is not supported; "
    "vmap over the input and target with one weight"
)


def _mean_divisor(target, weight, ignore_index, rows, classes):
    """Per sample (dim 0): what reduction "mean" divides the summed loss by."""
    if target.is_floating_point():
        return torch.full((target.shape[0],), float(rows), dtype=torch.float64, device=target.device)
    # The forward op has checked the targets' values.
    valid, _, w_t, _ = reference._target_weights(target, weight, classes, ignore_index, torch.float64)
    return reference._counted_weight(valid, w_t)


def cross_entropy_forward_rule(
    info, in_dims, input, target, weight, reduction, ignore_index, label_smoothing, op=_fused.cross_entropy_forward
):
    """The vmap rule of cross_entropy_forward, folding the samples into the rows of one call of op
    (the op itself, or a differentiable call of it when a transform sits below vmap)."""
    if in_dims[2] is not None:
        raise NotImplementedError(_PER_SAMPLE_WEIGHT)
    size = info.batch_size
    x, t = _batched(input, in_dims[0], size), _batched(target, in_dims[1], size)
    rows, classes = x.shape[1], x.shape[2]
    loss, logsumexp = op(
        x.reshape(-1, classes),
        t.reshape(-1, classes) if t.is_floating_point() else t.reshape(-1),
        weight,
        reference.REDUCTION_NONE,
        ignore_index,
        label_smoothing,
    )
    loss, logsumexp = loss.reshape(size, rows), logsumexp.reshape(size, rows)
    if reduction != reference.REDUCTION_NONE:
        total = loss.to(torch.float64).sum(dim=1)
        if reduction == reference.REDUCTION_MEAN:
            total = total / _mean_divisor(t, weight, ignore_index, rows, classes)
        loss = total.to(input.dtype)
    return (loss, logsumexp), (0, 0)


def cross_entropy_backward_rule(
    info,
    in_dims,
    grad_loss,
    input,
    target,
    weight,
    logsumexp,
    reduction,
    ignore_index,
    label_smoothing,
    op=_fused.cross_entropy_backward,
):
    """The vmap rule of cross_entropy_backward, folded as cross_entropy_forward_rule."""
    if in_dims[3] is not None:
        raise NotImplementedError(_PER_SAMPLE_WEIGHT)
    size = info.batch_size
    x, t = _batched(input, in_dims[1], size), _batched(target, in_dims[2], size)
    lse, g = _batched(logsumexp, in_dims[4], size), _batched(grad_loss, in_dims[0], size)
    rows, classes = x.shape[1], x.shape[2]
    if reduction != reference.REDUCTION_NONE:  # one gradient per sample: spread over its rows
        if reduction == reference.REDUCTION_MEAN:
            g = g.to(torch.float64) / _mean_divisor(t, weight, ignore_index, rows, classes)
        g = g.unsqueeze(1).expand(size, rows)
    grad = op(
        g.reshape(-1).to(x.dtype),
        x.reshape(-1, classes),
        t.reshape(-1, classes) if t.is_floating_point() else t.reshape(-1),
        weight,
        lse.reshape(-1),
        reference.REDUCTION_NONE,
        ignore_index,
        label_smoothing,
    )
    return grad.reshape(size, rows, classes), 0


torch.library.register_vmap("fused_mlp::cross_entropy_forward", cross_entropy_forward_rule)
torch.library.register_vmap("fused_mlp::cross_entropy_backward", cross_entropy_backward_rule)
_RULES = {
    "linear_bn_relu_forward": lambda args: (2, 2 if args[7] else 1, 1, 1, 1),
    "linear_bn_relu_backward": lambda args: (2 if len(args) < 13 or args[12] else 1, 2, 1, 1, 1),
    "bn_batch_stats": lambda args: (1, 1, 1),
    "bn_relu_dropout": lambda args: 2,
    "bn_backward_sums": lambda args: (1, 1),
    "bn_backward_finish": lambda args: (2 if len(args) < 14 or args[13] else 1, 2, 1, 1, 1),
    "linear_relu_dropout_forward": lambda args: 2,
    "dropout_mask": lambda args: 1,
}
for _name, _ranks in _RULES.items():
    torch.library.register_vmap(f"fused_mlp::{_name}", _reference_rule(_name, _ranks))
