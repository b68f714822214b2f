"""The fused ops' maths in plain PyTorch.

Each function here has the signature and the outputs of the op of the same name in
``torch.ops.fused_mlp``. They are what runs when the compiled extension is not built, and the
oracle the tests hold the kernels to. They favour clarity over speed: unlike the kernels, they
materialize the log-probabilities.
"""

import numpy as np
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
            f"in [0, {classes}) or ignore_index ({ignore_index})"
        )


def _class_terms(target, weight, classes, ignore_index, acc):
    """For class-index targets: the mask of counted rows, the target of each row (0 where
    ignored), the weight of each row's target, and the weight vector (ones without weights)."""
    _check_targets(target, classes, ignore_index)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    w = weight.to(acc) if weight is not None else torch.ones(classes, dtype=acc, device=target.device)
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
        valid, t, w_t, w = _class_terms(target, weight, classes, ignore_index, acc)
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


def cross_entropy_backward(grad_loss, input, target, weight, logsumexp, reduction, ignore_index, label_smoothing):
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
        valid, t, w_t, w = _class_terms(target, weight, classes, ignore_index, acc)
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


# --- dropout masks: Philox4x32-10 with the mapping of csrc/common/philox.h ------------------------

_MASK32 = np.uint64(0xFFFFFFFF)
_PHILOX_MUL = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_WEYL = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))


def philox4x32_10(counter, key):
    """Philox4x32-10 on numpy arrays: counter = four arrays of 32-bit words (any integer dtype),
    key = two 32-bit words. Returns the four output words as uint64 arrays holding 32-bit values
    (a uint64 holds the 32x32-bit products exactly)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in counter)
    k0, k1 = (np.uint64(k) & _MASK32 for k in key)
    for _ in range(10):
        p0 = _PHILOX_MUL[0] * c0
        p1 = _PHILOX_MUL[1] * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
        k0 = (k0 + _PHILOX_WEYL[0]) & _MASK32
        k1 = (k1 + _PHILOX_WEYL[1]) & _MASK32
    return c0, c1, c2, c3


def dropout_keep_mask(seed, offset, numel, p, start=0):
    """The keep mask (bool tensor of numel elements) of dropout with probability p for elements
    start .. start + numel - 1, as every backend computes it."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    offset = int(offset) & 0xFFFFFFFFFFFFFFFF
    first_block = start // 4
    blocks = np.arange(first_block, (start + numel + 3) // 4, dtype=np.uint64)
    words = philox4x32_10(
        (
            blocks & _MASK32,
            blocks >> np.uint64(32),
            np.full_like(blocks, offset & 0xFFFFFFFF),
            np.full_like(blocks, offset >> 32),
        ),
        (seed & 0xFFFFFFFF, seed >> 32),
    )
    word = np.stack(words, axis=1).reshape(-1)  # element i: word i % 4 of block i // 4
    word = word[start - first_block * 4 :][:numel]
    keep = (word >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24) >= np.float32(p)
    return torch.from_numpy(keep)


# --- Linear -> BatchNorm1d -> ReLU -> Dropout -------------------------------------------------------


def _bn_affine(bn_weight, bn_bias, mean, invstd):
    """A, B with gamma * (z - mean) * invstd + beta == z * A + B."""
    a = invstd if bn_weight is None else bn_weight.to(invstd.dtype) * invstd
    b = -mean * a if bn_bias is None else bn_bias.to(invstd.dtype) - mean * a
    return a, b


def _dropout_multiplier(shape, dropout_p, seed_offset, acc):
    if dropout_p <= 0:
        return None
    keep = dropout_keep_mask(int(seed_offset[0]), int(seed_offset[1]), shape[0] * shape[1], dropout_p)
    return keep.reshape(shape).to(acc) * (1.0 / (1.0 - dropout_p))


def linear_bn_relu_forward(
    input, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, dropout_p, seed_offset
):
    acc = _acc_dtype(input.dtype)
    z = torch.nn.functional.linear(input, weight, bias)
    if use_batch_stats:
        if input.shape[0] <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
            )
        zf = z.to(acc)
        mean = zf.mean(dim=0)
        invstd = (zf.var(dim=0, unbiased=False) + eps).rsqrt()
        var = zf.var(dim=0, unbiased=True)
        pre_bn = z
    else:
        mean = running_mean.to(acc).clone()
        var = running_var.to(acc).clone()
        invstd = (var + eps).rsqrt()
        pre_bn = input.new_empty(0)
    a, b = _bn_affine(bn_weight, bn_bias, mean, invstd)
    y = torch.relu(z.to(acc) * a + b)
    mult = _dropout_multiplier(y.shape, dropout_p, seed_offset, acc)
    if mult is not None:
        y = y * mult
    return y.to(input.dtype), pre_bn, mean, invstd, var


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
    acc = _acc_dtype(input.dtype)
    g = grad_out.to(acc)
    n = input.shape[0]
    a, b = _bn_affine(bn_weight, bn_bias, mean, invstd)
    if use_batch_stats:
        z = saved.to(acc)
        mult = _dropout_multiplier(z.shape, dropout_p, seed_offset, acc)
        dy = torch.where(z * a + b > 0, g if mult is None else g * mult, torch.zeros_like(g))
        zhat = (z - mean) * invstd
        sum_dy, sum_dy_zhat = dy.sum(dim=0), (dy * zhat).sum(dim=0)
        dz = a * (dy - sum_dy / n - zhat * sum_dy_zhat / n)
        grad_bias = torch.zeros_like(sum_dy)
    else:
        scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
        dy = torch.where(saved > 0, g * scale, torch.zeros_like(g))
        z = torch.nn.functional.linear(input, weight, bias).to(acc)
        sum_dy, sum_dy_zhat = dy.sum(dim=0), (dy * (z - mean) * invstd).sum(dim=0)
        dz = dy * a
        grad_bias = dz.sum(dim=0)
    grad_input = dz @ weight.to(acc) if need_grad_input else input.new_empty(0)
    grad_weight = dz.t() @ input.to(acc)
    param_dtype = lambda t: acc if t is None else t.dtype  # noqa: E731
    return (
        grad_input.to(input.dtype),
        grad_weight.to(weight.dtype),
        grad_bias.to(input.dtype),
        sum_dy_zhat.to(param_dtype(bn_weight)),
        sum_dy.to(param_dtype(bn_bias)),
    )


def linear_relu_dropout_forward(input, weight, bias, dropout_p, seed_offset):
    acc = _acc_dtype(input.dtype)
    y = torch.relu(torch.nn.functional.linear(input, weight, bias).to(acc))
    mult = _dropout_multiplier(y.shape, dropout_p, seed_offset, acc)
    if mult is not None:
        y = y * mult
    return y.to(input.dtype)


def bn_update_running_stats_(running_mean, running_var, batch_mean, batch_var, factor):
    with torch.no_grad():
        running_mean.mul_(1.0 - factor).add_(batch_mean.to(running_mean.dtype), alpha=factor)
        running_var.mul_(1.0 - factor).add_(batch_var.to(running_var.dtype), alpha=factor)
