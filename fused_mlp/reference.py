"""The fused ops' maths in plain PyTorch.

Each function here has the signature and the outputs of the op of the same name in
``torch.ops.fused_mlp``. They are what runs when the compiled extension is not built, and the
oracle the tests hold the kernels to. They favour clarity over speed: unlike the kernels, they
materialize the log-probabilities.
"""

import math
import struct

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
    # Meta tensors have shapes but no values, and a traced graph cannot branch on one: nothing to
    # check there (the gather below still refuses an index past the classes on real tensors), nor
    # on a traced one (a tensor subclass: fake, functional). Nor under torch.func, where vmap cannot
    # branch on one sample's values. The forward op has checked the targets in all those cases.
    if (
        target.device.type == "meta"
        or type(target) is not torch.Tensor
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
    ):
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"cross_entropy: target[{i}] = {int(target[i])} is out of bounds: expected a class index "
            f"in [0, {classes}) or ignore_index ({ignore_index})"
        )


def _class_terms(target, weight, classes, ignore_index, acc):
    """For class-index targets, once their values are checked: the mask of counted rows, the
    target of each row (0 where ignored), the weight of each row's target, and the weight vector
    (ones without weights)."""
    _check_targets(target, classes, ignore_index)
    return _target_weights(target, weight, classes, ignore_index, acc)


def _target_weights(target, weight, classes, ignore_index, acc):
    """_class_terms without the check of the values."""
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    w = weight.to(acc) if weight is not None else torch.ones(classes, dtype=acc, device=target.device)
    return valid, safe_target, w[safe_target], w


def _counted_weight(valid, w_t):
    """What reduction "mean" divides by for class-index targets: the summed weight of the counted
    rows (of each leading index), in float64."""
    return torch.where(valid, w_t, torch.zeros_like(w_t)).double().sum(dim=-1)


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
        divisor = float(rows)
    else:
        valid, t, w_t, w = _class_terms(target, weight, classes, ignore_index, acc)
        per_row = -log_prob.gather(1, t[:, None]).squeeze(1) * w_t
        if eps > 0:
            smooth = -(log_prob * w).sum(dim=1)
            per_row = (1.0 - eps) * per_row + (eps / classes) * smooth
        per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
        divisor = _counted_weight(valid, w_t)
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
        if eps > 0:
            a = (1.0 - eps) * w_t + (eps / classes) * w.sum()
            grad = prob * a[:, None] - (eps / classes) * w[None, :]
        else:  # no other class's weight enters a row (0 * a NaN or inf weight would be NaN)
            grad = prob * w_t[:, None]
        grad = grad.scatter_add(1, t[:, None], -((1.0 - eps) * w_t)[:, None])
        divisor = _counted_weight(valid, w_t)
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
#
# Torch has no unsigned 32- or 64-bit arithmetic on every device, so the words live in int64
# tensors as values in [0, 2^32). A 32x32-bit product would overflow int64; each multiplier is
# split into 16-bit halves instead, so no intermediate reaches 2^49 (see _philox_rounds).

_MASK32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10


def _mulhilo(x, m):
    """(hi, lo) 32-bit words of x * m, for x an int64 tensor of 32-bit words and m a 32-bit int."""
    a, b = x * (m & 0xFFFF), x * (m >> 16)
    s = b + (a >> 16)
    return s >> 16, ((s & 0xFFFF) << 16) | (a & 0xFFFF)


def _philox_rounds_broadcast(c0, c1, c2, c3, key0, key1):
    """_philox_rounds for keys of any shape that broadcasts with the counters (one key per sample
    under vmap), without buffers, which batched tensors do not take."""
    for r in range(_PHILOX_ROUNDS):
        k0, k1 = (key0 + r * _PHILOX_WEYL[0]) & _MASK32, (key1 + r * _PHILOX_WEYL[1]) & _MASK32
        hi0, lo0 = _mulhilo(c0, _PHILOX_MUL[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c2]), torch.stack([c3, c1])


