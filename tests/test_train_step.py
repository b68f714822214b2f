"""fused_mlp.TrainStep: the whole training step as one op, against the standard fused path
(model(x), fused_mlp.cross_entropy, backward, optimizer.step()) from the same state and generator."""

import copy
import warnings

import pytest
import torch
from conftest import needs_extension

import fused_mlp
from fused_mlp import functional, reference
from fused_mlp.models import MLP
from fused_mlp.nn import FusedMLP, LinearBNReLU
from fused_mlp.step import TrainStep

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-dampening-maximize": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.3, maximize=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "adam-foreach-wd-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-2, amsgrad=True, foreach=True),
    "adam-maximize": lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.8, 0.99), eps=1e-6, maximize=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
}
NETS = {
    "batchnorm-dropout": dict(hidden=(24, 16, 12), batch_norm=True, dropout=0.3),
    "no-batchnorm": dict(hidden=(24, 12), batch_norm=False, dropout=0.0),
    "no-batchnorm-dropout": dict(hidden=(24, 12), batch_norm=False, dropout=0.2),
}


def make(net, optimizer, seed=0):
    torch.manual_seed(seed)
    model = MLP(in_features=40, num_classes=5, **NETS[net])
    return model, OPTIMIZERS[optimizer](model.parameters())


def batch(step, rows=16):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(rows, 1, 5, 8, generator=g), torch.randint(0, 5, (rows,), generator=g)


def standard_step(model, optimizer, x, y, label_smoothing=0.0):
    optimizer.zero_grad(set_to_none=True)
    loss = functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    loss.backward()
    optimizer.step()
    return loss.detach()


def pre_bn_bias(name, model):
    """The Linear biases just before a BatchNorm: their gradient is zero in exact arithmetic."""
    return model.batch_norm and name.startswith("hidden.") and name.endswith("linear.bias")


def assert_state_close(a, b, rtol, atol):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            torch.testing.assert_close(sa[k][name], sb[k][name], rtol=rtol, atol=atol, msg=f"state {k} {name}")


@pytest.mark.cpu_parity
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_gradients_are_the_standard_paths_bit_for_bit(net, optimizer):
    model, opt = make(net, optimizer)
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[optimizer](twin.parameters())
    step = TrainStep(model, opt, keep_grads=True, strict=True)
    x, y = batch(0)
    torch.manual_seed(7)
    loss = step(x, y)
    assert step.fallback_reason is None
    torch.manual_seed(7)
    twin_opt.zero_grad()
    want = functional.cross_entropy(twin(x), y)
    want.backward()
    assert torch.equal(loss, want.detach())
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.cpu_parity
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_steps_match_the_standard_path(net, optimizer):
    model, opt = make(net, optimizer)
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[optimizer](twin.parameters())

    def after_one(model, opt, twin, twin_opt):  # parameters and state within 1e-6
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
        assert_state_close(opt, twin_opt, 1e-6, 1e-7)

    run_against_the_standard_path(model, opt, twin, twin_opt, 20, batch, after_one)
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # .grad is not written by default
    model.eval()
    twin.eval()
    with torch.no_grad():  # the folded-weight cache saw the in-place updates
        x, _ = batch(99)
        torch.testing.assert_close(model(x), twin(x), rtol=1e-4, atol=1e-5)


