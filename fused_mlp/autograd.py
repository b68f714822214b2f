"""Autograd for the fused ops: one backward per op, attached three ways.

For each differentiable op, one ``setup_context`` and one ``backward`` serve:

- ``torch.library.register_autograd`` on the op itself, so that ``torch.ops.fused_mlp.<op>``
  called directly is differentiable (outside torch.func transforms: torch 2.14's generated
  Function has no ``setup_context``, and torch.func refuses it, pytorch#168393);
- ``<Op>.function``, an ``autograd.Function`` with ``setup_context``, a vmap rule (hand-written
  for cross-entropy, else generated over the ops' own rules in ``fused_mlp.batching``) and a
  ``jvp`` that refuses forward mode clearly: what torch.func transforms get;
- ``<Op>.fast``, the same Function written ``forward(ctx, ...)`` and without ``jvp``, for eager
  calls outside any transform and for torch.compile (Dynamo traces no Function with a custom
  ``jvp``). ``Function.apply`` binds the arguments of a ``setup_context`` Function with
  ``inspect.signature`` on every call, about 40-50 us here: more than the whole op at small sizes.

First order runs the fused backward op. Under ``create_graph=True`` the same code is
differentiable: the backward op has autograd of its own (its reference maths, recomputed and
differentiated), and the statistics the backward reads (the logsumexp; the pre-BN activation, mean
and invstd) are outputs of the forward, whose gradients the forward's backward turns into input
gradients. No saved value is a constant, so second derivatives are exact.
"""

import collections
import contextlib

import torch
from torch._functorch.pyfunctorch import VmapInterpreter, temporarily_clear_interpreter_stack

from . import (
    batching,
    ops,  # noqa: F401  (defines the ops on the reference backend before they get autograd)
    reference,
)

__all__ = [
    "CROSS_ENTROPY",
    "LINEAR_BN_RELU",
    "LINEAR_RELU_DROPOUT",
    "MLP",
    "MLPConfig",
    "ForwardModeUnsupported",
    "transforms_active",
]

#: Whether a torch.func transform (grad, vjp, vmap, ...) is active: a cheap C call.
transforms_active = torch._C._are_functorch_transforms_active
_below_autograd = torch._C._AutoDispatchBelowAutograd


_VmapInfo = collections.namedtuple("_VmapInfo", ["batch_size", "randomness"])


class ForwardModeUnsupported(NotImplementedError):
    """Forward-mode AD (torch.func.jvp, jacfwd, hessian) reached a fused op."""


def _refuse_forward_mode(name):
    def jvp(ctx, *tangents):
        raise ForwardModeUnsupported(
            f"fused_mlp.{name}: forward-mode AD (torch.func.jvp, jacfwd, hessian) is not supported. Use reverse "
            "mode instead: torch.func.jacrev (a Hessian is jacrev(jacrev(f))) or torch.autograd.grad(..., "
            "create_graph=True)."
        )

    return jvp