def _philox_rounds(c0, c1, c2, c3, key0, key1):
    """Philox4x32-10 on int64 tensors holding 32-bit words (broadcast to one shape); key0 and key1
    are 0-dim tensors, so a key on the device is never read on the host. Returns the output words
    as the rows of two (2, n) tensors: (c0, c2) and (c3, c1)."""
    if key0.dim() > 0 or torch._C._are_functorch_transforms_active():
        return _philox_rounds_broadcast(c0, c1, c2, c3, key0, key1)
    device = c0.device
    weyl = torch.tensor(_PHILOX_WEYL, dtype=torch.int64, device=device)[:, None]
    rounds = torch.arange(_PHILOX_ROUNDS, dtype=torch.int64, device=device)
    # The key of every round at once: (k + r * weyl) mod 2^32, as the 32-bit additions wrap.
    keys = (torch.stack([key0, key1]).reshape(2, 1) + weyl * rounds) & _MASK32
    mul = torch.tensor(_PHILOX_MUL, dtype=torch.int64, device=device)[:, None]
    mul_hi, mul_lo = mul >> 16, mul & 0xFFFF
    # Rows (c0, c2) meet the multipliers (M0, M1) together. A round maps them to
    #   c0 = hi(M1 c2) ^ c1 ^ k0,  c1 = lo(M1 c2),  c2 = hi(M0 c0) ^ c3 ^ k1,  c3 = lo(M0 c0),
    # so the low words, kept as rows (c3, c1), line up with the high words they are xored with,
    # and only the new (c0, c2) swaps rows, which the writes into `even` do for free.
    even = torch.stack(torch.broadcast_tensors(c0, c2))
    low = torch.stack(torch.broadcast_tensors(c3, c1))
    # Reused buffers: at these sizes allocating a result costs as much as computing it.
    a, b, hi = torch.empty_like(even), torch.empty_like(even), torch.empty_like(even)
    for r in range(_PHILOX_ROUNDS):
        # M x = b 2^16 + a with a = M_lo x and b = M_hi x, both < 2^48; s = b + (a >> 16) < 2^49
        # gives hi = s >> 16 and lo = (s mod 2^16) 2^16 + (a mod 2^16).
        torch.mul(even, mul_lo, out=a)
        torch.mul(even, mul_hi, out=b)
        torch.bitwise_right_shift(a, 16, out=hi)
        b.add_(hi)
        torch.bitwise_right_shift(b, 16, out=hi)
        b.bitwise_and_(0xFFFF).bitwise_left_shift_(16).bitwise_or_(a.bitwise_and_(0xFFFF))
        hi.bitwise_xor_(low)
        torch.bitwise_xor(hi[1], keys[0, r], out=even[0])
        torch.bitwise_xor(hi[0], keys[1, r], out=even[1])
        low, b = b, low
    return even, low


def philox4x32_10(counter, key):
    """Philox4x32-10 of each row of counter, an (n, 4) int64 tensor of 32-bit words, with key, a
    2-element int64 tensor of 32-bit words; returns the (n, 4) int64 output words on counter's
    device, as torch.ops.fused_mlp.philox4x32_10 does."""
    c = counter.to(torch.int64) & _MASK32
    k = key.to(device=counter.device, dtype=torch.int64).reshape(2) & _MASK32
    even, low = _philox_rounds(c[:, 0], c[:, 1], c[:, 2], c[:, 3], k[0], k[1])
    return torch.stack([even[0], low[1], even[1], low[0]], dim=1)


def _float32(x):
    """x rounded to the nearest float32, as the kernels receive p."""
    return struct.unpack("f", struct.pack("f", x))[0]


