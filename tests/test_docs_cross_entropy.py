"""The worked example of docs/cross_entropy.md against torch and fused_mlp.

The example's inputs are read from the doc too, so editing them without recomputing the numbers
fails here.
"""

import ast
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

import fused_mlp

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "cross_entropy.md"

INPUTS = {"x", "target", "weight", "label_smoothing"}
RESULTS = {
    "m",
    "exp_shifted",
    "sumexp",
    "lse",
    "p",
    "nll",
    "smooth",
    "loss_none",
    "divisor",
    "loss_mean",
    "a",
    "b",
    "scale",
    "grad",
}

# The doc rounds to 4 decimals, so a right number is within half a unit in the last place; a
# tolerance of a full unit would let a one-digit typo through.
ATOL = 0.5e-4 + 1e-9

IMPLS = {"torch": F.cross_entropy, "fused_mlp": fused_mlp.cross_entropy}


def parse_worked_example(text):
    """name -> value of every `name = <Python literal>` entry in the fenced blocks between the
    worked-example markers. An entry may continue over lines; `#` starts a comment."""
    section = re.search(r"<!-- worked-example:begin -->(.*?)<!-- worked-example:end -->", text, re.S)
    assert section, "worked-example markers not found"
    entries = {}
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", section.group(1), re.S | re.M):
        name = None
        for line in block.splitlines():
            start = re.match(r"(\w+) = (.*)", line)
            if start:
                name = start.group(1)
                assert name not in entries, f"{name} is given twice"
                entries[name] = start.group(2)
            elif line.strip():
                assert name is not None, f"text outside an entry: {line!r}"
                entries[name] += "\n" + line
    return {name: ast.literal_eval(source) for name, source in entries.items()}


@pytest.fixture(scope="module")
def doc():
    return parse_worked_example(DOC.read_text())


@pytest.fixture(scope="module")
def inputs(doc):
    x = torch.tensor(doc["x"], dtype=torch.float64)
    target = torch.tensor(doc["target"], dtype=torch.int64)
    weight = torch.tensor(doc["weight"], dtype=torch.float64)
    return x, target, weight, float(doc["label_smoothing"])


def assert_close(doc_value, actual, name):
    expected = torch.as_tensor(doc_value, dtype=torch.float64)
    actual = torch.as_tensor(actual, dtype=torch.float64).detach()
    assert expected.shape == actual.shape, (
        f"{name}: shape {tuple(expected.shape)} in the doc, {tuple(actual.shape)} computed"
    )
    torch.testing.assert_close(expected, actual, rtol=0, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_doc_gives_exactly_the_checked_numbers(doc):
    # An unchecked number in the example could go stale unnoticed.
    assert set(doc) == INPUTS | RESULTS


def test_softmax_quantities(doc, inputs):
    x, target, weight, eps = inputs
    m = x.amax(dim=1)
    assert_close(doc["m"], m, "m")
    assert_close(doc["exp_shifted"], (x - m[:, None]).exp(), "exp_shifted")
    assert_close(doc["sumexp"], (x - m[:, None]).exp().sum(dim=1), "sumexp")
    assert_close(doc["lse"], torch.logsumexp(x, dim=1), "lse")
    assert_close(doc["p"], torch.softmax(x, dim=1), "p")
    # The logsumexp the kernel saves for backward.
    _, lse = fused_mlp.ops.cross_entropy_forward(x, target, weight, 0, -100, eps)
    assert_close(doc["lse"], lse, "lse (fused_mlp.ops)")


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_terms(doc, inputs, impl):
    x, target, weight, eps = inputs
    ce = IMPLS[impl]
    assert_close(doc["nll"], ce(x, target, weight=weight, reduction="none"), f"nll ({impl})")
    # An all-ones probability target turns sum_c w_c t_c (lse - x_c) into the smoothing term.
    smooth = ce(x, torch.ones_like(x), weight=weight, reduction="none")
    assert_close(doc["smooth"], smooth, f"smooth ({impl})")
    loss_none = ce(x, target, weight=weight, label_smoothing=eps, reduction="none")
    assert_close(doc["loss_none"], loss_none, f"loss_none ({impl})")
    loss_mean = ce(x, target, weight=weight, label_smoothing=eps)
    assert_close(doc["loss_mean"], loss_mean, f"loss_mean ({impl})")
    # The divisor the implementation used, recovered from its sum and mean.
    loss_sum = ce(x, target, weight=weight, label_smoothing=eps, reduction="sum")
    assert_close(doc["divisor"], loss_sum / loss_mean, f"divisor ({impl})")
    assert_close(doc["divisor"], weight[target].sum(), "divisor (sum of w_y)")


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient(doc, inputs, impl):
    x, target, weight, eps = inputs
    ce = IMPLS[impl]
    classes = x.shape[1]
    rows = torch.arange(x.shape[0])
    w_y = weight[target]
    a = (1 - eps) * w_y + eps / classes * weight.sum()
    b = (eps / classes * weight).expand_as(x).clone()
    b[rows, target] += (1 - eps) * w_y
    assert_close(doc["a"], a, "a")
    assert_close(doc["b"], b, "b")

    p = torch.softmax(x, dim=1)
    x_none = x.clone().requires_grad_()
    ce(x_none, target, weight=weight, label_smoothing=eps, reduction="none").sum().backward()
    # The per-row gradient is exactly p * a - b, not just close to the doc's rounding of it.
    torch.testing.assert_close(x_none.grad, p * a[:, None] - b, rtol=0, atol=1e-12)

    x_mean = x.clone().requires_grad_()
    ce(x_mean, target, weight=weight, label_smoothing=eps).backward()
    assert_close(doc["grad"], x_mean.grad, f"grad ({impl})")
    assert_close(doc["scale"], x_mean.grad[0, 0] / x_none.grad[0, 0], f"scale ({impl})")