class _Op:
    """An op, its two autograd.Functions, and its own autograd registration, all from one
    setup_context(ctx, inputs, output) and one backward(ctx, *grads)."""

    def __init__(self, name, setup_context, backward, vmap=None):
        self.name, self.vmap_rule = name, vmap
        op = self.op = getattr(torch.ops.fused_mlp, name).default
        title = "".join(part.title() for part in name.split("_"))

        def forward(*args):
            return op(*args)

        def fast_forward(ctx, *args):
            if torch.compiler.is_compiling():  # Dynamo traces no dispatch-key guard; no need either
                output = op(*args)
            else:
                with _below_autograd():
                    output = op(*args)
            setup_context(ctx, args, output)
            return output

        jvp = staticmethod(_refuse_forward_mode(name))
        function = {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": jvp,
            "__module__": __name__,
        }
        if vmap is None:
            function["generate_vmap_rule"] = True
        else:  # a hand-written rule, called with this op, differentiable, as the op to fold into
            function["vmap"] = staticmethod(lambda info, in_dims, *args: vmap(info, in_dims, *args, op=self))
        self.function = type(title + "Function", (torch.autograd.Function,), function)
        self.fast = type(
            title + "Fast",
            (torch.autograd.Function,),
            {"forward": staticmethod(fast_forward), "backward": staticmethod(backward), "__module__": __name__},
        )
        torch.library.register_autograd(op, backward, setup_context=setup_context)

    def call_in_backward(self, *args):
        """__call__ from inside a backward: under torch.func, when nothing will differentiate the
        result (one grad transform, nothing beneath it recording), the op itself, without an
        autograd.Function: functorch's Python handling of one costs more than a small op."""
        level = _final_gradient_level(args) if transforms_active() else None
        if level is None:
            return self(*args)
        functorch = torch._C._functorch
        args = [functorch._unwrap_for_grad(a, level) if isinstance(a, torch.Tensor) else a for a in args]
        stack = functorch.get_interpreter_stack()
        if self.vmap_rule is not None and len(stack) == 2 and stack[0].key() == functorch.TransformType.Vmap:
            # vmap(grad(...)), per-sample gradients: the op's rule on the physical tensors, called
            # here rather than through the dispatcher's Python vmap machinery, which costs more.
            return functorch._wrap_for_grad(self._call_vmap_rule(VmapInterpreter(stack[0]), args), level)
        # Nothing at the grad level requires grad now: the op's autograd only passes the call on,
        # to its vmap rule below, and the grad level wraps the result.
        return self.op(*args)

    def _call_vmap_rule(self, vmap_level, args):
        unwrapped = [
            torch._C._functorch._unwrap_batched(a, vmap_level.level()) if isinstance(a, torch.Tensor) else (a, None)
            for a in args
        ]
        in_dims = tuple(d for _, d in unwrapped)
        info = _VmapInfo(vmap_level.batch_size(), vmap_level.randomness())
        with temporarily_clear_interpreter_stack():
            output, out_dim = self.vmap_rule(info, in_dims, *(a for a, _ in unwrapped), op=self.op)
        return torch._C._functorch._add_batch_dim(output, out_dim, vmap_level.level())

    def __call__(self, *args):
        """The op on positional args, differentiable, through the Function that suits the caller."""
        if torch.compiler.is_compiling():  # Dynamo traces no Function with a custom jvp
            return self.fast.apply(*args)
        if transforms_active():
            return self.function.apply(*args)
        if torch.is_grad_enabled():
            return self.fast.apply(*args)
        with _below_autograd():  # skips the Python autograd kernel: nothing to record
            return self.op(*args)


_DIFFERENTIATING = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)


def _final_gradient_level(args):
    """Under torch.func, inside a backward: the level of the grad transform when the gradient
    computed from args is final (it is the only grad or jvp transform and the innermost one, and
    no tensor beneath the transforms requires grad); else None."""
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() or ()
    differentiating = [i for i in stack if i.key() in _DIFFERENTIATING]
    # The one grad transform must be the innermost: one beneath another transform (jacrev(jacrev))
    # will differentiate this gradient once that transform has run.
    if len(differentiating) != 1 or stack[-1].key() != functorch.TransformType.Grad:
        return None
    for t in args:
        if isinstance(t, torch.Tensor):
            while functorch.is_functorch_wrapped_tensor(t):
                t = functorch.get_unwrapped(t)
            if t.requires_grad:
                return None
    return differentiating[0].level()


# --- ops differentiated by recomputing their reference maths ---------------------------------------


