"""The class-notes MLP: one model, two implementations."""

import pytest
import torch
import torch.nn.functional as F

from fused_mlp.models import MLP

KEYS = [
    f"hidden.{i}.{part}"
    for i in range(4)
    for part in (
        "linear.weight",
        "linear.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    )
] + ["out.weight", "out.bias"]


def test_state_dict_keys_are_the_same_for_every_impl():
    for impl in ("fused", "baseline"):
        assert list(MLP(impl=impl).state_dict().keys()) == KEYS
    plain = MLP(hidden=(128, 64), batch_norm=False)
    assert list(plain.state_dict().keys()) == [
        "hidden.0.linear.weight",
        "hidden.0.linear.bias",
        "hidden.1.linear.weight",
        "hidden.1.linear.bias",
        "out.weight",
        "out.bias",
    ]


@pytest.mark.parametrize("batch_norm", [True, False])
def test_impls_compute_the_same_model(batch_norm):
    torch.manual_seed(0)
    fused = MLP(impl="fused", batch_norm=batch_norm, dropout=0.0)
    baseline = MLP(impl="baseline", batch_norm=batch_norm, dropout=0.0)
    baseline.load_state_dict(fused.state_dict())  # checkpoints interchange with no mapping
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for training in (True, False):
        fused.train(training)
        baseline.train(training)
        lf, lb = fused.loss(fused(x), y), baseline.loss(baseline(x), y)
        torch.testing.assert_close(lf, lb, rtol=1e-5, atol=1e-5)
        lf.backward()
        lb.backward()
        for (name, p), (_, q) in zip(fused.named_parameters(), baseline.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        fused.zero_grad()
        baseline.zero_grad()
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(baseline.state_dict()[k], v)


def test_impl_switches_on_a_live_model():
    torch.manual_seed(0)
    model = MLP(dropout=0.0).eval()
    x = torch.randn(8, 784)
    fused_out = model(x)
    model.impl = "baseline"
    torch.testing.assert_close(model(x), fused_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl must be one of"):
        model.impl = "cuda"


def test_log_prob_predict_and_the_nll_on_logits_pitfall():
    torch.manual_seed(0)
    model = MLP(dropout=0.0).eval()
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    logits = model(x)
    torch.testing.assert_close(model.log_prob(x), F.log_softmax(logits, 1))
    assert torch.equal(model.predict(x), logits.argmax(1))
    right = model.loss(logits, y)
    torch.testing.assert_close(right, F.cross_entropy(logits, y))
    # What the docs warn about: nll_loss on logits runs, and is wrong.
    assert not torch.allclose(F.nll_loss(logits, y), right)