def run_against_the_standard_path(model, opt, twin, twin_opt, steps, batches, after_one=None):
    """`steps` TrainSteps of model against standard steps of its twin from the same generator: the
    losses within 1e-4 at every step, the parameters within 1e-4 and 1e-5 at the end (but the biases
    before a BatchNorm, which Adam moves on rounding noise alone)."""
    step = TrainStep(model, opt, strict=True)
    for k in range(steps):
        x, y = batches(k)
        torch.manual_seed(k)
        got = step(x, y)
        torch.manual_seed(k)
        want = standard_step(twin, twin_opt, x, y)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
        if k == 0 and after_one is not None:
            after_one(model, opt, twin, twin_opt)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if not pre_bn_bias(name, model):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "optimizer", ["adam-foreach-wd-amsgrad", "adam-maximize", "adamw", "sgd-nesterov-wd", "sgd-dampening-maximize"]
)
def test_an_update_split_among_threads_matches_the_standard_path(optimizer):
    """A weight of 41 x 1001 = 41041 elements: its update is split among two threads, and it ends in
    a partial vector (of AVX-512's 16 lanes and AVX2's 8), which the last thread's range holds.
    Every element against the standard path after one step and after three, as the small nets'."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = MLP(in_features=1001, num_classes=5, hidden=(41,), batch_norm=False, dropout=0.0)
        opt = OPTIMIZERS[optimizer](model.parameters())
        twin = copy.deepcopy(model)
        twin_opt = OPTIMIZERS[optimizer](twin.parameters())
        assert model.hidden[0].linear.weight.numel() % 16 and model.hidden[0].linear.weight.numel() > 2 * 16384

        def batches(k):
            g = torch.Generator().manual_seed(200 + k)
            return torch.randn(32, 1001, generator=g), torch.randint(0, 5, (32,), generator=g)

        def after_one(model, opt, twin, twin_opt):
            for (name, p), q in zip(model.named_parameters(), twin.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
            assert_state_close(opt, twin_opt, 1e-6, 1e-7)

        run_against_the_standard_path(model, opt, twin, twin_opt, 3, batches, after_one)
        assert_state_close(opt, twin_opt, 1e-5, 1e-6)
    finally:
        torch.set_num_threads(threads)


@needs_extension
def test_one_op_and_no_optimizer_step():
    model, opt = make("batchnorm-dropout", "adam")
    step = TrainStep(model, opt, strict=True)
    x, y = batch(0)
    step(x, y)  # the first step creates the state
    with torch.profiler.profile() as prof:
        step(x, y)
    names = [e.name for e in prof.events()]
    assert names.count("fused_mlp::mlp_train_step") == 1
    assert not any("Optimizer.step" in n for n in names)
    assert not any("autograd::engine" in n for n in names)


def test_eval_mode_uses_running_statistics_and_no_dropout():
    model, opt = make("batchnorm-dropout", "sgd-momentum")
    for _ in range(3):  # some running statistics
        x, y = batch(_)
        TrainStep(model, opt)(x, y)
    model.eval()
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS["sgd-momentum"](twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = [b.clone() for b in model.buffers()]
    x, y = batch(5)
    got = TrainStep(model, opt, strict=True)(x, y)
    want = standard_step(twin, twin_opt, x, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for b, c in zip(model.buffers(), before):
        assert torch.equal(b, c)  # eval: no running-statistics update
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
def test_switching_paths_continues_the_same_run(optimizer):
    model, opt = make("batchnorm-dropout", optimizer)
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[optimizer](twin.parameters())
    step = TrainStep(model, opt, strict=True)
    for k in range(8):
        x, y = batch(k)
        torch.manual_seed(k)
        got = step(x, y) if k % 3 != 1 else standard_step(model, opt, x, y)
        torch.manual_seed(k)
        want = standard_step(twin, twin_opt, x, y)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if not pre_bn_bias(name, model):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert_state_close(opt, twin_opt, 1e-4, 1e-5)


def test_state_dict_and_schedulers_work_unchanged():
    model, opt = make("batchnorm-dropout", "adam")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step = TrainStep(model, opt, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        for k in range(3):
            step(*batch(k))
            scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 8)
    state = opt.state_dict()
    for entry in state["state"].values():
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        assert entry["step"].item() == 3 and entry["step"].dtype == torch.float32
    fresh_model = copy.deepcopy(model)
    fresh = torch.optim.Adam(fresh_model.parameters(), lr=1e-3, fused=True)
    fresh.load_state_dict(copy.deepcopy(state))
    x, y = batch(10)
    torch.manual_seed(3)
    got = TrainStep(fresh_model, fresh, strict=True)(x, y)
    torch.manual_seed(3)
    want = standard_step(model, opt, x, y)  # the lr schedule came with the state: the same step
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("net", NETS)
def test_the_loss_comes_back_detached(net):
    """As the standard path's loss.detach(): no grad_fn, nothing for a stray loss.backward() to reach."""
    model, opt = make(net, "adam")
    step = TrainStep(model, opt, strict=True)
    for k in range(2):
        loss = step(*batch(k))
        assert step.fallback_reason is None
        assert not loss.requires_grad and loss.grad_fn is None and loss.dim() == 0


