"""TrainStep: a whole training step of a fused MLP as one op.

``step = TrainStep(model, optimizer)``, then ``loss = step(inputs, targets)`` does what

    optimizer.zero_grad()
    loss = fused_mlp.cross_entropy(model(inputs), targets, label_smoothing=...)
    loss.backward()
    optimizer.step()

does, in one call of ``fused_mlp::mlp_train_step``: the forward, the loss, the backward and the
optimizer's update of every parameter, each layer's applied as soon as the backward is done with it
(csrc/mlp_train_step.h). The hyperparameters are read from ``optimizer.param_groups`` at every call
and the state is kept in ``optimizer.state`` in torch.optim's own tensors and layout, so schedulers,
``state_dict`` and checkpoints work unchanged, and a run may switch between TrainStep and the
standard path at any step.

What the op cannot express runs the standard path above instead, with the same results: the reason
is ``step.fallback_reason`` (None on the fast path), and a UserWarning names it the first time.
"""

import warnings
from itertools import chain, repeat
from operator import attrgetter, is_, is_not, itemgetter

import torch
import torch.optim.optimizer as torch_optimizer

from . import autograd, checks, functional, ops, reference
from .nn import FusedMLP, SyncBatchNorm1d, _batch_norm_mode, _linears, _synchronized, _tensor

__all__ = ["TrainStep"]

_SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _scalar_dtype(fused):
    """The dtype torch.optim gives a new Adam step counter."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _global_hooks():
    m = torch.nn.modules.module
    found = (
        m._global_forward_hooks,
        m._global_forward_pre_hooks,
        m._global_backward_hooks,
        m._global_backward_pre_hooks,
    )
    return any(found)


def _optimizer_hooks(optimizer):
    o = torch_optimizer
    hooks = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks)
    global_hooks = (getattr(o, "_global_optimizer_pre_hooks", {}), getattr(o, "_global_optimizer_post_hooks", {}))
    return any(hooks) or any(global_hooks)


# Read over every parameter, module or state entry at every call: C-level maps over these, no Python
# per item.
_VALUES = dict.values
_GRAD = attrgetter("grad")
_BN_MODES = attrgetter("training", "track_running_stats", "momentum", "eps")
_GROUP_PARAMS = itemgetter("params")


class _Plan:
    """What one call of the op needs that does not change from step to step: the model's tensors in
    the op's lists, the optimizer's state tensors in the parameters' flat order, and what they were
    built from (checked at every call, cheaply, so a replaced parameter, a loaded state_dict or a
    switched mode rebuilds it)."""

    __slots__ = (
        "params",
        "weights",
        "biases",
        "gammas",
        "betas",
        "running_means",
        "running_vars",
        "counters",
        "momenta_base",
        "batch_norm",
        "use_batch_stats",
        "update",
        "eps",
        "dropout",
        "kind",
        "param_groups",
        "steps",
        "first",
        "second",
        "max_second",
        "grads",
        "new_state",
        "reason",
        "modules",
        "bns",
        "sync_capable",
        "watched",
        "fingerprint",
        "hyper_rows",
        "hyper",
    )


class TrainStep:
    """One training step of a fused MLP in one op call: ``loss = step(inputs, targets)``.

    model: a ``fused_mlp.nn.FusedMLP`` or ``fused_mlp.models.MLP(impl="fused")`` (which flattens
    its input), with or without BatchNorm, any dropout, any depth. optimizer: the model's own
    ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (foreach or fused either way). The step follows the
    model's ``training`` flags as ``model(inputs)`` does, and returns the mean cross-entropy of the
    batch as a detached 0-dim tensor on the device, without waiting for it.

    ``.grad`` is not written by default: each layer's update consumes its gradients while they are
    in cache, and the parameters' ``.grad`` are left None. ``keep_grads=True`` also fills ``.grad``
    (to log gradient norms, say). Clipping needs every gradient before any update: it is the
    standard path's.

    Anything the op cannot express (another optimizer, a frozen parameter, hooks on the modules,
    parameters or optimizer, torch.func transforms, autocast, synchronized BatchNorm, a
    DistributedDataParallel model, probability targets, ...) runs the standard path instead, with
    identical results; ``fallback_reason`` says why (None on the fast path) and a UserWarning names
    the reason once. With ``strict=True`` it raises ValueError instead: at construction for what
    the model and optimizer decide, at the call for what the call decides. Bad input gets the
    model's and the loss's own errors, and leaves the model and the optimizer state untouched.
    """

    def __init__(self, model, optimizer, *, label_smoothing=0.0, keep_grads=False, strict=False, cuda_graph=False):
        if (
            isinstance(label_smoothing, bool)
            or not isinstance(label_smoothing, (int, float))
            or not 0.0 <= label_smoothing <= 1.0
        ):
            raise ValueError(f"TrainStep: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"TrainStep: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"TrainStep: model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.optimizer = model, optimizer
        self.label_smoothing = float(label_smoothing)
        self.keep_grads, self.strict, self.cuda_graph = bool(keep_grads), bool(strict), bool(cuda_graph)
        self.fallback_reason = None
        self._warned = set()
        self._plan = None
        reason = self._setup_reason()
        if reason is not None and self.strict:
            raise ValueError(f"TrainStep: {reason}")

    # --- what decides the path -----------------------------------------------------------------

    def _setup_reason(self):
        """Why the model and optimizer, as they are now, cannot take the fast path (or None): what
        their types decide, what the plan found when it was built (it is rebuilt whenever the
        parameters, their state or the modes change), and what may change at any time (hooks,
        requires_grad, the groups' flags), checked at every call."""
        return self._type_reason() or self._current_plan().reason or self._live_reason()

    def _type_reason(self):
        model, optimizer = self.model, self.optimizer
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return "the model is wrapped in DistributedDataParallel, whose gradients a collective must see"
        if not isinstance(model, FusedMLP):
            return f"the model is a {type(model).__name__}, not a fused_mlp FusedMLP or models.MLP"
        if getattr(model, "impl", "fused") != "fused":
            return f"the model's impl is {model.impl!r}, not 'fused'"
        if type(optimizer) not in _SUPPORTED:
            return f"the optimizer is a {type(optimizer).__name__}; TrainStep runs SGD, Adam and AdamW"
        return None

    def _live_reason(self):
        plan, optimizer = self._plan, self.optimizer
        if _optimizer_hooks(optimizer):
            return "the optimizer has step hooks"
        for group in optimizer.param_groups:
            if group.get("differentiable", False):
                return "the optimizer is differentiable=True"
            if isinstance(group["lr"], torch.Tensor):
                return "the learning rate is a tensor"
        for p in plan.params:
            if not p.requires_grad:
                return "a parameter does not require grad (a frozen layer)"
            if p._backward_hooks or p._post_accumulate_grad_hooks:
                return "a parameter has hooks"
        if _global_hooks():
            return "a module has hooks"
        for m in plan.modules:
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return "a module has hooks"
        return None

    def _structure_reason(self, flat, bns):
        """What the plan's build decides: the optimizer's parameters and groups against the
        model's, the parameters' layout, the BatchNorm layers' agreement."""
        model, optimizer = self.model, self.optimizer
        params = list(model.parameters())
        owners = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in owners:
                    return "a parameter is in several parameter groups"
                owners.add(id(p))
        if len(owners) != len(params) or any(id(p) not in owners for p in params) or len(flat) != len(params):
            return "the optimizer's parameters are not exactly the model's"
        for p in params:
            if p.dtype not in (torch.float32, torch.float64):
                return f"a parameter has dtype {p.dtype}; the fast path takes float32 and float64"
            if not p.is_contiguous():
                return "a parameter is not contiguous"
        groups = optimizer.param_groups
        if type(optimizer) is torch.optim.SGD:
            if len({g["momentum"] != 0 for g in groups}) > 1:
                return "some parameter groups use momentum and some do not"
        else:
            if len({bool(g["amsgrad"]) for g in groups}) > 1:
                return "some parameter groups use amsgrad and some do not"
            if len({self._decoupled(g) for g in groups}) > 1:
                return "some parameter groups decouple weight decay and some do not"
        if bns:
            if _batch_norm_mode(bns) is None:
                return "the BatchNorm layers differ in mode, eps or parameters"
            if any(bn.training and bn.track_running_stats and bn.momentum is None for bn in bns) and any(
                p.device.type != "cpu" for p in params
            ):
                return "BatchNorm momentum=None needs the batch count on the host, a synchronization on the GPU"
        return None

    def _decoupled(self, group):
        return type(self.optimizer) is torch.optim.AdamW or bool(group.get("decoupled_weight_decay", False))

    def _call_reason(self, input, target):
        """Why this call cannot take the fast path (or None)."""
        if autograd.transforms_active():
            return "a torch.func transform is active"
        device = input.device.type if isinstance(input, torch.Tensor) else "cpu"
        if torch.is_autocast_enabled(device):
            return "autocast is enabled"
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            return "the targets are class probabilities; the fast path takes class indices"
        if isinstance(input, torch.Tensor) and input.requires_grad:
            return "the input requires grad"
        bns = self._plan.bns  # current: _setup_reason has just checked it
        if self._plan.sync_capable and any(bn.training for bn in bns) and _synchronized(bns, input, "TrainStep"):
            return "BatchNorm is synchronized across processes"
        return None

    # --- the call ------------------------------------------------------------------------------

    def __call__(self, input, target):
        reason = self._setup_reason() or self._call_reason(input, target)
        if reason is not None:
            return self._fall_back(reason, input, target)
        self.fallback_reason = None
        return self._fast(input, target)

    def _fall_back(self, reason, input, target):
        self.fallback_reason = reason
        if self.strict:
            raise ValueError(f"TrainStep: {reason}")
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"TrainStep runs the standard path: {reason}", UserWarning, stacklevel=3)
        return self._standard(input, target)

    def _standard(self, input, target):
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        loss = functional.cross_entropy(self.model(input), target, label_smoothing=self.label_smoothing)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def _fast(self, input, target):
        model = self.model
        x = torch.flatten(input, 1) if _flattens(model) else input
        plan = self._plan  # current: __call__ has just checked it
        name = type(model).__name__
        checks.network_input(x, plan.weights[0], name)
        _check_target(target, x, plan.weights[-1].shape[0])
        if target.dtype == torch.uint8:
            target = target.long()
        if plan.use_batch_stats and plan.batch_norm:
            checks.batch_statistics_rows(x)
        momenta = []
        if plan.update:
            momenta = [m if m is not None else 1.0 / (float(c) + 1.0) for m, c in zip(plan.momenta_base, plan.counters)]
        hyper = self._hyperparameters(plan)
        if self.cuda_graph and x.is_cuda and not plan.new_state:
            loss = self._replay(plan, x, target, momenta, hyper)
        else:
            if x.is_cuda:
                hyper = hyper.to(x.device, non_blocking=True)
            loss = self._run_op(plan, x, target, momenta, hyper)
        if not self.keep_grads and any(map(is_not, map(_GRAD, plan.params), repeat(None))):
            for p in plan.params:
                p.grad = None  # left by a standard step: not this step's gradient
        # Done: the state the op has written joins the optimizer's (a first step's new tensors).
        if plan.new_state:
            state = self.optimizer.state
            for p, entries in plan.new_state:
                state[p].update(entries)
            plan.new_state = []
        self.optimizer._opt_called = True  # as Optimizer.step records it, for the LR schedulers
        return loss

    def _run_op(self, plan, x, target, momenta, hyper):
        """One mlp_train_step call, and the BatchNorm counters' increment after it: what a CUDA
        graph captures."""
        seed_offset = functional.dropout_seed_offset(plan.dropout, None, x)
        # Below autograd: nothing to record (the parameters require grad, so autograd's fallback for
        # an op without a backward would otherwise walk every argument and hand back a loss with a
        # grad_fn), and the loss comes back detached, as the standard path's does.
        with torch._C._AutoDispatchBelowAutograd():
            loss = ops.mlp_train_step(*self.op_arguments(plan, x, target, momenta, hyper, seed_offset))
        if plan.update:
            torch._foreach_add_(plan.counters, 1)
        return loss

    def op_arguments(self, plan, x, target, momenta, hyper, seed_offset):
        """mlp_train_step's arguments, in its order, for this plan."""
        return [
            x,
            target,
            plan.weights,
            plan.biases,
            plan.gammas,
            plan.betas,
            plan.running_means,
            plan.running_vars,
            momenta,
            plan.batch_norm,
            plan.use_batch_stats,
            plan.eps,
            plan.dropout,
            seed_offset,
            self.label_smoothing,
            plan.kind,
            hyper,
            plan.param_groups,
            plan.steps,
            plan.first,
            plan.second,
            plan.max_second,
            plan.grads,
        ]

    # --- CUDA graphs ---------------------------------------------------------------------------

    #: Eager calls of a shape before its graph is captured, and the most shapes that get a graph.
    GRAPH_WARMUP = 3
    GRAPH_SHAPES = 4

    def _replay(self, plan, x, target, momenta, hyper):
        """The step through a CUDA graph of mlp_train_step for this input shape: captured after a few
        eager calls, then replayed with the inputs, the hyperparameters and the seeds copied into
        its static buffers. A new plan (a changed model or optimizer state) drops the graphs; a shape
        beyond GRAPH_SHAPES runs eagerly."""
        graphs = getattr(self, "_graphs", None)
        if graphs is None or graphs["plan"] is not plan:
            graphs = self._graphs = {"plan": plan, "shapes": {}, "pool": torch.cuda.graph_pool_handle()}
        key = (tuple(x.shape), x.dtype, tuple(target.shape))
        entry = graphs["shapes"].get(key)
        if entry is None:
            if len(graphs["shapes"]) >= self.GRAPH_SHAPES:
                return self._run_op(plan, x, target, momenta, hyper.to(x.device, non_blocking=True))
            entry = graphs["shapes"][key] = {"calls": 0}
        if "graph" not in entry:
            entry["calls"] += 1
            if entry["calls"] <= self.GRAPH_WARMUP:
                return self._run_op(plan, x, target, momenta, hyper.to(x.device, non_blocking=True))
            self._capture(entry, plan, x, target, momenta, hyper, graphs["pool"])
        entry["x"].copy_(x, non_blocking=True)
        entry["target"].copy_(target, non_blocking=True)
        entry["hyper"].copy_(hyper, non_blocking=True)
        entry["graph"].replay()
        return entry["loss"].clone()

    def _capture(self, entry, plan, x, target, momenta, hyper, pool):
        entry["x"], entry["target"] = x.clone(), target.clone()
        entry["hyper"] = hyper.to(x.device)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph, pool=pool, stream=side):
            entry["loss"] = self._run_op(plan, entry["x"], entry["target"], momenta, entry["hyper"])
        torch.cuda.current_stream(x.device).wait_stream(side)
        entry["graph"] = graph
        # The capture recorded one step without running it: replay runs this call's.

    def _hyperparameters(self, plan):
        """The parameter groups' rows of mlp_train_step's group_hyperparameters, read now."""
        rows = []
        sgd = plan.kind == reference.OPTIMIZER_SGD
        first = bool(plan.new_state) and sgd
        for group in self.optimizer.param_groups:
            flags = reference.FLAG_MAXIMIZE if group.get("maximize", False) else 0
            if sgd:
                if group.get("nesterov", False):
                    flags |= reference.FLAG_AMSGRAD_OR_NESTEROV
                if first:
                    flags |= reference.FLAG_FIRST_MOMENTUM_STEP
                rows.append((group["lr"], group["weight_decay"], group["momentum"], group["dampening"], 0.0, flags))
            else:
                if group["amsgrad"]:
                    flags |= reference.FLAG_AMSGRAD_OR_NESTEROV
                beta1, beta2 = group["betas"]
                rows.append((group["lr"], group["weight_decay"], float(beta1), float(beta2), group["eps"], flags))
        if rows != plan.hyper_rows:  # the op only reads it: the last call's tensor serves while they hold
            plan.hyper_rows, plan.hyper = rows, torch.tensor(rows, dtype=torch.float64)
        return plan.hyper

    # --- the plan ------------------------------------------------------------------------------

    def _gather(self):
        """The model's tensors and modes as the op takes them, read through the modules' dicts."""
        model = self.model
        layers = list(model._modules["hidden"]._modules.values())
        linears = _linears(model, layers)
        weights = [_tensor(lin, "weight") for lin in linears]
        biases = [_tensor(lin, "bias") for lin in linears]
        bns = [layer._modules["bn"] for layer in layers] if model.batch_norm else []
        return layers, weights, biases, bns

    def _current_plan(self):
        plan = self._plan
        if plan is not None:
            objects, values = self._fingerprint(plan)
            known_objects, known_values = plan.fingerprint
            # By identity, never ==: a tensor's == is elementwise.
            if values == known_values and len(objects) == len(known_objects) and all(map(is_, objects, known_objects)):
                return plan
        plan = self._plan = self._build_plan(*self._gather())
        return plan

    def _fingerprint(self, plan):
        """What the plan is built from, compared at every call. The objects, by identity: the entries
        of the dicts it read the model through (the submodules, and every Linear's and BatchNorm's
        parameters and buffers: a replaced layer or tensor), the optimizer's state (its dict, the
        parameters it keys and the tensors of their entries), the groups' parameter lists and, with
        keep_grads, the .grad tensors. The values: the modes and the entries' sizes. C-level maps
        over C-level iterators: no Python runs per tensor."""
        model, optimizer = self.model, self.optimizer
        state = optimizer.state
        entries = state.values()
        objects = (
            *chain.from_iterable(map(_VALUES, plan.watched)),
            state,
            *state,
            *chain.from_iterable(map(_VALUES, entries)),
            *map(_GROUP_PARAMS, optimizer.param_groups),
            *(map(_GRAD, plan.params) if self.keep_grads else ()),
        )
        values = (model.training, model._modules["drop"].p, *map(_BN_MODES, plan.bns), *map(len, entries))
        return objects, values

    def _build_plan(self, layers, weights, biases, bns):
        model, optimizer = self.model, self.optimizer
        plan = _Plan()
        plan.reason = None
        plan.modules = list(model.modules())
        plan.bns = bns
        # Only these synchronize (whether they do now is the call's to check: the process group).
        plan.sync_capable = any(isinstance(bn, (SyncBatchNorm1d, torch.nn.SyncBatchNorm)) for bn in bns)
        plan.hyper_rows = plan.hyper = None
        plan.weights, plan.biases = weights, biases
        plan.batch_norm = bool(bns)
        plan.eps, plan.update = 1e-5, False
        plan.running_means = plan.running_vars = plan.gammas = plan.betas = []
        plan.counters, plan.momenta_base = [], []
        plan.use_batch_stats = False
        if bns:
            gammas = [_tensor(bn, "weight") for bn in bns]
            betas = [_tensor(bn, "bias") for bn in bns]
            plan.gammas = [] if all(t is None for t in gammas) else gammas
            plan.betas = [] if all(t is None for t in betas) else betas
        flat, _ = reference._flat_parameters(weights, biases, plan.gammas, plan.betas)
        plan.params = flat
        group_of = {}
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                group_of[id(p)] = index
        plan.watched = [model._modules, model._modules["hidden"]._modules, *(layer._modules for layer in layers)]
        for module in (*_linears(model, layers), *bns):
            plan.watched += [module._parameters, module._buffers]
        plan.reason = self._structure_reason(flat, bns)
        if plan.reason is not None:
            plan.fingerprint = self._fingerprint(plan)
            return plan
        if bns:
            bn_training, track, eps = _batch_norm_mode(bns)
            plan.eps = float(eps)
            running_means = [_tensor(bn, "running_mean") for bn in bns]
            have_running = running_means[0] is not None
            plan.use_batch_stats = bn_training or not have_running
            if have_running:
                plan.running_means = running_means
                plan.running_vars = [_tensor(bn, "running_var") for bn in bns]
            plan.update = bool(bn_training and track and have_running and bns[0].num_batches_tracked is not None)
            if plan.update:
                plan.counters = [bn.num_batches_tracked for bn in bns]
                plan.momenta_base = [None if bn.momentum is None else float(bn.momentum) for bn in bns]
        plan.dropout = float(model.drop.p) if model.training else 0.0
        plan.param_groups = [group_of[id(p)] for p in flat]
        plan.new_state = []
        state = optimizer.state
        plan.steps, plan.first, plan.second, plan.max_second = [], [], [], []
        if type(optimizer) is torch.optim.SGD:
            plan.kind = reference.OPTIMIZER_SGD
            if optimizer.param_groups[0]["momentum"] != 0:
                buffers = [state[p].get("momentum_buffer") if p in state else None for p in flat]
                if all(b is None for b in buffers):
                    buffers = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in flat]
                    plan.new_state = [(p, {"momentum_buffer": b}) for p, b in zip(flat, buffers)]
                elif any(b is None for b in buffers):
                    plan.reason = "some parameters have a momentum buffer and some not"
                    buffers = []
                plan.first = buffers
        else:
            decoupled = self._decoupled(optimizer.param_groups[0])
            plan.kind = reference.OPTIMIZER_ADAMW if decoupled else reference.OPTIMIZER_ADAM
            amsgrad = bool(optimizer.param_groups[0]["amsgrad"])
            new = []
            for p in flat:
                entries = state.get(p, {})  # a defaultdict's get adds no entry
                if not entries:
                    group = optimizer.param_groups[group_of[id(p)]]
                    fused = group.get("fused") or False
                    on_device = group.get("capturable", False) or fused
                    entries = {
                        "step": torch.zeros((), dtype=_scalar_dtype(fused), device=p.device)
                        if on_device
                        else torch.tensor(0.0, dtype=_scalar_dtype(None)),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }
                    if amsgrad:
                        entries["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    new.append((p, entries))
                if self.cuda_graph and p.is_cuda and entries["step"].device != p.device:
                    # A graph replays on the device: the counter must live there, as capturable=True
                    # keeps it (torch.optim reads it from there too, on the standard path).
                    entries["step"] = entries["step"].to(p.device, torch.float32)
                    if p in state and state[p]:
                        state[p]["step"] = entries["step"]
                plan.steps.append(entries["step"])
                plan.first.append(entries["exp_avg"])
                plan.second.append(entries["exp_avg_sq"])
                if amsgrad:
                    plan.max_second.append(entries["max_exp_avg_sq"])
            plan.new_state = new
        plan.grads = []
        if self.keep_grads:
            for p in flat:
                if p.grad is None or p.grad.shape != p.shape or not p.grad.is_contiguous():
                    p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            plan.grads = [p.grad for p in flat]
        plan.fingerprint = self._fingerprint(plan)  # what the build itself may have set
        return plan


def _flattens(model):
    from .models import MLP

    return isinstance(model, MLP)


def _check_target(target, x, classes):
    """The loss's own checks of class-index targets for logits of shape (batch, classes); the op
    checks their values before it writes anything."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"cross_entropy: target must be a tensor, got {type(target).__name__}")
    if target.device != x.device:
        raise ValueError(f"cross_entropy: target is on {target.device} but input is on {x.device}")
    checks.class_index_target(target, torch.Size([x.shape[0], classes]))
