"""The fused ops' maths in plain PyTorch.

Each function here has the signature and the outputs of the op of the same name in
``torch.ops.fused_mlp``. They are what runs when the compiled extension is not built, and the
oracle the tests hold the kernels to. They favour clarity over speed: unlike the kernels, they
materialize the log-probabilities.
"""

import torch

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


def _acc_dtype(dtype):
    """The accumulation dtype of the kernels: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_softmax(x):
    """log-softmax of each row, and its logsumexp in float64, by max-subtraction as the kernels
    do it: a row with +inf, NaN, or nothing but -inf gives NaN, as log_softmax does
    (torch.logsumexp would give -inf or inf instead)."""
    m = x.amax(dim=1, keepdim=True)
    shifted = x - m
    log_sum = shifted.exp().sum(dim=1, keepdim=True).log()
    lse = (m.double() + log_sum.double()).squeeze(1)
    lse = torch.where(m.squeeze(1).isfinite(), lse, torch.full_like(lse, float("nan")))
    return shifted - log_sum, lse


def _check_targets(target, classes, ignore_index):
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"cross_entropy: target[{i}] = {int(target[i])} is out of bounds: expected a class index "
            f"in [0, {classes}) or ignore_index ({ignore_index})")


def _class_terms(target, weight, classes, ignore_index, label_smoothing, acc):
    """For class-index targets: the mask of counted rows, the target of each row (0 where
    ignored), the weight of each row's target, and the weight vector (ones without weights)."""
    _check_targets(target, classes, ignore_index)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    w = (weight.to(acc) if weight is not None
         else torch.ones(classes, dtype=acc, device=target.device))
    return valid, safe_target, w[safe_target], w


def _smoothed_prob_target(target, label_smoothing, acc):
    classes = target.shape[1]
    return target.to(acc) * (1.0 - label_smoothing) + label_smoothing / classes


def cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing):
    acc = _acc_dtype(input.dtype)
    x = input.to(acc)
    rows, classes = x.shape
    log_prob, lse = _log_softmax(x)
    eps = label_smoothing
    if target.is_floating_point():
        w = weight.to(acc) if weight is not None else torch.ones(classes, dtype=acc, device=x.device)
        per_row = -(log_prob * _smoothed_prob_target(target, eps, acc) * w).sum(dim=1)
        divisor = torch.tensor(float(rows), dtype=torch.float64)
    else:
        valid, t, w_t, w = _class_terms(target, weight, classes, ignore_index, eps, acc)
        per_row = -log_prob.gather(1, t[:, None]).squeeze(1) * w_t
        if eps > 0:
            smooth = -(log_prob * w).sum(dim=1)
            per_row = (1.0 - eps) * per_row + (eps / classes) * smooth
        per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
        divisor = torch.where(valid, w_t, torch.zeros_like(w_t)).double().sum()
    if reduction == REDUCTION_NONE:
        loss = per_row
    else:
        loss = per_row.double().sum()
        if reduction == REDUCTION_MEAN:
            loss = loss / divisor
    return loss.to(input.dtype), lse


def cross_entropy_backward(grad_loss, input, target, weight, logsumexp, reduction, ignore_index,
                           label_smoothing):
    acc = _acc_dtype(input.dtype)
    x = input.to(acc)
    rows, classes = x.shape
    hi = logsumexp.to(acc)
    prob = ((x - hi[:, None]) - (logsumexp - hi.double()).to(acc)[:, None]).exp()
    eps = label_smoothing
    g = grad_loss.to(torch.float64)
    if target.is_floating_point():
        w = weight.to(acc) if weight is not None else torch.ones(classes, dtype=acc, device=x.device)
        wt = _smoothed_prob_target(target, eps, acc) * w
        grad = prob * wt.sum(dim=1, keepdim=True) - wt
        valid = torch.ones(rows, dtype=torch.bool, device=x.device)
        divisor = float(rows)
    else:
        valid, t, w_t, w = _class_terms(target, weight, classes, ignore_index, eps, acc)
        a = (1.0 - eps) * w_t + (eps / classes) * w.sum()
        grad = prob * a[:, None] - (eps / classes) * w[None, :]
        grad = grad.scatter_add(1, t[:, None], -((1.0 - eps) * w_t)[:, None])
        divisor = torch.where(valid, w_t, torch.zeros_like(w_t)).double().sum()
    if reduction == REDUCTION_NONE:
        scale = g
    elif reduction == REDUCTION_MEAN:
        scale = (g / divisor).expand(rows)
    else:
        scale = g.expand(rows)
    grad = grad * scale.to(acc)[:, None]
    grad = torch.where(valid[:, None], grad, torch.zeros_like(grad))
    # NaN / inf logits: a NaN gradient for the whole row, as log_softmax's backward gives.
    grad = torch.where(logsumexp.isnan()[:, None], torch.full_like(grad, float("nan")), grad)
    return grad.to(input.dtype)
