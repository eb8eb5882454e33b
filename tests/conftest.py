"""Shared fixtures: where the real data sets live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Triton reads TRITON_INTERPRET once, when it is first imported, and some test
# modules import it at collection. Without a GPU its kernels can run only in
# the interpreter, so set it before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def real_data_root() -> Path | None:
    """Return a torchvision-layout root holding MNIST, or ``None``.

    Looks at ``$DISTPROP_DATA``, then at ``../shared/data`` beside the checkout.
    """
    candidates = [os.environ.get("DISTPROP_DATA"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(candidate)
    return None


@pytest.fixture
def mnist_root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("MNIST not found: set DISTPROP_DATA to a torchvision-layout root holding MNIST/raw")
    return root