def _recompute_vjp(fn, args, needs, grads):
    """The gradients of fn(*args) for the output gradients `grads`, with respect to the tensor args
    flagged in `needs` (None for the others), by running fn (plain PyTorch) again and
    differentiating it (torch.func.vjp under a transform, autograd otherwise): exact, and
    differentiable again when the caller records a graph."""
    positions = [i for i, need in enumerate(needs) if need and isinstance(args[i], torch.Tensor)]
    result = [None] * len(args)
    if not positions:
        return tuple(result)

    def partial(*differentiable):
        full = list(args)
        for i, t in zip(positions, differentiable):
            full[i] = t
        return fn(*full)

    if transforms_active():
        output, vjp_fn = torch.func.vjp(partial, *(args[i] for i in positions))
        if isinstance(output, tuple):
            cotangent = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(output, grads))
        else:
            cotangent = torch.zeros_like(output) if grads[0] is None else grads[0]
        for i, grad in zip(positions, vjp_fn(cotangent)):
            result[i] = grad
        return tuple(result)
    # Plain autograd costs less than torch.func.vjp. The recompute starts from fresh nodes, so that
    # each gradient is the partial derivative (a path from one input through another, logsumexp
    # through the logits, must not count): views under create_graph, which keep the graph reaching
    # back through the inputs; detached copies otherwise.
    create_graph = torch.is_grad_enabled()
    inputs = [args[i].view_as(args[i]) if create_graph else args[i].detach().requires_grad_() for i in positions]
    with torch.enable_grad():
        output = partial(*inputs)
    outputs = output if isinstance(output, tuple) else (output,)
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    got = torch.autograd.grad(
        [o for o, _ in pairs], inputs, [g for _, g in pairs], create_graph=create_graph, allow_unused=True
    )
    for i, grad, t in zip(positions, got, inputs):
        result[i] = torch.zeros_like(t) if grad is None else grad
    return tuple(result)


def _save_inputs(ctx, inputs, output):
    tensors = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
    ctx.save_for_backward(*(inputs[i] for i in tensors))
    ctx.tensor_positions = tensors
    ctx.other_inputs = [None if isinstance(a, torch.Tensor) else a for a in inputs]
    ctx.set_materialize_grads(False)


def _by_recompute(name, vmap=None):
    """An op whose backward differentiates its reference implementation (reference.<name>)."""
    fn = getattr(reference, name)

    def backward(ctx, *grads):
        args = list(ctx.other_inputs)
        for i, t in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[i] = t
        return _recompute_vjp(fn, args, ctx.needs_input_grad, grads)

    return _Op(name, _save_inputs, backward, vmap)


# The backward ops are differentiated this way: they are what a double backward runs through. The
# stage ops and the folded inference op too: they are not on any first-order training path.
CROSS_ENTROPY_BACKWARD = _by_recompute("cross_entropy_backward", batching.cross_entropy_backward_rule)
LINEAR_BN_RELU_BACKWARD = _by_recompute("linear_bn_relu_backward")
BN_BATCH_STATS = _by_recompute("bn_batch_stats")
BN_RELU_DROPOUT = _by_recompute("bn_relu_dropout")
BN_BACKWARD_SUMS = _by_recompute("bn_backward_sums")
BN_BACKWARD_FINISH = _by_recompute("bn_backward_finish")
LINEAR_RELU_DROPOUT = _by_recompute("linear_relu_dropout_forward")


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


# --- cross-entropy ------------------------------------------------------------------------------


def _cross_entropy_setup_context(ctx, inputs, output):
    input, target, weight, reduction, ignore_index, label_smoothing = inputs
    ctx.save_for_backward(input, target, weight, output[1])
    ctx.options = (reduction, ignore_index, label_smoothing)
    ctx.set_materialize_grads(False)