def dropout_mask(seed_offset, numel, p, start=0):
    """The keep mask (bool tensor of numel elements, on seed_offset's device) of dropout with
    probability p for elements start .. start + numel - 1, as torch.ops.fused_mlp.dropout_mask.
    seed_offset is the int64 tensor (seed, offset); each is a 64-bit number stored as a signed
    int64, and is never read on the host. A (..., 2) seed_offset gives a (..., numel) mask per
    (seed, offset)."""
    so = seed_offset.to(torch.int64)
    batch = so.shape[:-1]
    device = so.device
    # & and an arithmetic shift then & give the unsigned 32-bit halves of a negative int64 too.
    seed, offset = so[..., 0:1], so[..., 1:2]  # (..., 1): one key per row of blocks
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    offset_lo, offset_hi = offset & _MASK32, (offset >> 32) & _MASK32
    if not batch:
        seed_lo, seed_hi, offset_lo, offset_hi = (t.reshape(()) for t in (seed_lo, seed_hi, offset_lo, offset_hi))
    first_block = start // 4
    blocks = torch.arange(first_block, (start + numel + 3) // 4, dtype=torch.int64, device=device)
    even, low = _philox_rounds(blocks & _MASK32, blocks >> 32, offset_lo, offset_hi, seed_lo, seed_hi)
    # (word >> 8) * 2^-24 >= float32(p) is exact in float32, so it is the integer comparison
    # word >= t * 2^8 with t the smallest 24-bit value at or above float32(p) * 2^24.
    threshold = math.ceil(_float32(p) * 2.0**24) << 8
    keep_even, keep_low = even >= threshold, low >= threshold
    # Element i takes word i % 4 of block i // 4.
    keep = torch.stack([keep_even[0], keep_low[1], keep_even[1], keep_low[0]], dim=-1).reshape(*batch, -1)
    return keep[..., start - first_block * 4 :][..., :numel].clone()  # a tensor of its own, as the op returns


def dropout_keep_mask(seed, offset, numel, p, start=0, *, device=None):
    """dropout_mask for a separate seed and offset, each a Python int or an int64 tensor (any
    64-bit value; negative ones stand for their two's-complement bits). The mask is on device,
    else on the seed's device if it is a tensor, else on the CPU."""
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    parts = [
        v.to(device=device, dtype=torch.int64).reshape(())
        if isinstance(v, torch.Tensor)
        else torch.tensor(_as_int64(int(v)), dtype=torch.int64, device=device)
        for v in (seed, offset)
    ]
    return dropout_mask(torch.stack(parts), numel, p, start)


def _as_int64(v):
    """A Python int's low 64 bits as a signed int64 value, as torch.tensor needs them."""
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


# --- Linear -> BatchNorm1d -> ReLU -> Dropout -------------------------------------------------------


def _bn_affine(bn_weight, bn_bias, mean, invstd):
    """A, B with gamma * (z - mean) * invstd + beta == z * A + B, per feature (..., C), shaped
    (..., 1, C) to broadcast over the rows of z."""
    a = invstd if bn_weight is None else bn_weight.to(invstd.dtype) * invstd
    b = -mean * a if bn_bias is None else bn_bias.to(invstd.dtype) - mean * a
    return a.unsqueeze(-2), b.unsqueeze(-2)


def _dropout_multiplier(like, dropout_p, seed_offset, acc):
    """The dropout multipliers (0 or 1 / (1 - p)) of a (..., rows, features) tensor shaped like
    `like`, on its device; seed_offset moves there as the CUDA kernels move it (a copy toward the
    input, never a read). One (seed, offset) gives every leading index the same mask; a (..., 2)
    seed_offset gives each its own."""
    if dropout_p <= 0:
        return None
    matrix = like.shape[-2:]
    keep = dropout_mask(seed_offset.to(like.device), matrix.numel(), dropout_p)
    return keep.reshape(keep.shape[:-1] + matrix).to(acc) * (1.0 / (1.0 - dropout_p))


def _linear(input, weight, bias):
    if weight.dim() == 2 and (bias is None or bias.dim() == 1):
        return torch.nn.functional.linear(input, weight, bias)
    z = input @ weight.transpose(-1, -2)  # parameters per sample (vmap)
    return z if bias is None else z + bias.unsqueeze(-2)


# Every function below also takes leading batch dimensions, each index an independent layer with
# its own statistics: the vmap rules of fused_mlp.batching run them so. Rows are dim -2, features
# dim -1, and per-feature tensors are (..., features).


def bn_batch_stats(pre_bn, eps):
    """Per feature (column) of pre_bn: the mean, 1 / sqrt(biased variance + eps) and the unbiased
    variance, in the accumulation dtype."""
    if pre_bn.shape[-2] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(pre_bn.shape)}")
    z = pre_bn.to(_acc_dtype(pre_bn.dtype))
    return z.mean(dim=-2), (z.var(dim=-2, unbiased=False) + eps).rsqrt(), z.var(dim=-2, unbiased=True)


