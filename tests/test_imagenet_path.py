"""The ImageNet path on CPU: AlexNet split, image folders, top-5 accuracy, a smoke run."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from distprop_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetNotFoundError,
    StreamingBatchLoader,
    load_dataset,
)
from distprop_fast.models import ALEXNET_MIN_SIDE, build_network

CLASSES = ("ant", "bee", "cow")
TRAIN_PER_CLASS = 4
VAL_PER_CLASS = 2


def write_image_folder(root: Path, seed: int = 0) -> Path:
    """Write train/ and val/ with three classes of small random PNG and JPEG images."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                # Sizes differ per image, so the transforms must resize.
                pixels = rng.integers(0, 256, (30 + 7 * k, 40 + 3 * k, 3), dtype=np.uint8)
                suffix = "png" if k % 2 == 0 else "jpg"
                Image.fromarray(pixels).save(folder / f"{name}{k}.{suffix}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")


def copy_into_torchvision(chain, num_classes: int) -> torch.nn.Module:
    """Return torchvision's AlexNet holding the chain's weights, matched in order."""
    reference = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    ours = list(chain.parameters())
    theirs = list(reference.parameters())
    assert [p.shape for p in ours] == [p.shape for p in theirs]
    with torch.no_grad():
        for mine, other in zip(ours, theirs):
            other.copy_(mine)
    return reference


@pytest.mark.parametrize("cut_activation", [True, False])
def test_alexnet_split_equals_torchvision(cut_activation):
    torch.manual_seed(0)
    chain = build_network("alexnet", (3, 224, 224), 5, cut_activation=cut_activation)
    reference = copy_into_torchvision(chain, 5)
    chain.eval()
    reference.eval()

    # Input sides where the split computes torchvision's function exactly: the last
    # feature map is 1, 2 or 3 pixels wide (64, 96, 128) or 6x6 (224).
    for side in (64, 96, 128, 224):
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            expected = reference(x)
            actual = chain(x)
        # Same operations with the ReLU after the pooling, so equal up to float32
        # rounding; measured 0.0.
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=f"side {side}")


def test_alexnet_cut_has_9216_features():
    chain = build_network("alexnet", (3, 224, 224), 1000, cut_activation=False)
    assert chain.cut_sizes == [9216]
    assert chain.blocks[0].activation is None
    # With a linear cut, the ReLU opens the classifier block.
    assert isinstance(chain.blocks[1].body[0], torch.nn.ReLU)
    relu_cut = build_network("alexnet", (3, 224, 224), 1000, cut_activation=True)
    assert isinstance(relu_cut.blocks[0].activation, torch.nn.ReLU)


@pytest.mark.parametrize("shape", [(3, ALEXNET_MIN_SIDE - 1, 100), (1, 224, 224), (3, 224)])
def test_alexnet_rejects_unusable_input(shape):
    with pytest.raises(ValueError, match="alexnet"):
        build_network("alexnet", shape, 10, cut_activation=False)


def test_image_folder_items(image_folder):
    train = load_dataset("imagefolder", True, image_folder, crop_size=32)
    assert len(train) == len(CLASSES) * TRAIN_PER_CLASS
    assert train.num_classes == len(CLASSES)
    assert train.input_shape == (3, 32, 32)
    for i in (0, 5, len(train) - 1):
        x, y, index = train[i]
        assert x.shape == (3, 32, 32)
        assert x.dtype == torch.float32
        assert index == i
        assert y == train.targets[i].item()
        # Files are sorted by class folder, so class k is at positions [4k, 4k + 4).
        assert y == i // TRAIN_PER_CLASS


def test_image_folder_test_split_is_deterministic(image_folder):
    val = load_dataset("imagefolder", False, image_folder, crop_size=32)
    assert len(val) == len(CLASSES) * VAL_PER_CLASS
    torch.testing.assert_close(val[1][0], val[1][0], rtol=0, atol=0)


def test_image_folder_normalises_with_imagenet_statistics(tmp_path):
    root = tmp_path / "flat"
    for split in ("train", "val"):
        (root / split / "only").mkdir(parents=True)
        colour = np.array([255, 0, 128], dtype=np.uint8)
        Image.fromarray(np.tile(colour, (50, 60, 1))).save(root / split / "only" / "a.png")
    x, _, _ = load_dataset("imagefolder", False, root, crop_size=16)[0]

    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = (torch.tensor([255.0, 0.0, 128.0]) / 255 - mean) / std
    # A uniform image stays uniform through resizing and cropping.
    torch.testing.assert_close(x, expected.view(3, 1, 1).expand(3, 16, 16), rtol=1e-6, atol=1e-6)