def _cross_entropy_backward(ctx, grad_loss, grad_logsumexp):
    input, target, weight, logsumexp = ctx.saved_tensors
    reduction, ignore_index, label_smoothing = ctx.options
    need_input, need_target, need_weight = ctx.needs_input_grad[:3]
    if need_weight and not target.is_floating_point():
        raise RuntimeError(
            "cross_entropy: the loss is not differentiable with respect to weight for class-index targets "
            "(as in F.cross_entropy); pass weight.detach(), or use probability targets"
        )
    grad_input = grad_target = grad_weight = None
    if need_input:
        if grad_loss is not None:
            grad_input = CROSS_ENTROPY_BACKWARD.call_in_backward(
                grad_loss, input, target, weight, logsumexp, *ctx.options
            )
        if grad_logsumexp is not None:
            # d logsumexp / d input = softmax(input), written through logsumexp so that the graph of a
            # further derivative runs through it too.
            softmax = (input.to(logsumexp.dtype) - logsumexp.unsqueeze(-1)).exp()
            grad_input = _add(grad_input, (grad_logsumexp.unsqueeze(-1) * softmax).to(input.dtype))
    if (need_target or need_weight) and grad_loss is not None:
        # Linear in the target and the weight: one recompute of the reference loss, only when asked.
        _, grad_target, grad_weight, *_ = _recompute_vjp(
            reference.cross_entropy_forward,
            (input, target, weight, reduction, ignore_index, label_smoothing),
            (False, need_target, need_weight),
            (grad_loss, None),
        )
    return grad_input, grad_target, grad_weight, None, None, None


CROSS_ENTROPY = _Op(
    "cross_entropy_forward", _cross_entropy_setup_context, _cross_entropy_backward, batching.cross_entropy_forward_rule
)


# --- Linear -> BatchNorm1d -> ReLU -> Dropout ----------------------------------------------------


def _linear_bn_relu_setup_context(ctx, inputs, output):
    input, weight, bias, bn_weight, bn_bias, _, _, use_batch_stats, _, dropout_p, seed_offset = inputs
    out, pre_bn, mean, invstd, batch_var = output
    # With running statistics the output is saved instead of the pre-BN activation (the next layer
    # keeps it anyway): its zeros are exactly the units ReLU or dropout cut.
    saved = pre_bn if use_batch_stats else out
    ctx.save_for_backward(input, weight, bias, bn_weight, bn_bias, saved, mean, invstd, seed_offset)
    ctx.options = (use_batch_stats, dropout_p)
    ctx.mark_non_differentiable(batch_var)  # feeds the running variance only
    ctx.set_materialize_grads(False)


def _batch_stats_input_grad(pre_bn, mean, invstd, grad_pre_bn, grad_mean, grad_invstd):
    """The gradient reaching the pre-BN activation z through the forward's outputs z, mean(z) and
    invstd(z) = (biased var(z) + eps)^-1/2: d mean / dz = 1/n, d invstd / dz = -invstd^3 (z - mean) / n."""
    n = pre_bn.shape[0]
    grad = None if grad_pre_bn is None else grad_pre_bn.to(mean.dtype)
    if grad_mean is not None:
        grad = _add(grad, (grad_mean / n).expand(pre_bn.shape))
    if grad_invstd is not None:
        grad = _add(grad, -(grad_invstd * invstd.pow(3) / n) * (pre_bn.to(mean.dtype) - mean))
    return grad


def _linear_bn_relu_backward(ctx, grad_out, grad_pre_bn, grad_mean, grad_invstd, _grad_batch_var):
    input, weight, bias, bn_weight, bn_bias, saved, mean, invstd, seed_offset = ctx.saved_tensors
    use_batch_stats, dropout_p = ctx.options
    need = ctx.needs_input_grad
    grads = [None] * 5
    if grad_out is not None and any(need[:5]):
        # A first layer's input needs no gradient: its GEMM, the largest of the backward, is skipped.
        computed = LINEAR_BN_RELU_BACKWARD.call_in_backward(
            grad_out.contiguous(),
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
            need[0],
        )
        grads = [g if n else None for g, n in zip(computed, need)]
    if use_batch_stats and any(g is not None for g in (grad_pre_bn, grad_mean, grad_invstd)):
        # Under a double backward: the gradients the backward op sent to the saved statistics.
        grad_z = _batch_stats_input_grad(saved, mean, invstd, grad_pre_bn, grad_mean, grad_invstd).to(input.dtype)
        if need[0]:
            grads[0] = _add(grads[0], grad_z @ weight)
        if need[1]:
            grads[1] = _add(grads[1], grad_z.transpose(-1, -2) @ input)
        if need[2]:
            grads[2] = _add(grads[2], grad_z.sum(-2))
    # The running statistics are not differentiated through (as in F.batch_norm).
    return (*grads, None, None, None, None, None, None)