def bn_relu_dropout(pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset):
    """relu(bn_weight * (pre_bn - mean) * invstd + bn_bias) * dropout, in pre_bn's dtype."""
    acc = _acc_dtype(pre_bn.dtype)
    a, b = _bn_affine(bn_weight, bn_bias, mean, invstd)
    y = torch.relu(pre_bn.to(acc) * a + b)
    mult = _dropout_multiplier(y, dropout_p, seed_offset, acc)
    if mult is not None:
        y = y * mult
    return y.to(pre_bn.dtype)


def linear_bn_relu_forward(
    input, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, dropout_p, seed_offset
):
    acc = _acc_dtype(input.dtype)
    z = _linear(input, weight, bias)
    if use_batch_stats:
        mean, invstd, var = bn_batch_stats(z, eps)
        pre_bn = z
    else:
        mean = running_mean.to(acc).clone()
        var = running_var.to(acc).clone()
        invstd = (var + eps).rsqrt()
        pre_bn = input.new_empty(input.shape[:-2] + (0,))
    return bn_relu_dropout(z, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset), pre_bn, mean, invstd, var


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
    if use_batch_stats:  # the two stages, with this call's rows as the count
        sums = bn_backward_sums(grad_out, saved, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset)
        return bn_backward_finish(
            grad_out,
            input,
            weight,
            saved,
            mean,
            invstd,
            bn_weight,
            bn_bias,
            *sums,
            input.shape[-2],
            dropout_p,
            seed_offset,
            need_grad_input,
        )
    # Running statistics: dropout and ReLU read off the saved output, BatchNorm a fixed affine.
    acc = _acc_dtype(input.dtype)
    g = grad_out.to(acc)
    a, _ = _bn_affine(bn_weight, bn_bias, mean, invstd)
    mean, invstd = mean.unsqueeze(-2), invstd.unsqueeze(-2)
    dy = _grad_through_output(g, saved, dropout_p, seed_offset)
    z = _linear(input, weight, bias).to(acc)
    sum_dy, sum_dy_zhat = dy.sum(dim=-2), (dy * (z - mean) * invstd).sum(dim=-2)
    dz = dy * a
    return _layer_grads(dz, dz.sum(dim=-2), input, weight, bn_weight, bn_bias, sum_dy, sum_dy_zhat, need_grad_input)


def _grad_through_output(g, output, dropout_p, seed_offset):
    """g (in the accumulation dtype) through dropout and ReLU, read off the saved output
    relu(y) * mult: zero where the output is <= 0 (relu's output was, or the unit was dropped), and
    g * mult elsewhere, NaN included, as torch.relu's backward lets a gradient through at NaN."""
    mult = _dropout_multiplier(output, dropout_p, seed_offset, g.dtype)
    return torch.where(output <= 0, torch.zeros_like(g), g if mult is None else g * mult)


def _layer_grads(dz, grad_bias, input, weight, bn_weight, bn_bias, sum_dy, sum_dy_zhat, need_grad_input):
    """The layer's five gradients from dz (the gradient at pre_bn) and the per-feature sums."""
    acc = dz.dtype
    grad_input = dz @ weight.to(acc) if need_grad_input else input.new_empty(input.shape[:-2] + (0,))
    grad_weight = dz.transpose(-1, -2) @ input.to(acc)
    param_dtype = lambda t: acc if t is None else t.dtype  # noqa: E731
    return (
        grad_input.to(input.dtype),
        grad_weight.to(weight.dtype),
        grad_bias.to(input.dtype),
        sum_dy_zhat.to(param_dtype(bn_weight)),
        sum_dy.to(param_dtype(bn_bias)),
    )


