"""Thin wrappers over the ``torch.ops.fused_mlp`` ops, and their fake (meta) implementations.

Every function here takes and returns exactly what the op of the same name does (schemas in
csrc/ops.cpp). When the extension is not loaded, the same-named function of
``fused_mlp.reference`` runs instead.
"""

import torch

from . import _extension, reference

#: "extension" (the compiled kernels) or "reference" (plain PyTorch), fixed at import.
BACKEND = _extension.load()


def cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing):
    """(rows, classes) logits -> (loss, logsumexp); loss has shape (rows,) for reduction 0
    (none) and () for 1 (mean) and 2 (sum)."""
    if BACKEND == "reference":
        return reference.cross_entropy_forward(input, target, weight, reduction, ignore_index,
                                               label_smoothing)
    return torch.ops.fused_mlp.cross_entropy_forward(input, target, weight, reduction,
                                                     ignore_index, label_smoothing)


def cross_entropy_backward(grad_loss, input, target, weight, logsumexp, reduction, ignore_index,
                           label_smoothing):
    """The gradient of cross_entropy_forward's loss with respect to its input."""
    if BACKEND == "reference":
        return reference.cross_entropy_backward(grad_loss, input, target, weight, logsumexp,
                                                reduction, ignore_index, label_smoothing)
    return torch.ops.fused_mlp.cross_entropy_backward(grad_loss, input, target, weight, logsumexp,
                                                      reduction, ignore_index, label_smoothing)


if BACKEND == "extension":

    @torch.library.register_fake("fused_mlp::cross_entropy_forward")
    def _cross_entropy_forward_fake(input, target, weight, reduction, ignore_index,
                                    label_smoothing):
        torch._check(input.dim() == 2, lambda: "cross_entropy_forward: input must be 2-D")
        rows = input.shape[0]
        loss = input.new_empty((rows,) if reduction == reference.REDUCTION_NONE else ())
        return loss, input.new_empty((rows,), dtype=torch.float64)

    @torch.library.register_fake("fused_mlp::cross_entropy_backward")
    def _cross_entropy_backward_fake(grad_loss, input, target, weight, logsumexp, reduction,
                                     ignore_index, label_smoothing):
        torch._check(input.dim() == 2, lambda: "cross_entropy_backward: input must be 2-D")
        return torch.empty_like(input, memory_format=torch.contiguous_format)