LINEAR_BN_RELU = _Op("linear_bn_relu_forward", _linear_bn_relu_setup_context, _linear_bn_relu_backward)


# --- the whole MLP -------------------------------------------------------------------------------

_MLP_FORWARD = torch.ops.fused_mlp.mlp_forward.default
_MLP_BACKWARD = torch.ops.fused_mlp.mlp_backward.default


class MLPConfig(collections.namedtuple("MLPConfig", "layers batch_norm use_batch_stats eps dropout_p n_bn")):
    """What mlp_forward takes besides tensors: `layers` hidden layers (one more Linear), n_bn
    entries in each BatchNorm list (layers with BatchNorm, 0 without)."""

    def split(self, tensors):
        """The flat tensors of MLP.apply as mlp_forward's lists."""
        linears, n = self.layers + 1, self.n_bn
        weights, biases = list(tensors[:linears]), list(tensors[linears : 2 * linears])
        rest = tensors[2 * linears :]
        gammas, betas, means, variances = (list(rest[k * n : (k + 1) * n]) for k in range(4))
        return weights, biases, gammas, betas, means, variances, rest[4 * n]

    def forward_args(self, input, tensors):
        weights, biases, gammas, betas, means, variances, seed_offset = self.split(tensors)
        return (
            input,
            weights,
            biases,
            _present(gammas),
            _present(betas),
            _present(means),
            _present(variances),
            self.batch_norm,
            self.use_batch_stats,
            self.eps,
            self.dropout_p,
            seed_offset,
        )


def _present(items):
    """A per-layer list as the ops take it: empty when every entry is None (no affine, no running
    statistics)."""
    return items if any(t is not None for t in items) else []


def _reference_logits(config, input, *tensors):
    return reference.mlp_forward(*config.forward_args(input, tensors))[0]


def _mlp_gradients(config, input, tensors, outputs, needs, grad_out):
    """The gradients of the logits for grad_out with respect to input and the flat tensors (None
    where `needs`, one flag per input then per tensor, says none is needed). outputs: what the
    forward saved (hidden, pre_bn, mean, invstd, flat). First order runs mlp_backward; while a graph
    is recorded (create_graph=True) or under torch.func, the reference maths of the whole network
    are differentiated from the inputs, so that every statistic stays a function of them and second
    derivatives are exact."""
    if transforms_active() or (
        torch.is_grad_enabled()
        and (grad_out.requires_grad or any(t is not None and t.requires_grad for t in (input, *tensors)))
    ):
        return _recompute_vjp(_reference_logits, (config, input, *tensors), (False, *needs), (grad_out,))[1:]
    weights, biases, gammas, betas, _, _, seed_offset = config.split(tensors)
    layers, n = config.layers, config.n_bn
    linears = layers + 1
    need_w, need_b = needs[1 : 1 + linears], needs[1 + linears : 1 + 2 * linears]
    need_gamma = needs[1 + 2 * linears : 1 + 2 * linears + n]
    need_beta = needs[1 + 2 * linears + n : 1 + 2 * linears + 2 * n]
    # Per Linear: whether any of its parameters (weight, bias, BatchNorm affine) needs a gradient.
    need_layer = [bool(need_w[i] or need_b[i] or (i < n and (need_gamma[i] or need_beta[i]))) for i in range(linears)]
    kept = 0 if (config.batch_norm and config.use_batch_stats) else layers  # hidden outputs saved
    hidden = list(outputs[:kept])
    if config.batch_norm:
        pre_bn, mean, invstd = (list(outputs[kept + layers * k : kept + layers * (k + 1)]) for k in (0, 1, 2))
    else:
        pre_bn = mean = invstd = []
    with contextlib.nullcontext() if torch.compiler.is_compiling() else _below_autograd():
        grad_input, grad_weights, grad_biases, grad_gammas, grad_betas = _MLP_BACKWARD(
            grad_out.contiguous(),
            input,
            weights,
            biases,
            _present(gammas),
            _present(betas),
            hidden,
            pre_bn,
            mean,
            invstd,
            config.batch_norm,
            config.use_batch_stats,
            config.dropout_p,
            seed_offset,
            bool(needs[0]),
            need_layer,
        )

    def pick(grads, flags):
        return [g if flag else None for g, flag in zip(grads or [None] * len(flags), flags)]

    return (
        grad_input if needs[0] else None,
        *pick(grad_weights, need_w),
        *pick(grad_biases, need_b),
        *pick(grad_gammas, need_gamma),
        *pick(grad_betas, need_beta),
        *([None] * (2 * n + 1)),
    )