def test_keep_grads_fills_grad_and_default_leaves_none():
    model, opt = make("no-batchnorm", "sgd")
    TrainStep(model, opt)(*batch(0))
    assert all(p.grad is None for p in model.parameters())
    TrainStep(model, opt, keep_grads=True)(*batch(1))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- fallbacks --------------------------------------------------------------------------------------


def frozen(model, opt):
    model.hidden[0].linear.weight.requires_grad_(False)
    return model, opt


def hooked(model, opt):
    model.hidden[0].register_forward_hook(lambda *a: None)
    return model, opt


def other_optimizer(model, opt):
    return model, torch.optim.RMSprop(model.parameters(), lr=1e-3)


def step_hook(model, opt):
    opt.register_step_post_hook(lambda *a: None)
    return model, opt


def baseline(model, opt):
    model.impl = "baseline"
    return model, opt


SETUP_FALLBACKS = {
    "a parameter does not require grad": frozen,
    "a module has hooks": hooked,
    "the optimizer is a RMSprop": other_optimizer,
    "the optimizer has step hooks": step_hook,
    "impl is 'baseline'": baseline,
}


@pytest.mark.parametrize("reason", SETUP_FALLBACKS)
def test_what_the_fast_path_cannot_express_falls_back_with_the_same_results(reason):
    model, opt = SETUP_FALLBACKS[reason](*make("batchnorm-dropout", "adam"))
    twin = copy.deepcopy(model)
    twin_opt = type(opt)(twin.parameters(), **{k: v for k, v in opt.defaults.items() if k != "params"})
    with pytest.raises(ValueError, match=f"TrainStep: .*{reason}"):
        TrainStep(model, opt, strict=True)
    step = TrainStep(model, opt)
    with pytest.warns(UserWarning, match=f"^TrainStep runs the standard path: .*{reason}") as record:
        for k in range(2):
            x, y = batch(k)
            torch.manual_seed(k)
            got = step(x, y)
            torch.manual_seed(k)
            want = standard_step(twin, twin_opt, x, y)
            assert torch.equal(got, want)
    assert len([w for w in record if "TrainStep" in str(w.message)]) == 1  # once
    assert reason in step.fallback_reason


def test_a_layer_replaced_around_the_same_tensors_is_seen():
    """A hidden layer swapped for a new module holding the same Linear and BatchNorm (so the same
    tensors): the step sees the new module, and the hook on it sends the step down the standard path."""
    model, opt = make("batchnorm-dropout", "adam")
    step = TrainStep(model, opt, strict=True)
    for k in range(2):  # the second step's plan holds the optimizer state the first one made
        step(*batch(k))
    plan = step._plan
    old = model.hidden[0]
    new = LinearBNReLU(old.linear.in_features, old.linear.out_features, dropout=old.dropout)
    new.linear, new.bn = old.linear, old.bn
    model.hidden[0] = new
    step(*batch(2))  # the same tensors and no hooks: still the fast path, on a new plan
    assert step.fallback_reason is None and step._plan is not plan
    new.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="TrainStep: a module has hooks"):
        step(*batch(3))


def replace_exp_avg(model, opt):
    p = model.out.weight
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].clone()


def replace_counter(model, opt):
    bn = model.hidden[1].bn
    bn.num_batches_tracked = bn.num_batches_tracked.clone()


def change_momentum(model, opt):
    model.hidden[0].bn.momentum = 0.5


def replace_state(model, opt):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


@pytest.mark.parametrize("change", [replace_exp_avg, replace_counter, change_momentum, replace_state])
def test_what_the_plan_was_built_from_replaced_or_changed_between_steps_is_seen(change):
    """A state tensor, a BatchNorm counter or the whole optimizer state replaced, or a BatchNorm
    momentum changed, between two steps: the next step reads and writes the new ones, as the standard
    path does."""
    model, opt = make("batchnorm-dropout", "adam")
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS["adam"](twin.parameters())

    def after_one(model, opt, twin, twin_opt):
        change(model, opt)
        change(twin, twin_opt)

    run_against_the_standard_path(model, opt, twin, twin_opt, 3, batch, after_one)
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_state_close(opt, twin_opt, 1e-4, 1e-5)