def _batch_stats_dy(grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset):
    """dy (grad_out through dropout and ReLU) and zhat, in the accumulation dtype."""
    acc = _acc_dtype(pre_bn.dtype)
    g, z = grad_out.to(acc), pre_bn.to(acc)
    a, b = _bn_affine(bn_weight, bn_bias, mean, invstd)
    mult = _dropout_multiplier(z, dropout_p, seed_offset, acc)
    # Zero where relu's input is <= 0; NaN lets the gradient through, as in torch.relu's backward.
    dy = torch.where(z * a + b <= 0, torch.zeros_like(g), g if mult is None else g * mult)
    return dy, (z - mean.unsqueeze(-2)) * invstd.unsqueeze(-2), a


def bn_backward_sums(grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset):
    """(sum(dy), sum(dy * zhat)) per feature over the rows: the backward's first stage."""
    dy, zhat, _ = _batch_stats_dy(grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset)
    return dy.sum(dim=-2), (dy * zhat).sum(dim=-2)


def bn_backward_finish(
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
    """The backward's second stage: the layer's gradients from sums over `count` rows."""
    dy, zhat, a = _batch_stats_dy(grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset)
    dz = a * (dy - sum_dy.unsqueeze(-2) / count - zhat * sum_dy_zhat.unsqueeze(-2) / count)
    # The bias gradient, sum_n dz, is zero: BatchNorm with batch statistics cancels any constant
    # added before it. It is NaN where a NaN or inf reached the feature's sums or its affine, as the
    # sum of stock's dz would be.
    grad_bias = (sum_dy + sum_dy_zhat) * a.squeeze(-2) * 0
    return _layer_grads(dz, grad_bias, input, weight, bn_weight, bn_bias, sum_dy, sum_dy_zhat, need_grad_input)


def linear_relu_dropout_forward(input, weight, bias, dropout_p, seed_offset):
    acc = _acc_dtype(input.dtype)
    y = torch.relu(_linear(input, weight, bias).to(acc))
    mult = _dropout_multiplier(y, dropout_p, seed_offset, acc)
    if mult is not None:
        y = y * mult
    return y.to(input.dtype)


def bn_update_running_stats_(running_mean, running_var, batch_mean, batch_var, factor):
    with torch.no_grad():
        running_mean.mul_(1.0 - factor).add_(batch_mean.to(running_mean.dtype), alpha=factor)
        running_var.mul_(1.0 - factor).add_(batch_var.to(running_var.dtype), alpha=factor)


def philox_seed_offset(like, generator=None):
    """A fresh (seed, offset) for one dropout mask, on like's device, drawn from generator (default:
    the default generator of like's device)."""
    device = generator.device if generator is not None else like.device
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=generator, device=device).to(like.device)


# --- the whole MLP ------------------------------------------------------------------------------


def _entry(items, i):
    return items[i] if i < len(items) else None


def layer_seed_offset(seed_offset, layer, dropout_p):
    """Hidden layer `layer`'s (seed, offset): the network's (seed, offset + layer)."""
    if layer == 0 or dropout_p <= 0:
        return seed_offset
    return seed_offset + torch.tensor([0, layer], dtype=torch.int64, device=seed_offset.device)