class MLP(torch.autograd.Function):
    """The whole network as one autograd node: mlp_forward, then mlp_backward for every gradient.

    ``MLP.apply(config, input, *weights, *biases, *bn_weights, *bn_biases, *running_means,
    *running_vars, seed_offset)`` returns ``(logits, *mean, *batch_var)`` (no statistics without
    BatchNorm), flat so that autograd sees every tensor. torch.func transforms do not come here:
    fused_mlp.nn.FusedMLP runs the network layer by layer under them.
    """

    @staticmethod
    def forward(ctx, config, input, *tensors):
        args = config.forward_args(input, tensors)
        if torch.compiler.is_compiling():
            out, hidden, pre_bn, mean, invstd, batch_var = _MLP_FORWARD(*args)
        else:
            with _below_autograd():
                out, hidden, pre_bn, mean, invstd, batch_var = _MLP_FORWARD(*args)
        # The least the backward needs: with batch statistics each layer's pre-BN activation, from
        # which mlp_backward recomputes the layer's output (the next GEMM's input); otherwise each
        # layer's output. Never a normalized or activated copy, nor a mask.
        if config.batch_norm and config.use_batch_stats:
            hidden = ()
        ctx.save_for_backward(input, *tensors, *hidden, *pre_bn, *mean, *invstd)
        ctx.config = config
        ctx.mark_non_differentiable(*mean, *batch_var)
        ctx.set_materialize_grads(False)
        return (out, *mean, *batch_var)

    @staticmethod
    def backward(ctx, grad_out, *_statistics):
        needs = ctx.needs_input_grad
        if grad_out is None or not any(needs):
            return (None,) * len(needs)
        saved, config = ctx.saved_tensors, ctx.config
        count = 2 * (config.layers + 1) + 4 * config.n_bn + 1
        tensors, outputs = saved[1 : 1 + count], saved[1 + count :]
        return (None, *_mlp_gradients(config, saved[0], tensors, outputs, needs[1:], grad_out))


# The same backward on the op itself, for direct torch.ops.fused_mlp.mlp_forward calls.


def _padded(items, n):
    return list(items) if len(items) == n else [None] * n