def test_a_parameter_replaced_outside_the_optimizer_is_seen():
    model, opt = make("no-batchnorm", "sgd")
    step = TrainStep(model, opt, strict=True)
    step(*batch(0))
    model.out.weight = torch.nn.Parameter(model.out.weight.detach().clone())
    with pytest.raises(ValueError, match="the optimizer's parameters are not exactly the model's"):
        step(*batch(1))


def test_call_fallbacks_and_strict():
    model, opt = make("batchnorm-dropout", "sgd")
    step = TrainStep(model, opt, strict=True)
    x, y = batch(0)
    with pytest.raises(ValueError, match="TrainStep: the targets are class probabilities"):
        step(x, torch.softmax(torch.randn(16, 5), 1))
    with pytest.raises(ValueError, match="TrainStep: autocast is enabled"), torch.autocast("cpu", dtype=torch.bfloat16):
        step(x, y)
    lenient = TrainStep(model, opt, label_smoothing=0.1)
    with pytest.warns(UserWarning, match="class probabilities"):
        lenient(x, torch.softmax(torch.randn(16, 5), 1))
    lenient(x, y)
    assert lenient.fallback_reason is None


def test_distributed_data_parallel_falls_back():
    model, opt = make("no-batchnorm", "sgd")
    ddp = torch.nn.Module.__new__(torch.nn.parallel.DistributedDataParallel)  # not initialized: type only
    torch.nn.Module.__init__(ddp)
    assert "DistributedDataParallel" in TrainStep(ddp, opt)._setup_reason()


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (lambda x, y: (x, y.clone().fill_(7)), IndexError, "out of bounds"),
        (lambda x, y: (x, y[:-1]), ValueError, "must have shape"),
        (lambda x, y: (x, y.int()), TypeError, "int64"),
        (lambda x, y: (x[:, :, :, :7], y), ValueError, "features"),
        (lambda x, y: (x.double(), y), TypeError, "dtype"),
        (lambda x, y: (x[:1], y[:1]), ValueError, "more than 1 value"),
    ],
)
def test_bad_input_raises_the_models_errors_and_changes_nothing(bad, error, match):
    model, opt = make("batchnorm-dropout", "adam")
    step = TrainStep(model, opt)
    step(*batch(0))
    before_model = copy.deepcopy(model.state_dict())
    before_opt = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        step(*bad(*batch(1)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]), k
    after = opt.state_dict()["state"]
    for k, entry in before_opt["state"].items():
        for name, v in entry.items():
            assert torch.equal(after[k][name], v), (k, name)


def test_constructor_arguments_are_checked():
    model, opt = make("no-batchnorm", "sgd")
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainStep(model, opt, label_smoothing=1.5)
    with pytest.raises(TypeError, match="optimizer"):
        TrainStep(model, object())


# --- the op against the reference ----------------------------------------------------------------


def op_arguments(net, optimizer, seed=0):
    """mlp_train_step's arguments for a small network and optimizer, after one TrainStep (so the
    state holds values), built by TrainStep itself, with label smoothing and every gradient kept."""
    model, opt = make(net, optimizer, seed)
    step = TrainStep(model, opt, label_smoothing=0.05, keep_grads=True, strict=True)
    step(*batch(0))
    x, y = batch(1)
    plan = step._current_plan()
    momenta = [0.1] * len(plan.counters) if plan.update else []
    return step.op_arguments(plan, x.flatten(1), y, momenta, step._hyperparameters(plan), torch.tensor([12345, 6]))


