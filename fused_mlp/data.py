"""Fashion-MNIST and MNIST as in-memory tensors, batched by indexing.

Both sets fit in memory (60,000 + 10,000 images of 28 x 28 bytes), so they are read once,
normalized once, and each batch is a slice of a shuffled index: no per-sample transform pipeline.
A DataLoader over the same tensors (``make_loader``) remains for data that does not fit.
"""

import os
from dataclasses import dataclass

import torch

__all__ = ["DATASETS", "Splits", "default_data_dir", "load_splits", "Batches", "make_loader"]

DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST"}
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
VALIDATION_SIZE = 6000


class DatasetUnavailable(RuntimeError):
    """The dataset's files are missing and could not be downloaded."""


def default_data_dir():
    """FUSED_MLP_DATA if set, else ./data."""
    return os.environ.get("FUSED_MLP_DATA") or os.path.join(os.getcwd(), "data")


@dataclass
class Splits:
    """Normalized images (N, 1, 28, 28) float32 and labels (N,) int64 of each split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list
    mean: float
    std: float


def _torchvision_set(name, data_dir, train, download):
    import torchvision  # imported here: only training needs it

    cls = getattr(torchvision.datasets, DATASETS[name])
    raw = os.path.join(data_dir, DATASETS[name], "raw")
    try:
        return cls(data_dir, train=train, download=download)
    except Exception as err:  # torchvision raises RuntimeError, or URLError when offline
        raise DatasetUnavailable(
            f"{DATASETS[name]} is not in {raw} and could not be downloaded ({err}). Expected the "
            f"files {', '.join(RAW_FILES)} there (uncompressed IDX); copy them in, or run once "
            "with network access."
        ) from err


def load_splits(name="fashion", data_dir=None, seed=0, download=True, validation_size=VALIDATION_SIZE):
    """The training set split (seeded) into train / validation, and the test set, normalized with
    the mean and std of the training images."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(DATASETS)}")
    data_dir = data_dir or default_data_dir()
    train = _torchvision_set(name, data_dir, True, download)
    test = _torchvision_set(name, data_dir, False, download)
    x = train.data.float().div_(255.0)
    mean, std = x.mean().item(), x.std().item()
    normalize = lambda images: images.float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)  # noqa: E731
    x = x.sub_(mean).div_(std).unsqueeze(1)
    y = train.targets.long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:validation_size], order[validation_size:]
    return Splits(
        x[train_idx],
        y[train_idx],
        x[val_idx],
        y[val_idx],
        normalize(test.data),
        test.targets.long(),
        list(train.classes),
        mean,
        std,
    )


class Batches:
    """Mini-batches of (x, y) by indexing in-memory tensors; shuffled anew each epoch by a
    generator of its own, whose state is part of a checkpoint. A shuffled (training) epoch drops a
    last batch of a single sample, which BatchNorm cannot normalize in training mode.

    In a run of `world_size` processes (torchrun), each one's Batches holds the share of `rank`,
    with `batch_size` its own rows per step:

    - shuffled, every rank draws the same permutation (its generator is seeded alike on all of
      them) and deals it out like cards, rank r taking positions r, r + world_size, ... The last
      n % world_size positions of the permutation sit this epoch out (a different few each epoch):
      dropping them rather than padding with repeats gives every rank the same rows, hence the
      same number of steps, as it must, since a rank with a step more would wait for the others'
      gradients until the timeout. Dealt this way, step k's rows over all ranks are exactly the
      k-th batch of a single process at batch_size * world_size.
    - unshuffled (evaluation), a contiguous piece each (their sizes differ by at most one row),
      so that the ranks' results put end to end in rank order follow the set's order.
    """

    def __init__(self, x, y, batch_size, shuffle=False, seed=0, device="cpu", rank=0, world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"Batches: rank must be in [0, world_size={world_size}), got {rank}")
        if not shuffle:
            start, stop = rank * len(y) // world_size, (rank + 1) * len(y) // world_size
            x, y = x[start:stop], y[start:stop]
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def _rows(self):
        """How many rows this rank sees per epoch."""
        return len(self.y) // self.world_size if self.shuffle else len(self.y)

    def __len__(self):
        return (self._rows() + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        if order is not None and self.world_size > 1:
            order = order[: n - n % self.world_size][self.rank :: self.world_size]
        for start in range(0, self._rows(), self.batch_size):
            if order is None:
                yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
            else:
                idx = order[start : start + self.batch_size].to(self.x.device)
                if len(idx) == 1:
                    return
                yield self.x[idx], self.y[idx]

    def num_samples(self):
        """The rows this rank trains on (or evaluates) per epoch."""
        n = self._rows()
        return n - 1 if self.shuffle and n % self.batch_size == 1 else n


def make_loader(x, y, batch_size, shuffle=False, seed=0, num_workers=0):
    """A torch.utils.data.DataLoader over the same tensors, for data that does not fit in memory
    once its Dataset is swapped in."""
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
    )