def take_batches(loader, count):
    return [loader.next_batch() for _ in range(count)]


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_loader_covers_each_example_once(image_folder, workers):
    train = load_dataset("imagefolder", True, image_folder, crop_size=16)
    loader = StreamingBatchLoader(train, 5, torch.Generator().manual_seed(0), workers=workers)
    batches = take_batches(loader, 3)

    assert [b[2].numel() for b in batches] == [5, 5, 2]
    seen = torch.cat([b[2] for b in batches])
    assert sorted(seen.tolist()) == list(range(len(train)))
    for x, y, index in batches:
        assert x.shape == (index.numel(), 3, 16, 16)
        assert torch.equal(y, train.targets[index])
    assert loader.epoch == 1
    loader.next_batch()
    assert loader.epoch == 2


def test_streaming_loader_resumes_order(image_folder):
    train = load_dataset("imagefolder", True, image_folder, crop_size=16)
    first = StreamingBatchLoader(train, 4, torch.Generator().manual_seed(3), workers=0)
    first.next_batch()
    state = first.state_dict()
    expected = [b[2] for b in take_batches(first, 4)]

    # Another seed: the rest of epoch 1 must come from the saved order alone.
    second = StreamingBatchLoader(train, 4, torch.Generator().manual_seed(99), workers=0)
    second.load_state_dict(state)
    got = [b[2] for b in take_batches(second, 2)]
    assert [t.tolist() for t in got] == [t.tolist() for t in expected[:2]]
    assert second.epoch == 1


def test_image_folder_missing_split(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train/ and val/"):
        load_dataset("imagenet", True, tmp_path / "nowhere")


def test_image_folder_without_images(tmp_path):
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no images in class folders"):
        load_dataset("imagefolder", True, tmp_path)


def test_image_folder_needs_data_dir():
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("imagefolder", True, None)


def test_imagenet_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTPROP_DATA", str(tmp_path))
    write_image_folder(tmp_path / "imagenet")
    assert len(load_dataset("imagenet", False, None, crop_size=16)) == 6


def test_image_folder_rejects_download(image_folder):
    with pytest.raises(ValueError, match="cannot be downloaded"):
        load_dataset("imagenet", True, image_folder, download=True)


def test_image_folder_val_classes_must_match(image_folder):
    extra = image_folder / "val" / "dog"
    extra.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(extra / "d.png")
    with pytest.raises(ValueError, match=r"only in val/: \['dog'\]"):
        load_dataset("imagefolder", False, image_folder)


def test_imagenet_defaults():
    from distprop_fast.train import IMAGENET_LR_MULTIPLIERS, TrainConfig

    config = TrainConfig(method="distprop", dataset="imagenet").resolved()
    assert config.steps == 50000
    assert config.batch_size == 256
    assert config.network == "alexnet"
    assert config.crop_size == 224
    assert config.constraint == "per-example"
    assert config.samples_per_class == 1
    assert config.lr_multipliers == IMAGENET_LR_MULTIPLIERS
    sgd = TrainConfig(method="sgd", dataset="imagenet").resolved()
    assert (sgd.steps, sgd.network, sgd.constraint) == (50000, "alexnet", "per-feature")
    # Other data sets keep the per-feature constraint.
    assert TrainConfig(method="distprop", dataset="mnist").resolved().constraint == "per-feature"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"method": "sgd", "constraint": "per-example"}, "applies to the methods"),
        ({"constraint": "per-class"}, "constraint must be one of"),
        ({"crop_size": 0}, "crop size must be at least 1"),
        ({"workers": -1}, "workers must be >= 0"),
    ],
)
def test_imagenet_options_rejected(change, message):
    from distprop_fast.train import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"dataset": "imagenet", **change}).resolved()


