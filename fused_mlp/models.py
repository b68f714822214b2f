"""The class-notes MLP, in a stock and a fused implementation that are the same model."""

import torch
import torch.nn.functional as F

from .functional import cross_entropy
from .nn import FusedMLP

__all__ = ["MLP", "IMPLS"]

#: The implementations of MLP.forward / MLP.loss. ("compile", the baseline under torch.compile,
#: is chosen by the training script: it wraps the model, the model itself stays "baseline".)
IMPLS = ("baseline", "fused")


class MLP(FusedMLP):
    """Flatten, then per hidden layer Linear -> BatchNorm1d -> ReLU -> Dropout, then a Linear to
    the class logits.

    impl="baseline" runs the stock modules the class notes teach (nn.Linear, nn.BatchNorm1d,
    F.relu, nn.Dropout) and takes F.log_softmax + F.nll_loss as its loss; impl="fused" runs the
    whole network as fused_mlp.nn.FusedMLP does (one op per pass) and takes the fused
    cross-entropy. Both hold the same parameters under the same names (``hidden.{i}.linear.*``,
    ``hidden.{i}.bn.*``, ``out.*``), so a checkpoint of one loads into the other, and
    ``model.impl`` can be switched on a live model.

    With batch_norm=False the hidden layers are Linear -> ReLU (-> Dropout), fused the same way.

    forward returns logits, always. Use ``model.loss(logits, target)`` for the loss: F.nll_loss
    expects log-probabilities, and applied to logits it returns a wrong loss without any error.
    """

    def __init__(
        self, in_features=784, hidden=(512, 256, 128, 64), num_classes=10, dropout=0.3, batch_norm=True, impl="fused"
    ):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP: dropout must be in [0, 1), got {dropout}")
        super().__init__(in_features, hidden, num_classes, batch_norm=batch_norm, dropout=dropout)
        self.impl = impl

    @property
    def impl(self):
        return self._impl

    @impl.setter
    def impl(self, value):
        if value not in IMPLS:
            raise ValueError(f"MLP: impl must be one of {IMPLS}, got {value!r}")
        self._impl = value

    def forward(self, x):
        x = torch.flatten(x, 1)
        if self.impl == "fused":
            return super().forward(x)  # one op for the whole network
        for layer in self.hidden:
            x = layer.linear(x)
            if self.batch_norm:
                x = layer.bn(x)
            x = self.drop(F.relu(x))
        return self.out(x)

    def loss(self, logits, target):
        """The mean cross-entropy of the logits, computed the way this impl computes it."""
        if self.impl == "fused":
            return cross_entropy(logits, target)
        return F.nll_loss(F.log_softmax(logits, dim=1), target)

    def log_prob(self, x):
        return F.log_softmax(self(x), dim=1)

    @torch.no_grad()
    def predict(self, x):
        return self(x).argmax(dim=1)

    def extra_repr(self):
        return f"impl={self.impl!r}, batch_norm={self.batch_norm}, dropout={self.drop.p}"
