"""Modules over the fused ops, drop-ins for their torch.nn counterparts."""

import torch

from . import autograd, checks, functional

__all__ = ["CrossEntropyLoss", "LinearBNReLU"]


class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` computed by the fused cross-entropy op.

    Arguments after ``weight`` are keyword-only, so a call written for the stock class's
    positional order (size_average, ignore_index, reduce, ...) cannot be misread. The class weights
    are a buffer, as in the stock module: they follow ``.to()`` and appear in the state_dict.
    """

    def __init__(self, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        super().__init__()
        if reduction not in checks.REDUCTIONS:
            raise ValueError(f"CrossEntropyLoss: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1], got {label_smoothing!r}")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, input, target):
        return functional.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self):
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


class LinearBNReLU(torch.nn.Module):
    """``Dropout(ReLU(BatchNorm1d(Linear(x))))`` as one fused op with a hand-written backward.

    The parameters and buffers live in two stock submodules, ``linear`` (``nn.Linear``) and ``bn``
    (``nn.BatchNorm1d``), so the state_dict is exactly that of
    ``nn.Sequential(OrderedDict(linear=..., bn=...))`` and loads both ways without any mapping.

    BatchNorm follows ``bn.training`` (batch statistics and a running-statistics update exactly as
    ``nn.BatchNorm1d``; running statistics, folded into the GEMM, in eval), dropout follows this
    module's ``training``. Forward hooks registered on ``linear`` or ``bn`` do not fire: the fused
    forward never calls those submodules.
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        dropout=0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        checks.dropout_probability(dropout, "LinearBNReLU")
        self.linear = torch.nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bn = torch.nn.BatchNorm1d(
            out_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.dropout = dropout
        self._fold_cache = None

    @classmethod
    def from_modules(cls, linear, bn, dropout=0.0):
        """Wraps existing stock modules; the layer shares their parameters and buffers."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"LinearBNReLU.from_modules: linear must be an nn.Linear, got {type(linear).__name__}")
        if not isinstance(bn, torch.nn.BatchNorm1d):
            raise TypeError(f"LinearBNReLU.from_modules: bn must be an nn.BatchNorm1d, got {type(bn).__name__}")
        if bn.num_features != linear.out_features:
            raise ValueError(
                f"LinearBNReLU.from_modules: bn has {bn.num_features} features but linear "
                f"has out_features={linear.out_features}"
            )
        checks.dropout_probability(dropout, "LinearBNReLU")
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.linear, layer.bn, layer.dropout = linear, bn, dropout
        layer._fold_cache = None
        return layer

    def _folded_parameters(self, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
        """(W', b') of BN folded into the Linear, cached until any tensor they derive from is
        replaced or changed in place (an optimizer step, load_state_dict, ...). Not a buffer:
        never in the state_dict."""
        sources = (weight, bias, bn_weight, bn_bias, running_mean, running_var)
        key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        key += (eps,)
        cache = self._fold_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                folded = functional.fold_batch_norm(*sources, eps)
            cache = self._fold_cache = (key, *folded)
        return cache[1:]

    def forward(self, input):
        # Every parameter and buffer read once (module attribute lookups are not free).
        lin, bn = self.linear, self.bn
        weight, bias, bn_weight, bn_bias = lin.weight, lin.bias, bn.weight, bn.bias
        bn_training, track = bn.training, bn.track_running_stats
        running_mean, running_var = bn.running_mean, bn.running_var
        # As nn.BatchNorm1d: batch statistics in training, or always without running statistics.
        use_batch_stats = bn_training or (running_mean is None and running_var is None)
        if bn_training and not track:
            running_mean = running_var = None
        dropout = self.dropout if self.training else 0.0
        checks.linear_bn_relu_args(
            input, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, dropout
        )
        if (
            not use_batch_stats
            and not _needs_grad(input, weight, bias, bn_weight, bn_bias)
            and not torch.compiler.is_compiling()
        ):
            # Inference: one GEMM with the cached folded weights, then ReLU (+ dropout).
            folded_weight, folded_bias = self._folded_parameters(
                weight, bias, bn_weight, bn_bias, running_mean, running_var, bn.eps
            )
            return functional.folded_linear_relu_dropout(input, folded_weight, folded_bias, dropout=dropout)
        update = bn_training and track and bn.num_batches_tracked is not None
        momentum = 0.0
        if update and autograd.transforms_active():
            raise RuntimeError(functional.RUNNING_STATS_UNDER_TRANSFORM)
        if update:  # only once the input is known good: bad input leaves the state untouched
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        pass_running = update or not use_batch_stats
        return functional.linear_bn_relu_checked(
            input,
            weight,
            bias,
            bn_weight,
            bn_bias,
            running_mean if pass_running else None,
            running_var if pass_running else None,
            use_batch_stats,
            momentum,
            bn.eps,
            dropout,
        )

    def extra_repr(self):
        return f"dropout={self.dropout}"


def _needs_grad(input, *params):
    if not torch.is_grad_enabled():
        return False
    return input.requires_grad or any(t is not None and t.requires_grad for t in params)