class FixedLogits(torch.nn.Module):
    """A stand-in formulation whose prediction for example i is row i of a table."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def predict(self, x):
        return self.logits[x[:, 0].long()]


def test_evaluate_top1_and_top5():
    from distprop_fast.data import IndexedDataset
    from distprop_fast.train import evaluate, evaluate_metrics

    # 7 classes. Ranks of the label: 1st, 3rd, 5th, 6th.
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 6],
            [0.0, 1, 2, 3, 4, 5, 6],
            [6.0, 5, 4, 3, 2, 1, 0],
            [6.0, 5, 4, 3, 2, 1, 0],
        ]
    )
    labels = torch.tensor([0, 4, 4, 5])
    data = IndexedDataset(x=torch.arange(4.0).view(4, 1), y=labels, num_classes=7, name="fixed")
    metrics = evaluate_metrics(FixedLogits(logits), data, "cpu", batch_size=3)

    assert metrics["accuracy"] == 1 / 4
    assert metrics["top5_accuracy"] == 3 / 4
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert evaluate(FixedLogits(logits), data, "cpu") == (metrics["accuracy"], metrics["loss"])


def test_evaluate_top5_with_fewer_than_five_classes():
    from distprop_fast.data import IndexedDataset
    from distprop_fast.train import evaluate_metrics

    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    data = IndexedDataset(x=torch.arange(2.0).view(2, 1), y=torch.tensor([0, 0]), num_classes=3,
                          name="fixed")
    metrics = evaluate_metrics(FixedLogits(logits), data, "cpu")
    assert metrics["accuracy"] == 0.5
    # The top 5 of 3 classes contain every class.
    assert metrics["top5_accuracy"] == 1.0


def run_smoke(image_folder, out_dir, monkeypatch, device):
    """Train 2 DistProp steps on the AlexNet split and return the summary and the objects.

    The per-example constraint with float16 multipliers, images read by 2
    DataLoader workers, crop 64.
    """
    # The package exports the function train under the module's name.
    train_module = importlib.import_module("distprop_fast.train")
    built = {}
    build = train_module.build

    def recording_build(config, train_data):
        built["objects"] = build(config, train_data)
        built["train_data"] = train_data
        return built["objects"]

    monkeypatch.setattr(train_module, "build", recording_build)
    config = train_module.TrainConfig(
        method="distprop", dataset="imagenet", data_dir=str(image_folder), crop_size=64,
        steps=2, batch_size=4, samples_per_class=1, multiplier_dtype="float16", workers=2,
        threads=1, eval_every=2, margin=0.0, lr_multipliers=1e-3, checkpoint_every=0,
        device=device, output_dir=str(out_dir),
    )
    summary = train_module.train(config, progress=False)
    return summary, built


def check_smoke(summary, built, out_dir):
    formulation, _, _ = built["objects"]
    examples = len(CLASSES) * TRAIN_PER_CLASS
    assert built["train_data"].__class__.__name__ == "ImageFolderDataset"
    assert formulation.constraint == "per-example"
    table = formulation.first_multipliers.table
    assert tuple(table.shape) == (examples, 1)
    assert table.dtype == torch.float16
    # Margin 0 makes every defect positive, so the 8 visited rows ascended and the
    # 4 others stayed at zero.
    assert int((table > 0).sum()) == 8
    assert int((table == 0).sum()) == examples - 8
    assert summary["multipliers"] == examples

    assert summary["steps"] == 2
    assert 0.0 <= summary["test_accuracy"] <= summary["test_top5_accuracy"] <= 1.0
    # Three classes: the top 5 always hold the label.
    assert summary["test_top5_accuracy"] == 1.0
    assert summary["defect/cut1"] > 0.0
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert "test_top5_accuracy" in json.loads(lines[-1])
    assert json.loads((out_dir / "summary.json").read_text()) == summary


def test_imagenet_path_smoke(image_folder, tmp_path, monkeypatch):
    summary, built = run_smoke(image_folder, tmp_path / "run", monkeypatch, "cpu")
    check_smoke(summary, built, tmp_path / "run")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_imagenet_path_smoke_cuda(image_folder, tmp_path, monkeypatch):
    summary, built = run_smoke(image_folder, tmp_path / "run", monkeypatch, "cuda")
    check_smoke(summary, built, tmp_path / "run")
    formulation, _, _ = built["objects"]
    # The model is on the GPU; the per-example table stays in host memory.
    assert formulation.w_mu[0].device.type == "cuda"
    assert formulation.first_multipliers.table.device.type == "cpu"


def test_resume_accepts_checkpoint_without_new_fields():
    import dataclasses

    from distprop_fast.checkpoint import CheckpointError
    from distprop_fast.train import TrainConfig, check_resumable

    config = TrainConfig(method="distprop", dataset="digits5k").resolved()
    saved = dataclasses.asdict(config)
    for key in ("constraint", "crop_size", "workers"):
        del saved[key]
    check_resumable(saved, config, Path("checkpoint.pt"))

    config.constraint = "per-example"
    with pytest.raises(CheckpointError, match="constraint='per-feature' in the checkpoint"):
        check_resumable(saved, config, Path("checkpoint.pt"))
