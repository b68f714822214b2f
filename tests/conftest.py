import os

import pytest

from fused_mlp import data


@pytest.fixture(scope="session")
def data_dir():
    """The dataset directory ($FUSED_MLP_DATA, else ../shared/data beside the repository). Tests
    that need it skip when it is absent, except under CI, where they fail."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("FUSED_MLP_DATA") or os.path.join(root, "..", "shared", "data")
    missing = [
        f
        for name in ("FashionMNIST", "MNIST")
        for f in data.RAW_FILES
        if not os.path.isfile(os.path.join(path, name, "raw", f))
    ]
    if missing:
        message = f"the Fashion-MNIST / MNIST files are not in {path}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must have them)")
        pytest.skip(message)
    return path
