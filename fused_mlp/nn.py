"""Modules over the fused ops, drop-ins for their torch.nn counterparts."""

import torch

from . import autograd, checks, distributed, functional, ops

__all__ = [
    "CrossEntropyLoss",
    "FusedMLP",
    "LinearBNReLU",
    "LinearReLU",
    "SyncBatchNorm1d",
    "convert_sync_batchnorm",
]


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

    With ``bn`` a SyncBatchNorm1d (``convert_sync_batchnorm``), or a ``torch.nn.SyncBatchNorm`` on
    CUDA, the training forward normalizes with the statistics of every process's batch in its
    process group (fused_mlp.distributed), once torch.distributed is initialized with more than one
    process.
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
        key = _cache_key(sources, eps)
        cache = self._fold_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                folded_weight, folded_bias = functional.fold_batch_norm(*sources, eps)
            cache = self._fold_cache = (key, _packed(folded_weight), folded_bias)
        return cache[1:]

    def forward(self, input):
        # Every parameter and buffer read once (module attribute lookups are not free).
        lin, bn = self.linear, self.bn
        if bn.training and type(bn) is not torch.nn.BatchNorm1d:
            group = _sync_group(bn, input, "LinearBNReLU")
            if group is not None:
                return self._synchronized_forward(input, group)
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

    # Eager, in one piece, under torch.compile too: compiled, the code around the collectives would
    # be compiled anew for every layer width it meets, past the recompile limit.
    @torch.compiler.disable
    def _synchronized_forward(self, input, group):
        """The training forward with batch statistics merged across ``group``'s processes."""
        lin, bn = self.linear, self.bn
        weight, bias, bn_weight, bn_bias = lin.weight, lin.bias, bn.weight, bn.bias
        running_mean, running_var = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
        dropout = self.dropout if self.training else 0.0
        checks.linear_bn_relu_args(
            input, weight, bias, bn_weight, bn_bias, running_mean, running_var, True, dropout, synchronized=True
        )
        out, mean, batch_var = distributed.linear_bn_relu_synchronized(
            input, weight, bias, bn_weight, bn_bias, bn.eps, dropout, group
        )
        _update_running_stats(bn, mean, batch_var)
        return out

    def extra_repr(self):
        return f"dropout={self.dropout}"


def _needs_grad(input, *params):
    if not torch.is_grad_enabled():
        return False
    return input.requires_grad or any(t is not None and t.requires_grad for t in params)


class LinearReLU(torch.nn.Module):
    """A hidden layer without BatchNorm, as FusedMLP holds it: its parameters live in ``linear``
    (``nn.Linear``), as in LinearBNReLU. Called alone: ``dropout(relu(linear(x)))``, fused."""

    def __init__(self, in_features, out_features, bias=True, dropout=0.0, device=None, dtype=None):
        super().__init__()
        checks.dropout_probability(dropout, "LinearReLU")
        self.linear = torch.nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.dropout = dropout

    def forward(self, input):
        lin = self.linear
        checks.network_input(input, lin.weight, "LinearReLU")
        dropout = self.dropout if self.training else 0.0
        return functional.folded_linear_relu_dropout(input, lin.weight, lin.bias, dropout=dropout)

    def extra_repr(self):
        return f"dropout={self.dropout}"


