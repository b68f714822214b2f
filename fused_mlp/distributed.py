"""Batch statistics synchronized across processes (torch.distributed: gloo on CPU, NCCL on CUDA).

A training forward of a synchronized BatchNorm merges every process's per-feature statistics, so
each process normalizes its rows with the statistics of the whole global batch; its backward sums
the two per-feature reductions (sum dy and sum dy * zhat) over the processes. The collectives run
here, in Python, between the stage ops the single-process path is built from:

    forward:  GEMM | bn_batch_stats (local) | header + all_gather, merge | bn_relu_dropout
    backward: bn_backward_sums (local) | all_reduce | bn_backward_finish

so one path serves every backend. The per-feature parameter gradients stay local: DistributedDataParallel
averages them as it does every other gradient.
"""

import torch
import torch.distributed as dist

from . import autograd, functional, ops, reference

__all__ = [
    "SynchronizationError",
    "active_group",
    "batch_norm_synchronized",
    "linear_bn_relu_synchronized",
    "synchronized_statistics",
]

#: The dtypes a header can name; the index is the code sent.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

UNDER_TRANSFORM = (
    "synchronized BatchNorm: batch statistics synchronized across processes cannot run under a torch.func "
    "transform (grad, vjp, jacrev, vmap); call the model in eval mode, or without a process group, there"
)
DOUBLE_BACKWARD = (
    "synchronized BatchNorm: double backward (create_graph=True) through batch statistics synchronized "
    "across processes is not supported"
)


class SynchronizationError(RuntimeError):
    """A collective of a synchronized BatchNorm failed, or the processes disagree on what they run."""


def active_group(process_group=None):
    """The process group a training forward must synchronize its batch statistics over, or None when
    nothing is to be communicated: torch.distributed absent or not initialized, or one process in
    the group (local statistics then, as torch.nn.SyncBatchNorm computes them)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def _collective(what, call, *args):
    try:
        call(*args)
    except RuntimeError as err:  # DistBackendError and timeouts included
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SynchronizationError(
            f"synchronized BatchNorm: the {what} across the process group failed ({first}); a process may "
            "have exited, stalled past the group's timeout, or called a different collective"
        ) from err


def _all_gather(tensor, group, what):
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    _collective(what, dist.all_gather, parts, tensor, group)
    return torch.stack(parts)


def _exchange_header(features, dtype, rows, device, group):
    """Every process's (features, dtype, rows), checked to agree before any collective whose size
    depends on them (a size mismatch inside gloo's all_gather aborts the process). Returns the
    per-process row counts as Python ints."""
    header = torch.tensor([features, _DTYPES.index(dtype), rows], dtype=torch.int64, device=device)
    table = _all_gather(header, group, "header exchange").tolist()
    for column, name, show in ((0, "features", str), (1, "dtype", lambda code: str(_DTYPES[code]))):
        if any(row[column] != table[0][column] for row in table):
            per_rank = ", ".join(f"rank {r}: {show(row[column])}" for r, row in enumerate(table))
            raise SynchronizationError(
                f"synchronized BatchNorm: the processes disagree on the {name} of the layer they "
                f"synchronize ({per_rank}); every process must run the same model"
            )
    return [row[2] for row in table]


def _local_moments(rows, eps):
    """Per feature of rows (N, C): the mean and the sum of squared deviations (M2), in the
    accumulation dtype, for any N (a process may hold one row, or none)."""
    n = rows.shape[0]
    if n >= 2:
        mean, _, unbiased_var = ops.bn_batch_stats(rows, eps)
        return mean, unbiased_var * (n - 1)
    acc = reference._acc_dtype(rows.dtype)
    mean = rows[0].to(acc) if n == 1 else rows.new_zeros(rows.shape[1], dtype=acc)
    return mean, torch.zeros_like(mean)


def synchronized_statistics(rows, eps, group):
    """The statistics of the global batch from each process's rows (N_i, C): (mean, invstd with the
    biased variance, unbiased variance, global row count). Every process computes the same merge,
    in the same order, from the same gathered numbers, so all hold identical statistics."""
    counts = _exchange_header(rows.shape[1], rows.dtype, rows.shape[0], rows.device, group)
    total = sum(counts)
    if total <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {total} row(s) across {len(counts)} processes"
        )
    mean, m2 = _local_moments(rows, eps)
    gathered = _all_gather(torch.stack((mean, m2)), group, "all_gather of the batch statistics")
    # Chan's rule for all the processes at once: the global mean weighs each process's by its rows;
    # the global M2 adds each process's M2 and its rows times its mean's squared distance from it.
    n = torch.tensor(counts, dtype=mean.dtype, device=mean.device).unsqueeze(1)
    means, m2s = gathered[:, 0], gathered[:, 1]
    global_mean = (n * means).sum(0) / total
    global_m2 = m2s.sum(0) + (n * (means - global_mean).square()).sum(0)
    invstd = (global_m2 / total + eps).rsqrt()
    return global_mean, invstd, global_m2 / (total - 1), total


def _all_reduce_sums(sums, group):
    """The per-feature backward sums added over the processes."""
    total = torch.stack(sums)
    _collective("all_reduce of the backward sums", dist.all_reduce, total, dist.ReduceOp.SUM, group)
    return total[0], total[1]


def _refuse_double_backward():
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD)


class _LinearBNReLU(torch.autograd.Function):
    """The layer's training forward with synchronized statistics, from its stage ops."""

    @staticmethod
    def forward(ctx, input, weight, bias, bn_weight, bn_bias, eps, dropout_p, seed_offset, group):
        pre_bn = torch.nn.functional.linear(input, weight, bias)
        mean, invstd, batch_var, count = synchronized_statistics(pre_bn, eps, group)
        out = ops.bn_relu_dropout(pre_bn, mean, invstd, bn_weight, bn_bias, dropout_p, seed_offset)
        ctx.save_for_backward(input, weight, pre_bn, mean, invstd, bn_weight, bn_bias, seed_offset)
        ctx.count, ctx.dropout_p, ctx.group, ctx.has_bias = count, dropout_p, group, bias is not None
        ctx.mark_non_differentiable(mean, batch_var)
        return out, mean, batch_var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        _refuse_double_backward()
        input, weight, pre_bn, mean, invstd, bn_weight, bn_bias, seed_offset = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        stage = (grad_out, pre_bn, mean, invstd, bn_weight, bn_bias, ctx.dropout_p, seed_offset)
        local = ops.bn_backward_sums(*stage)
        sum_dy, sum_dy_zhat = _all_reduce_sums(local, ctx.group)
        need_input = ctx.needs_input_grad[0]
        grad_input, grad_weight, grad_bias, _, _ = ops.bn_backward_finish(
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
            ctx.count,
            ctx.dropout_p,
            seed_offset,
            need_input,
        )
        return (
            grad_input if need_input else None,
            grad_weight,
            grad_bias if ctx.has_bias else None,
            *_local_parameter_grads(local, bn_weight, bn_bias),
            None,
            None,
            None,
            None,
        )