def _op_setup_context(ctx, inputs, output):
    input, weights, biases, gammas, betas, means, variances, batch_norm, use_batch_stats, eps, p, so = inputs
    layers = len(weights) - 1
    n = layers if batch_norm else 0
    config = MLPConfig(layers, batch_norm, use_batch_stats, eps, p, n)
    tensors = (*weights, *biases, *(t for group in (gammas, betas, means, variances) for t in _padded(group, n)), so)
    for name, group in (("biases", biases), ("bn_weights", gammas), ("bn_biases", betas)):
        if None in group and any(t is not None and t.requires_grad for t in group):
            # torch.library's autograd takes a list holding None for a constant: these tensors
            # would silently get no gradient.
            raise RuntimeError(
                f"fused_mlp::mlp_forward: {name} mixes None with tensors that require grad, and the op's autograd "
                "cannot see tensors in such a list; pass every entry or none, or call fused_mlp.nn.FusedMLP"
            )
    ctx.needs = [input.requires_grad] + [t is not None and t.requires_grad for t in tensors]
    ctx.config, ctx.shapes = config, (len(gammas), len(betas), len(means), len(variances))
    ctx.given = [list(group) for group in (weights, biases, gammas, betas, means, variances)]
    _, hidden, pre_bn, mean, invstd, _ = output
    if batch_norm and use_batch_stats:
        hidden = ()  # recomputed from pre_bn by mlp_backward
    ctx.save_for_backward(input, *tensors, *hidden, *pre_bn, *mean, *invstd)


def _op_backward(ctx, grad_out, *_):
    config, needs = ctx.config, ctx.needs
    saved = ctx.saved_tensors
    count = 2 * (config.layers + 1) + 4 * config.n_bn + 1
    tensors, outputs = saved[1 : 1 + count], saved[1 + count :]
    if grad_out is None or not any(needs):
        grads = [None] * (1 + count)
    else:
        grads = list(_mlp_gradients(config, saved[0], tensors, outputs, needs, grad_out))
    linears, n = config.layers + 1, config.n_bn
    rest = grads[1 + 2 * linears :]
    groups = [rest[k * n : (k + 1) * n] if size else [] for k, size in enumerate(ctx.shapes)]
    groups = [grads[1 : 1 + linears], grads[1 + linears : 1 + 2 * linears], *groups]
    # A list holding None reached autograd as one constant: its gradient is None.
    lists = [None if None in given else group for given, group in zip(ctx.given, groups)]
    return (grads[0], *lists, *([None] * 5))


torch.library.register_autograd(_MLP_FORWARD, _op_backward, setup_context=_op_setup_context)


def _register_list_recompute(name):
    """register_autograd for an op with Tensor[] arguments, differentiating its reference maths
    (reference.<name>) from the flat tensors. A list holding None reaches autograd as one constant
    (torch.library's rule) and gets None."""
    fn, op = getattr(reference, name), getattr(torch.ops.fused_mlp, name).default

    def setup_context(ctx, inputs, output):
        spec = []
        flat = []
        for a in inputs:
            if isinstance(a, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in a):
                spec.append(len(a))
                flat.extend(a)
            elif isinstance(a, torch.Tensor):
                spec.append(-1)
                flat.append(a)
            else:
                spec.append(None)
        ctx.spec, ctx.others = spec, [a if s is None else None for a, s in zip(inputs, spec)]
        ctx.save_for_backward(*flat)

    def rebuild(spec, others, flat):
        args, k = [], 0
        for s, other in zip(spec, others):
            if s is None:
                args.append(other)
            elif s < 0:
                args.append(flat[k])
                k += 1
            else:
                args.append(list(flat[k : k + s]))
                k += s
        return args

    def backward(ctx, *grads):
        flat = ctx.saved_tensors
        spec, others = ctx.spec, ctx.others

        def flat_fn(*tensors):
            out = fn(*rebuild(spec, others, tensors))
            return tuple(t for item in out for t in (item if isinstance(item, (list, tuple)) else (item,)))

        flat_grads = [g for item in grads for g in (item if isinstance(item, (list, tuple)) else (item,))]
        needs = [t.requires_grad or t.is_floating_point() for t in flat]
        got = _recompute_vjp(flat_fn, flat, needs, flat_grads)
        result = rebuild(spec, [None] * len(spec), got)
        return tuple(r if s is not None else None for r, s in zip(result, spec))

    torch.library.register_autograd(op, backward, setup_context=setup_context)


_register_list_recompute("mlp_backward")
