"""torch.func on the fused ops, the layer module and the MLP: grad, vjp, jacrev, vmap (with
dropout randomness and running statistics), per-sample gradients, and forward mode refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap

from fused_mlp import functional
from fused_mlp.models import MLP
from fused_mlp.nn import LinearBNReLU

TOL = dict(rtol=1e-5, atol=1e-5)


def close(a, b):
    torch.testing.assert_close(a, b, **TOL)


def tree_close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            close(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            tree_close(x, y)
    else:
        close(a, b)


# --- cross-entropy ------------------------------------------------------------------------------


def ce_data(prob):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g)
    t = torch.softmax(torch.randn(8, 6, generator=g), 1) if prob else torch.randint(0, 6, (8,), generator=g)
    return x, t


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_grad_vjp_jacrev(prob, reduction):
    x, t = ce_data(prob)
    w = torch.rand(6) + 0.5

    def losses(fn):
        return lambda x, t: fn(x, t, w, reduction=reduction, label_smoothing=0.1)

    mine, stock = losses(functional.cross_entropy), losses(F.cross_entropy)
    argnums = (0, 1) if prob else 0
    tree_close(jacrev(mine, argnums=argnums)(x, t), jacrev(stock, argnums=argnums)(x, t))
    if reduction != "none":
        tree_close(grad(mine, argnums=argnums)(x, t), grad(stock, argnums=argnums)(x, t))
    out, fn = vjp(lambda x: mine(x, t), x)
    out_s, fn_s = vjp(lambda x: stock(x, t), x)
    close(out, out_s)
    cotangent = torch.randn_like(out)
    tree_close(fn(cotangent), fn_s(cotangent))


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_cross_entropy_vmap_and_per_sample_gradients(prob):
    x, t = ce_data(prob)
    xb, tb = x.reshape(2, 4, 6), t.reshape(2, 4, *t.shape[1:])
    ignore = {} if prob else {"ignore_index": 2}
    for reduction in ("mean", "sum", "none"):
        close(
            vmap(lambda a, b: functional.cross_entropy(a, b, reduction=reduction, **ignore))(xb, tb),
            vmap(lambda a, b: F.cross_entropy(a, b, reduction=reduction, **ignore))(xb, tb),
        )

    def per_sample(fn):
        return vmap(grad(lambda a, b: fn(a[None], b[None])))(x, t)

    close(per_sample(functional.cross_entropy), per_sample(F.cross_entropy))


def test_cross_entropy_hessian_by_reverse_mode_equals_stock():
    x, t = ce_data(False)
    x = x[:3]
    close(
        jacrev(jacrev(lambda x: functional.cross_entropy(x, t[:3])))(x),
        jacrev(jacrev(lambda x: F.cross_entropy(x, t[:3])))(x),
    )


def test_vmap_runs_without_the_batched_fallback():
    x, t = ce_data(False)
    import warnings

    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vmap(grad(lambda a, b: functional.cross_entropy(a[None], b[None])))(x, t)
            layer = LinearBNReLU(6, 5, track_running_stats=False)
            vmap(lambda a: layer(a))(x.reshape(2, 4, 6))
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)


@pytest.mark.parametrize("transform", [jvp, jacfwd], ids=["jvp", "jacfwd"])
def test_forward_mode_is_refused_naming_the_alternative(transform):
    x, t = ce_data(False)
    fn = lambda x: functional.cross_entropy(x, t)  # noqa: E731
    with pytest.raises(NotImplementedError, match="jacrev"):
        transform(fn, (x,), (x,)) if transform is jvp else transform(fn)(x)
    layer = LinearBNReLU(6, 5, track_running_stats=False)
    with pytest.raises(NotImplementedError, match="create_graph"):
        jacfwd(lambda x: layer(x))(x)


# --- the layer ----------------------------------------------------------------------------------


def twins(dropout=0.0, **kwargs):
    torch.manual_seed(0)
    layer = LinearBNReLU(6, 5, dropout=dropout, **kwargs)
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.5, 0.5)
    stock = torch.nn.Sequential(layer.linear, layer.bn, torch.nn.ReLU())
    return layer, stock


@pytest.mark.parametrize("train", [True, False], ids=["batch_stats", "running_stats"])
def test_layer_grad_vjp_jacrev_vmap(train):
    layer, stock = twins(track_running_stats=False) if train else twins()
    layer.train(train)
    x = torch.randn(8, 6)
    params = dict(layer.named_parameters())

    def out(model):
        return lambda p, x: functional_call(
            model, {k.replace("linear", "0").replace("bn", "1") if model is stock else k: v for k, v in p.items()}, (x,)
        )

    mine, theirs = out(layer), out(stock)
    tree_close(grad(lambda p, x: mine(p, x).sum())(params, x), grad(lambda p, x: theirs(p, x).sum())(params, x))
    tree_close(jacrev(mine, argnums=1)(params, x), jacrev(theirs, argnums=1)(params, x))
    o, fn = vjp(lambda x: mine(params, x), x)
    o_s, fn_s = vjp(lambda x: theirs(params, x), x)
    close(o, o_s)
    cot = torch.randn_like(o)
    tree_close(fn(cot), fn_s(cot))
    xb = torch.randn(3, 8, 6)  # three independent batches, each with its own statistics
    close(vmap(mine, in_dims=(None, 0))(params, xb), vmap(theirs, in_dims=(None, 0))(params, xb))
    tree_close(
        vmap(grad(lambda p, x: mine(p, x).pow(2).sum()), in_dims=(None, 0))(params, xb),
        vmap(grad(lambda p, x: theirs(p, x).pow(2).sum()), in_dims=(None, 0))(params, xb),
    )


@pytest.mark.parametrize("transform", [vmap, grad, jacrev], ids=["vmap", "grad", "jacrev"])
def test_running_stats_update_under_a_transform_names_the_fix(transform):
    layer, stock = twins()
    state = copy.deepcopy(layer.state_dict())
    x = torch.randn(3, 8, 6) if transform is vmap else torch.randn(8, 6)
    fn = layer if transform is vmap else lambda x: layer(x).sum()
    with pytest.raises(RuntimeError, match="replace_all_batch_norm_modules_"):
        transform(fn)(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k  # nothing updated
    with pytest.raises(RuntimeError):  # stock refuses too
        transform(stock if transform is vmap else lambda x: stock(x).sum())(x)
    with pytest.raises(RuntimeError, match="replace_all_batch_norm_modules_"):
        grad(
            lambda x: functional.linear_bn_relu(
                x, layer.linear.weight, running_mean=torch.zeros(5), running_var=torch.ones(5)
            ).sum()
        )(x if x.dim() == 2 else x[0])


def test_replace_all_batch_norm_modules_makes_vmap_match_stock():
    layer, stock = twins()
    stock = copy.deepcopy(stock)
    torch.func.replace_all_batch_norm_modules_(layer)
    torch.func.replace_all_batch_norm_modules_(stock)
    xb = torch.randn(3, 8, 6)
    close(vmap(layer)(xb), vmap(stock)(xb))


def test_dropout_randomness_under_vmap():
    layer, _ = twins(dropout=0.5, track_running_stats=False)
    xb = torch.randn(1, 16, 6).expand(4, 16, 6)  # the same batch four times
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(layer)(xb)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(torch.nn.Dropout(0.5))(xb)  # as the stock module
    same = vmap(layer, randomness="same")(xb)
    assert all(torch.equal(same[0], s) for s in same[1:])
    different = vmap(layer, randomness="different")(xb)
    assert not any(torch.equal(different[0], d) for d in different[1:])
    # Each sample's output is the undropped one with about half its units zeroed, the rest doubled.
    layer.eval()
    layer.bn.train()
    full = layer(xb[0])
    active = full != 0
    for d in different:
        kept = d != 0
        assert not (kept & ~active).any()
        assert (kept[active]).float().mean().item() == pytest.approx(0.5, abs=0.15)
        close(d[kept], 2 * full[kept])


# --- the MLP ------------------------------------------------------------------------------------


def mlp_pair(batch_norm):
    torch.manual_seed(0)
    fused = MLP(in_features=12, hidden=(10, 8), num_classes=4, dropout=0.0, batch_norm=batch_norm, impl="fused")
    stock = copy.deepcopy(fused)
    stock.impl = "baseline"
    return fused, stock


def test_mlp_grad_vjp_jacrev_vmap_equal_stock():
    fused, stock = mlp_pair(batch_norm=True)
    for model in (fused, stock):
        torch.func.replace_all_batch_norm_modules_(model)
    x, t = torch.randn(6, 12), torch.randint(0, 4, (6,))
    params = {k: v.detach() for k, v in fused.named_parameters()}

    def loss(model):
        return lambda p: model.loss(functional_call(model, p, (x,)), t)

    tree_close(grad(loss(fused))(params), grad(loss(stock))(params))
    close(
        jacrev(lambda x: functional_call(fused, params, (x,)))(x),
        jacrev(lambda x: functional_call(stock, params, (x,)))(x),
    )
    out, fn = vjp(loss(fused), params)
    out_s, fn_s = vjp(loss(stock), params)
    close(out, out_s)
    tree_close(fn(torch.ones(())), fn_s(torch.ones(())))
    xb, tb = torch.randn(3, 6, 12), torch.randint(0, 4, (3, 6))  # three independent batches

    def batch_loss(model):
        return lambda x, t: model.loss(functional_call(model, params, (x,)), t)

    close(vmap(batch_loss(fused))(xb, tb), vmap(batch_loss(stock))(xb, tb))


def test_mlp_per_sample_gradients_without_batch_norm_equal_stock():
    fused, stock = mlp_pair(batch_norm=False)
    x, t = torch.randn(16, 12), torch.randint(0, 4, (16,))
    params = {k: v.detach() for k, v in fused.named_parameters()}

    def per_sample(model):
        def loss(p, x, t):
            return model.loss(functional_call(model, p, (x[None],)), t[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, t)

    tree_close(per_sample(fused), per_sample(stock))