class FusedMLP(torch.nn.Module):
    """A multi-layer perceptron as one fused op per pass, forward and backward.

    ``in_features -> hidden[0] -> ... -> hidden[-1] -> out_features``: each hidden layer is
    Linear -> BatchNorm1d -> ReLU -> Dropout (``batch_norm=True``) or Linear -> ReLU -> Dropout, and
    the last is a plain Linear giving the logits. The training forward is one op for the whole
    network (``fused_mlp::mlp_forward``), its backward one op that returns every gradient and skips
    the GEMMs of whatever needs none (the input's, frozen layers'); inference in eval mode is one
    op on weights with BatchNorm folded in, cached until a parameter or buffer changes.

    Parameters and buffers live in stock submodules under the keys of ``fused_mlp.models.MLP``:
    ``hidden.{i}.linear`` (``nn.Linear``), ``hidden.{i}.bn`` (``nn.BatchNorm1d``) and ``out``
    (``nn.Linear``); ``drop`` is the ``nn.Dropout`` whose ``p`` every hidden layer uses. BatchNorm
    follows the ``bn`` modules' ``training`` (batch statistics and the running-statistics update of
    ``nn.BatchNorm1d``, momentum=None included), dropout this module's.

    The network runs as one op when its BatchNorm layers agree on mode, eps and which parameters and
    statistics they have, no torch.func transform is active and no statistics are synchronized
    across processes (``convert_sync_batchnorm``); otherwise layer by layer through the per-layer
    fused ops, with the same results (dropout masks aside).
    """

    def __init__(
        self,
        in_features,
        hidden,
        out_features,
        batch_norm=True,
        dropout=0.0,
        *,
        bias=True,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        checks.dropout_probability(dropout, type(self).__name__)
        widths = [in_features, *hidden]
        factory = {"device": device, "dtype": dtype}
        if batch_norm:
            layers = [
                LinearBNReLU(
                    a,
                    b,
                    bias=bias,
                    eps=eps,
                    momentum=momentum,
                    affine=affine,
                    track_running_stats=track_running_stats,
                    dropout=dropout,
                    **factory,
                )
                for a, b in zip(widths, widths[1:])
            ]
        else:
            layers = [LinearReLU(a, b, bias=bias, dropout=dropout, **factory) for a, b in zip(widths, widths[1:])]
        self.hidden = torch.nn.ModuleList(layers)
        self.out = torch.nn.Linear(widths[-1], out_features, bias=bias, **factory)
        self.drop = torch.nn.Dropout(dropout)
        self.batch_norm = batch_norm
        self._fold_cache = None

    @property
    def dropout(self):
        return self.drop.p

    @dropout.setter
    def dropout(self, p):
        checks.dropout_probability(p, type(self).__name__)
        self.drop.p = p
        for layer in self.hidden:
            layer.dropout = p

    def forward(self, input):
        # Read through the submodules' own dicts: a Module attribute lookup is a Python call, and
        # the network has a few dozen tensors to gather on every call.
        layers = list(self.hidden._modules.values())
        linears = _linears(self, layers)
        weights = [_tensor(lin, "weight") for lin in linears]
        checks.network_input(input, weights[0], type(self).__name__)
        dropout = self.drop.p if self.training else 0.0
        if autograd.transforms_active():
            return self._layer_by_layer(input, dropout)
        biases = [_tensor(lin, "bias") for lin in linears]
        compiling = torch.compiler.is_compiling()
        if not self.batch_norm or not layers:
            if not compiling and not _needs_grad(input, *weights, *biases):
                return functional.mlp_inference(input, weights, biases)
            return functional.mlp_checked(input, weights, biases, [], [], [], [], False, False, 0.0, dropout)[0]
        bns = [layer._modules["bn"] for layer in layers]
        mode = _batch_norm_mode(bns)
        if mode is not None and mode[0] and _synchronized(bns, input, type(self).__name__):
            # Synchronized statistics run per layer: the collectives sit between its stage ops.
            return self._synchronized_layers(input, dropout)
        if mode is None:
            return self._layer_by_layer(input, dropout)
        bn_training, track, eps = mode
        gammas, betas = [_tensor(bn, "weight") for bn in bns], [_tensor(bn, "bias") for bn in bns]
        running_means = [_tensor(bn, "running_mean") for bn in bns]
        running_vars = [_tensor(bn, "running_var") for bn in bns]
        have_running = running_means[0] is not None
        # As nn.BatchNorm1d: batch statistics in training, or always without running statistics.
        use_batch_stats = bn_training or not have_running
        if not use_batch_stats and not compiling and not _needs_grad(input, *weights, *biases, *gammas, *betas):
            folded_weights, folded_biases = self._folded(
                weights, biases, gammas, betas, running_means, running_vars, eps
            )
            return functional.mlp_inference(input, folded_weights, folded_biases)
        if bn_training:
            checks.batch_statistics_rows(input)
        update = bn_training and track and have_running and bns[0].num_batches_tracked is not None
        if not use_batch_stats:
            given_means, given_vars = running_means, running_vars
        else:
            given_means = given_vars = [None] * len(bns)
        logits, means, variances = functional.mlp_checked(
            input, weights, biases, gammas, betas, given_means, given_vars, True, use_batch_stats, eps, dropout
        )
        if update:  # after the op: bad input leaves the state untouched
            counters = [bn.num_batches_tracked for bn in bns]
            torch._foreach_add_(counters, 1)
            factors = [1.0 / float(c) if bn.momentum is None else float(bn.momentum) for bn, c in zip(bns, counters)]
            with torch.no_grad():
                ops.mlp_update_running_stats_(running_means, running_vars, list(means), list(variances), factors)
        return logits

    def _layer_by_layer(self, input, dropout):
        """The per-layer fused ops, one after another: under torch.func, or when the BatchNorm
        layers differ in a way one network op cannot express."""
        x = input
        for layer in self.hidden:
            layer.dropout = self.drop.p  # the network's dropout is the one that counts
            x = layer(x)
        return torch.nn.functional.linear(x, self.out.weight, self.out.bias)

    @torch.compiler.disable  # one graph break for the network, not one per layer width
    def _synchronized_layers(self, input, dropout):
        return self._layer_by_layer(input, dropout)

    def _folded(self, weights, biases, gammas, betas, running_means, running_vars, eps):
        """Every hidden layer's (W', b') with BatchNorm folded in, cached until any tensor they
        derive from is replaced or changed in place. Not a buffer: never in the state_dict."""
        sources = (*weights, *biases, *gammas, *betas, *running_means, *running_vars)
        key = _cache_key(sources, eps)
        cache = self._fold_cache
        if cache is None or cache[0] != key:
            folded_weights, folded_biases = [], []
            with torch.no_grad():
                for i in range(len(weights) - 1):
                    w, b = functional.fold_batch_norm(
                        weights[i], biases[i], gammas[i], betas[i], running_means[i], running_vars[i], eps
                    )
                    folded_weights.append(_packed(w))
                    folded_biases.append(b)
                folded_weights.append(_packed(weights[-1].detach()))
            folded_biases.append(None if biases[-1] is None else biases[-1].detach())
            cache = self._fold_cache = (key, folded_weights, folded_biases)
        return cache[1], cache[2]

    def extra_repr(self):
        return f"batch_norm={self.batch_norm}, dropout={self.drop.p}"


def _cache_key(sources, eps):
    """What an inference cache depends on: each source tensor's storage and in-place version (an
    optimizer step, load_state_dict or a replaced tensor changes one), and the dtype and device of
    the first (casting or moving a module gives every tensor a new storage too)."""
    first = sources[0]
    return (first.dtype, first.device, eps, *(None if t is None else (t.data_ptr(), t._version) for t in sources))


def _packed(weight):
    """A weight of an inference cache in the layout the CPU kernels' GEMM reads fastest: float32
    held column by column (weight.t() contiguous), which its outer-product kernel takes without a
    copy. Packed once per cache fill; the values, and so the results to float32 rounding, are the
    weight's. Other devices and dtypes keep the weight as it is."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2:
        return weight.t().contiguous().t()
    return weight


def _linears(model, layers):
    """A FusedMLP's Linears, first to last (its hidden `layers`, then `out`), read through the
    modules' dicts."""
    return [layer._modules["linear"] for layer in layers] + [model._modules["out"]]


def _tensor(module, name):
    """module.<name> for a parameter or buffer (or None), without Module.__getattr__."""
    found = module._parameters.get(name, _MISSING)
    if found is _MISSING:
        found = module._buffers.get(name, _MISSING)
    return getattr(module, name) if found is _MISSING else found


_MISSING = object()


def _batch_norm_mode(bns):
    """(training, track_running_stats, eps) when every BatchNorm layer shares them and agrees on
    which affine parameters and running statistics it has; None when they differ (or one is not an
    nn.BatchNorm1d or SyncBatchNorm1d, e.g. a torch.nn.SyncBatchNorm)."""
    first = bns[0]
    shape = None
    for bn in bns:
        if type(bn) not in _NETWORK_BATCH_NORMS:
            return None
        params, buffers = bn._parameters, bn._buffers
        other = (bn.training, bn.track_running_stats, bn.eps, params.get("weight") is None)
        other += (params.get("bias") is None, buffers.get("running_mean") is None)
        if shape is None:
            shape = other
        elif other != shape:
            return None
    if first.training and not first.track_running_stats and not shape[5]:
        return None  # normalizes with batch statistics but keeps the buffers unchanged: per layer
    return shape[:3]


class SyncBatchNorm1d(torch.nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training forward normalizes with the statistics of every process's
    batch in ``process_group`` (default: the whole world), on CPU (gloo) and CUDA (NCCL) alike.

    Unlike ``torch.nn.SyncBatchNorm`` it is a BatchNorm1d, so DistributedDataParallel accepts it in
    a CPU model, its state_dict keys are BatchNorm1d's, and the fused layers run it through their
    stage ops. Used alone, in a stock model, it is synchronized BatchNorm for CPU users too.
    Statistics are local (exactly ``nn.BatchNorm1d``) in eval mode, with one process, or when
    torch.distributed is not initialized. The running statistics take the global mean and the
    unbiased variance over the global batch, identical on every process. Processes may hold
    different numbers of rows, none included, as long as the global batch has more than one.
    """

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, input):
        group = distributed.active_group(self.process_group) if self.training else None
        if group is None:
            return super().forward(input)
        return self._synchronized_forward(input, group)

    # Run eagerly, in one piece: compiled, the code around the collectives would be compiled
    # anew for every layer width it meets, past torch.compile's recompile limit.
    @torch.compiler.disable
    def _synchronized_forward(self, input, group):
        self._check_input_dim(input)
        out, mean, batch_var = distributed.batch_norm_synchronized(input, self.weight, self.bias, self.eps, group)
        _update_running_stats(self, mean, batch_var)
        return out


_NETWORK_BATCH_NORMS = (torch.nn.BatchNorm1d, SyncBatchNorm1d)


def convert_sync_batchnorm(module, process_group=None):
    """Returns ``module`` with every ``nn.BatchNorm1d`` in it (the fused layers' ``bn`` included)
    replaced by a SyncBatchNorm1d over ``process_group`` that shares its parameters, buffers and
    mode; ``module`` itself when it is such a BatchNorm1d. The fused_mlp counterpart of
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, for CPU and CUDA."""
    converted = module
    if isinstance(module, torch.nn.BatchNorm1d) and not isinstance(module, SyncBatchNorm1d):
        converted = SyncBatchNorm1d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            device="meta",
        )
        converted._parameters.update(module._parameters)
        converted._buffers.update(module._buffers)
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted


def _synchronized(bns, input, owner):
    return any(_sync_group(bn, input, owner) is not None for bn in bns)


def _sync_group(bn, input, owner):
    """The process group whose batch statistics ``bn``'s training forward merges, or None."""
    if isinstance(bn, SyncBatchNorm1d):
        return distributed.active_group(bn.process_group)
    if not isinstance(bn, torch.nn.SyncBatchNorm):
        return None
    group = distributed.active_group(bn.process_group)
    if group is not None and input.device.type != "cuda":
        raise ValueError(
            f"{owner}: its bn is a torch.nn.SyncBatchNorm, which synchronizes only on GPUs, and the input is on "
            f"{input.device.type}; convert the model with fused_mlp.nn.convert_sync_batchnorm(model) instead: "
            "its SyncBatchNorm1d synchronizes on the CPU (gloo) too"
        )
    return group


def _update_running_stats(bn, mean, batch_var):
    """nn.BatchNorm1d's update after a training forward, from the batch's mean and unbiased
    variance: the counter, then the running statistics with momentum (1 / count for None)."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    with torch.no_grad():
        ops.bn_update_running_stats_(bn.running_mean, bn.running_var, mean, batch_var, float(factor))