def _local_parameter_grads(local, bn_weight, bn_bias):
    """(grad of the BatchNorm weight, of its bias) from this process's own sums: DDP averages them."""
    sum_dy, sum_dy_zhat = local
    return (
        None if bn_weight is None else sum_dy_zhat.to(bn_weight.dtype),
        None if bn_bias is None else sum_dy.to(bn_bias.dtype),
    )


class _BatchNorm(torch.autograd.Function):
    """BatchNorm alone with synchronized statistics (SyncBatchNorm1d), on rows (N, C)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, eps, group):
        mean, invstd, batch_var, count = synchronized_statistics(rows, eps, group)
        zhat = (rows.to(mean.dtype) - mean) * invstd
        out = zhat
        if weight is not None:
            out = out * weight.to(mean.dtype)
        if bias is not None:
            out = out + bias.to(mean.dtype)
        ctx.save_for_backward(rows, mean, invstd, weight, bias)
        ctx.count, ctx.group = count, group
        ctx.mark_non_differentiable(mean, batch_var)
        return out.to(rows.dtype), mean, batch_var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        _refuse_double_backward()
        rows, mean, invstd, weight, bias = ctx.saved_tensors
        dy = grad_out.to(mean.dtype)
        zhat = (rows.to(mean.dtype) - mean) * invstd
        local = (dy.sum(0), (dy * zhat).sum(0))
        sum_dy, sum_dy_zhat = _all_reduce_sums(local, ctx.group)
        scale = invstd if weight is None else invstd * weight.to(mean.dtype)
        grad_rows = scale * (dy - sum_dy / ctx.count - zhat * (sum_dy_zhat / ctx.count))
        return grad_rows.to(rows.dtype), *_local_parameter_grads(local, weight, bias), None, None


def _run_outside_transforms():
    if autograd.transforms_active():
        raise RuntimeError(UNDER_TRANSFORM)


@torch.compiler.disable
def linear_bn_relu_synchronized(input, weight, bias, bn_weight, bn_bias, eps, dropout, group, generator=None):
    """``dropout(relu(batch_norm(linear(input))))`` in training, normalized with the statistics of
    every process's rows in ``group``. Returns (output, global mean, global unbiased variance) for
    the caller's running-statistics update. Under torch.autocast the Linear runs in the autocast
    dtype, BatchNorm in its parameters' dtype, as in the single-process op."""
    _run_outside_transforms()
    input, (weight,), (bias,) = functional.autocast_linears(input, (weight,), (bias,))
    seed_offset = functional.dropout_seed_offset(dropout, generator, input)
    with torch.autocast(input.device.type, enabled=False):
        args = (input, weight, bias, bn_weight, bn_bias, float(eps), float(dropout), seed_offset, group)
        return _LinearBNReLU.apply(*args)


@torch.compiler.disable
def batch_norm_synchronized(input, weight, bias, eps, group):
    """``batch_norm(input)`` in training over (N, C) or (N, C, L), normalized with the statistics of
    every process's input in ``group``. Returns (output, global mean, global unbiased variance)."""
    _run_outside_transforms()
    channels = input.shape[1]
    rows = input if input.dim() == 2 else input.transpose(1, 2).reshape(-1, channels)
    out, mean, batch_var = _BatchNorm.apply(rows, weight, bias, float(eps), group)
    if input.dim() == 3:
        out = out.reshape(input.shape[0], input.shape[2], channels).transpose(1, 2)
    return out, mean, batch_var
