"""The ImageNet path on CPU: AlexNet split, image folders, top-5 accuracy, a smoke run."""

from __future__ import annotations

import pytest
import torch
import torchvision

from distprop_fast.models import ALEXNET_MIN_SIDE, build_network


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