def mlp_forward(
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
    """-> (out, hidden, pre_bn, mean, invstd, batch_var); see csrc/ops.cpp."""
    hidden, pre_bn, mean, invstd, batch_var = [], [], [], [], []
    x = input
    for i in range(len(weights) - 1):
        so = layer_seed_offset(seed_offset, i, dropout_p)
        if batch_norm:
            x, z, mu, inv, var = linear_bn_relu_forward(
                x,
                weights[i],
                biases[i],
                _entry(bn_weights, i),
                _entry(bn_biases, i),
                _entry(running_means, i),
                _entry(running_vars, i),
                use_batch_stats,
                eps,
                dropout_p,
                so,
            )
            pre_bn.append(z)
            mean.append(mu)
            invstd.append(inv)
            batch_var.append(var)
        else:
            x = linear_relu_dropout_forward(x, weights[i], biases[i], dropout_p, so)
        hidden.append(x)
    return _linear(x, weights[-1], biases[-1]), hidden, pre_bn, mean, invstd, batch_var


def mlp_backward(
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
    """-> (grad_input, grad_weights, grad_biases, grad_bn_weights, grad_bn_biases); see csrc/ops.cpp."""
    layers = len(weights) - 1
    none = input.new_empty((0,))
    if batch_norm and use_batch_stats and layers and not hidden:  # recomputed from pre_bn
        hidden = [
            bn_relu_dropout(
                pre_bn[i],
                mean[i],
                invstd[i],
                _entry(bn_weights, i),
                _entry(bn_biases, i),
                dropout_p,
                layer_seed_offset(seed_offset, i, dropout_p),
            )
            for i in range(layers)
        ]
    below, seen = [], need_grad_input
    for need in need_layer_grads:
        below.append(seen)
        seen = seen or need
    grad_weights, grad_biases = [none] * (layers + 1), [none] * (layers + 1)
    grad_bn_weights = [none] * (layers if batch_norm else 0)
    grad_bn_biases = list(grad_bn_weights)
    g = grad_out
    for i in reversed(range(layers + 1)):
        if not need_layer_grads[i] and not below[i]:
            break
        x = input if i == 0 else hidden[i - 1]
        if i == layers:
            if need_layer_grads[i]:
                grad_weights[i] = g.transpose(-1, -2) @ x
                if biases[i] is not None:
                    grad_biases[i] = g.sum(-2)
            g = g @ weights[i] if below[i] else none
            continue
        so = layer_seed_offset(seed_offset, i, dropout_p)
        if batch_norm:
            saved = pre_bn[i] if use_batch_stats else hidden[i]
            gx, gw, gb, ggamma, gbeta = linear_bn_relu_backward(
                g,
                x,
                weights[i],
                biases[i],
                _entry(bn_weights, i),
                _entry(bn_biases, i),
                saved,
                mean[i],
                invstd[i],
                use_batch_stats,
                dropout_p,
                so,
                below[i],
            )
            if need_layer_grads[i]:
                grad_weights[i] = gw
                if biases[i] is not None:
                    grad_biases[i] = gb
                if _entry(bn_weights, i) is not None:
                    grad_bn_weights[i] = ggamma
                if _entry(bn_biases, i) is not None:
                    grad_bn_biases[i] = gbeta
        else:
            gz = _grad_through_output(g, hidden[i], dropout_p, so)
            if need_layer_grads[i]:
                grad_weights[i] = gz.transpose(-1, -2) @ x
                if biases[i] is not None:
                    grad_biases[i] = gz.sum(-2)
            gx = gz @ weights[i] if below[i] else none
        g = gx if below[i] else none
    return (g if need_grad_input else none), grad_weights, grad_biases, grad_bn_weights, grad_bn_biases


def mlp_inference(input, weights, biases):
    """relu(x W^T + b) per hidden layer (BatchNorm folded in by the caller), then the output Linear."""
    x = input
    no_seed = torch.zeros(2, dtype=torch.int64)
    for weight, bias in zip(weights[:-1], biases[:-1]):
        x = linear_relu_dropout_forward(x, weight, bias, 0.0, no_seed)
    return _linear(x, weights[-1], biases[-1])


def mlp_update_running_stats_(running_means, running_vars, batch_means, batch_vars, factors):
    for args in zip(running_means, running_vars, batch_means, batch_vars, factors):
        bn_update_running_stats_(*args)


# --- the whole training step (csrc/mlp_train_step.h) -------------------------------------------------

#: mlp_train_step's optimizer codes and the flags of its group_hyperparameters rows (whose columns
#: are lr, weight_decay, beta1 or momentum, beta2 or dampening, eps, flags).
OPTIMIZER_SGD, OPTIMIZER_ADAM, OPTIMIZER_ADAMW = 0, 1, 2
FLAG_MAXIMIZE, FLAG_AMSGRAD_OR_NESTEROV, FLAG_FIRST_MOMENTUM_STEP = 1, 2, 4


def _flat_parameters(weights, biases, bn_weights, bn_biases):
    """Each Linear's parameters in mlp_train_step's flat order, and each Linear's positions in it
    (weight, bias, BatchNorm weight, BatchNorm bias; None where absent)."""
    flat, positions = [], []
    for i, weight in enumerate(weights):
        entry = []
        for t in (weight, biases[i], _entry(bn_weights, i), _entry(bn_biases, i)):
            entry.append(None if t is None else len(flat))
            if t is not None:
                flat.append(t)
        positions.append(entry)
    return flat, positions


def _adam_update(p, grad, m, v, v_max, step, row, decoupled):
    lr, weight_decay, beta1, beta2, eps, flags = row
    with torch.no_grad():
        step.add_(1)
        t = step.item()
        step_size = lr / (1 - beta1**t)
        bias_correction2_sqrt = math.sqrt(1 - beta2**t)
        g = -grad if int(flags) & FLAG_MAXIMIZE else grad
        if weight_decay != 0:
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g + p * weight_decay
        m.add_(g - m, alpha=1 - beta1)
        v.mul_(beta2).add_(g * g, alpha=1 - beta2)
        second = v
        if int(flags) & FLAG_AMSGRAD_OR_NESTEROV:
            torch.maximum(v_max, v, out=v_max)
            second = v_max
        p.sub_(m * step_size / (second.sqrt() / bias_correction2_sqrt + eps))


def _sgd_update(p, grad, buf, row):
    lr, weight_decay, momentum, dampening, _, flags = row
    flags = int(flags)
    with torch.no_grad():
        g = -grad if flags & FLAG_MAXIMIZE else grad
        if weight_decay != 0:
            g = g + p * weight_decay
        if momentum != 0:
            if flags & FLAG_FIRST_MOMENTUM_STEP:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g + momentum * buf if flags & FLAG_AMSGRAD_OR_NESTEROV else buf
        p.sub_(lr * g)


def mlp_train_step(
    input,
    target,
    weights,
    biases,
    bn_weights,
    bn_biases,
    running_means,
    running_vars,
    momenta,
    batch_norm,
    use_batch_stats,
    eps,
    dropout_p,
    seed_offset,
    label_smoothing,
    optimizer,
    group_hyperparameters,
    param_groups,
    steps,
    first_moments,
    second_moments,
    max_second_moments,
    grads,
):
    """One training step in place, returning the loss; see csrc/ops.cpp."""
    flat, positions = _flat_parameters(weights, biases, bn_weights, bn_biases)
    given = not use_batch_stats
    out, hidden, pre_bn, mean, invstd, batch_var = mlp_forward(
        input,
        weights,
        biases,
        bn_weights,
        bn_biases,
        running_means if given else [],
        running_vars if given else [],
        batch_norm,
        use_batch_stats,
        eps,
        dropout_p,
        seed_offset,
    )
    loss, lse = cross_entropy_forward(out, target, None, REDUCTION_MEAN, -100, label_smoothing)
    grad_logits = cross_entropy_backward(
        torch.ones_like(loss), out, target, None, lse, REDUCTION_MEAN, -100, label_smoothing
    )
    if momenta:
        mlp_update_running_stats_(running_means, running_vars, mean, batch_var, momenta)
    layers = len(weights)
    grad_sets = mlp_backward(
        grad_logits,
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
        False,
        [True] * layers,
    )[1:]
    rows = group_hyperparameters.tolist()
    for i, entry in enumerate(positions):
        for j, k in enumerate(entry):
            if k is None:
                continue
            grad = grad_sets[j][i]
            if grads:
                grads[k].copy_(grad)
            row = rows[param_groups[k]]
            if optimizer == OPTIMIZER_SGD:
                _sgd_update(flat[k], grad, first_moments[k] if first_moments else None, row)
            else:
                amsgrad = max_second_moments[k] if max_second_moments else None
                _adam_update(
                    flat[k],
                    grad,
                    first_moments[k],
                    second_moments[k],
                    amsgrad,
                    steps[k],
                    row,
                    optimizer == OPTIMIZER_ADAMW,
                )
    return loss.detach()