def cloned(value):
    """value with every tensor in it (in lists too) copied."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [cloned(v) for v in value]
    return value


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("optimizer", ["sgd-nesterov-wd", "sgd-dampening-maximize", "adam-foreach-wd-amsgrad", "adamw"])
def test_op_matches_the_reference(backend, net, optimizer):
    """mlp_train_step of each backend (the CPU kernels, the CUDA kernels in the simulation and on a
    GPU) against fused_mlp.reference's, from the same state: the loss, and every tensor it writes."""
    args = op_arguments(net, optimizer)
    mine, theirs = list(backend.to(cloned(args))), cloned(args)
    loss = backend.mlp_train_step(*mine)
    want = reference.mlp_train_step(*theirs)
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-5, atol=1e-6)
    written = 0
    for a, b in zip(mine, theirs):
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            for t, u in zip(a, b):
                if t is not None:
                    torch.testing.assert_close(t.cpu(), u, rtol=1e-5, atol=1e-6)
                    written += 1
    assert written > 3 * len(args[2])


@needs_extension
def test_op_checks_its_optimizer_arguments():
    args = op_arguments("no-batchnorm", "adam")
    bad = list(args)
    bad[16] = torch.zeros(1, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="group_hyperparameters must be a contiguous float64 tensor"):
        torch.ops.fused_mlp.mlp_train_step(*bad)
    bad = list(args)
    bad[17] = [0] * (len(args[17]) - 1)
    with pytest.raises(RuntimeError, match="param_groups must name the group"):
        torch.ops.fused_mlp.mlp_train_step(*bad)
    bad = list(args)
    bad[19] = args[19][:-1]
    with pytest.raises(RuntimeError, match="first_moments must have one tensor per parameter"):
        torch.ops.fused_mlp.mlp_train_step(*bad)
    bad = list(args)
    bad[15] = 7
    with pytest.raises(RuntimeError, match="optimizer must be 0"):
        torch.ops.fused_mlp.mlp_train_step(*bad)


def test_fused_mlp_exports_trainstep():
    assert fused_mlp.TrainStep is TrainStep
    assert issubclass(MLP, FusedMLP)


# --- CUDA ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _NoHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any op that brings a tensor's value to the host (.item(), a comparison's bool, a copy
    to the CPU of a tensor that is not already there)."""

    READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::item"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        assert name not in self.READS, f"the host sequence read a device value through {name}"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
def test_simulated_host_sequence_reads_no_device_value(optimizer):
    """The CUDA host sequence of mlp_train_step, run in the simulation with every tensor (the step
    counters included) where the device's would be: no ATen call reads a value back."""
    import simulated

    args = op_arguments("batchnorm-dropout", optimizer)
    args[16] = args[16].clone()  # group_hyperparameters, "on the device"
    network = simulated.load("mlp")
    with _NoHostReads():
        loss = network.mlp_train_step(*cloned(args))
    assert torch.isfinite(loss)


def cuda_batch(step, rows=16):
    x, y = batch(step, rows)
    return x.cuda(), y.cuda()


@needs_cuda
@needs_extension
@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam", "adamw"])
def test_on_the_gpu_steps_match_the_standard_path(optimizer):
    model, _ = make("batchnorm-dropout", optimizer)
    model.cuda()
    opt = OPTIMIZERS[optimizer](model.parameters())
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[optimizer](twin.parameters())
    run_against_the_standard_path(model, opt, twin, twin_opt, 10, cuda_batch)


@needs_cuda
@needs_extension
@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
def test_cuda_graph_replays_what_eager_steps_compute(optimizer):
    """TrainStep(cuda_graph=True) against eager TrainStep: the same losses and parameters while a
    scheduler changes the learning rate between replays, a second input shape (a last partial
    batch) getting its own graph."""
    model, _ = make("batchnorm-dropout", optimizer)
    model.cuda()
    build = {
        "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    }[optimizer]
    opt = build(model.parameters())
    twin = copy.deepcopy(model)
    twin_opt = build(twin.parameters())
    graphed = TrainStep(model, opt, cuda_graph=True, strict=True)
    eager = TrainStep(twin, twin_opt, strict=True)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.9) for o in (opt, twin_opt)]
    for k in range(12):
        rows = 16 if k % 4 else 12
        x, y = cuda_batch(k, rows)
        torch.manual_seed(k)
        got = graphed(x, y)
        torch.manual_seed(k)
        want = eager(x, y)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for s in schedulers:
            s.step()
    assert all("graph" in entry for entry in graphed._graphs["shapes"].values())
    assert len(graphed._graphs["shapes"]) == 2
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
