"""Networks as chains of blocks with named cuts.

A :class:`Chain` is ``f = f_L o ... o f_1``; the output of block ``l < L`` is the
state at cut ``l``. Each block is a body followed by an optional activation at
the cut, so the tabular formulation can store the pre-activation state and
apply the activation itself. DistProp variants put no activation at a cut
(the per-class Gaussian is unbounded) and move it to the start of the next block.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NETWORKS = ("mnist-two-block", "mnist-every-layer", "lenet", "mlp", "alexnet")

# Smallest input side AlexNet's features accept: a 63-pixel side leaves a 1x1 map
# after the last max-pooling, which the adaptive average pooling spreads to 6x6.
ALEXNET_MIN_SIDE = 63


class Block(nn.Module):
    """One block: ``activation(body(x))``, with ``activation`` ``None`` for a linear cut."""

    def __init__(self, body: nn.Module, activation: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out if self.activation is None else self.activation(out)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre if self.activation is None else self.activation(pre)


class Chain(nn.Module):
    """A chain of blocks; ``cut_shapes[l]`` is the per-example shape after block ``l``."""

    def __init__(self, blocks: list[Block], input_shape: tuple[int, ...], name: str):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.name = name
        self.input_shape = tuple(input_shape)
        with torch.no_grad():
            probe = torch.zeros(1, *input_shape)
            shapes = []
            for block in self.blocks[:-1]:
                probe = block(probe)
                shapes.append(tuple(probe.shape[1:]))
        self.cut_shapes = shapes

    @property
    def num_cuts(self) -> int:
        return len(self.blocks) - 1

    @property
    def cut_sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.cut_shapes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build_network(
    name: str, input_shape: tuple[int, ...], num_classes: int, cut_activation: bool
) -> Chain:
    """Build a named network.

    Args:
        name: one of :data:`NETWORKS`.
        input_shape: ``(C, H, W)`` of one example.
        num_classes: the number of classes ``M``.
        cut_activation: end each cut in a ReLU (backprop, ExtraProp) or in a
            linear map (DistProp).

    Raises:
        ValueError: unknown name, or an input shape the network cannot take.
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}")
    if name.startswith("mnist") and tuple(input_shape) != (1, 28, 28):
        raise ValueError(
            f"network {name!r} takes 1x28x28 inputs, got {tuple(input_shape)}; "
            "use --network mlp or lenet for other data sets"
        )
    if name == "lenet" and tuple(input_shape) != (3, 32, 32):
        raise ValueError(f"network 'lenet' takes 3x32x32 inputs, got {tuple(input_shape)}")
    if name == "alexnet" and (
        len(input_shape) != 3 or input_shape[0] != 3 or min(input_shape[1:]) < ALEXNET_MIN_SIDE
    ):
        raise ValueError(
            f"network 'alexnet' takes 3xHxW inputs with H, W >= {ALEXNET_MIN_SIDE}, got "
            f"{tuple(input_shape)}; use a larger --crop-size"
        )
    builder = {
        "mnist-two-block": _mnist_two_block,
        "mnist-every-layer": _mnist_every_layer,
        "lenet": _lenet,
        "mlp": _mlp,
        "alexnet": _alexnet,
    }[name]
    blocks = builder(input_shape, num_classes, cut_activation)
    return Chain(blocks, input_shape, name)


def _cut(cut_activation: bool) -> nn.Module | None:
    return nn.ReLU() if cut_activation else None


def _mnist_two_block(input_shape, num_classes, cut_activation):
    # conv(1->32, 3) ReLU conv(32->64, 3) ReLU maxpool(2) flatten linear(9216->128) | linear(128->10)
    features = nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(9216, 128),
    )
    return [Block(features, _cut(cut_activation)), Block(nn.Linear(128, num_classes))]


def _mnist_every_layer(input_shape, num_classes, cut_activation):
    # conv1 | conv2 pool | linear 9216->128 | linear 128->10, cuts of 21,632, 9,216 and 128.
    # With linear cuts the ReLU after each conv moves to the start of the next
    # block; ReLU and max-pooling commute, so the function class is unchanged.
    lead = [] if cut_activation else [nn.ReLU()]
    return [
        Block(nn.Conv2d(1, 32, 3), _cut(cut_activation)),
        Block(
            nn.Sequential(*lead, nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), nn.Flatten()),
            _cut(cut_activation),
        ),
        Block(nn.Sequential(*lead, nn.Linear(9216, 128)), _cut(cut_activation)),
        Block(nn.Linear(128, num_classes)),
    ]


def _lenet(input_shape, num_classes, cut_activation):
    # conv(3->6, 5) ReLU pool conv(6->16, 5) ReLU pool linear(400->120) ReLU linear(120->84) | linear(84->10)
    features = nn.Sequential(
        nn.Conv2d(3, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
    )
    return [Block(features, _cut(cut_activation)), Block(nn.Linear(84, num_classes))]


def _mlp(input_shape, num_classes, cut_activation, hidden=(256, 128)):
    # One block per hidden layer: flatten+linear | (ReLU) linear | ... | linear.
    width_in = math.prod(input_shape)
    lead = [] if cut_activation else [nn.ReLU()]
    blocks = [Block(nn.Sequential(nn.Flatten(), nn.Linear(width_in, hidden[0])), _cut(cut_activation))]
    for width_prev, width in zip(hidden[:-1], hidden[1:]):
        blocks.append(Block(nn.Sequential(*lead, nn.Linear(width_prev, width)), _cut(cut_activation)))
    blocks.append(Block(nn.Sequential(*lead, nn.Linear(hidden[-1], num_classes))))
    return blocks


def _alexnet(input_shape, num_classes, cut_activation):
    # torchvision's AlexNet, cut after features + avgpool + flatten (256 x 6 x 6 = 9,216
    # features) | classifier. The last ReLU of the features moves past the max-pooling
    # and the average pooling, to become the cut's activation (backprop, ExtraProp) or
    # the first layer of the classifier block (DistProp). ReLU commutes with
    # max-pooling. The adaptive average pooling only copies values when the last map
    # is 6x6 (a 224x224 input) or 1, 2 or 3 pixels wide (inputs of 63-159 pixels),
    # so at those sizes the chain computes exactly torchvision's function.
    # NOTE: for other map sizes the pooling averages, and the ReLU after it gives a
    # slightly different function from torchvision's.
    import torchvision

    model = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    convs = list(model.features)
    last_relu, last_pool = len(convs) - 2, len(convs) - 1
    if not isinstance(convs[last_relu], nn.ReLU) or not isinstance(convs[last_pool], nn.MaxPool2d):
        raise RuntimeError(
            f"torchvision's AlexNet features end in {convs[-2:]}, not ReLU and MaxPool2d; "
            "this torchvision version changed the architecture"
        )
    features = nn.Sequential(
        *convs[:last_relu], convs[last_pool], model.avgpool, nn.Flatten()
    )
    lead = [] if cut_activation else [nn.ReLU()]
    classifier = nn.Sequential(*lead, *model.classifier)
    return [Block(features, _cut(cut_activation)), Block(classifier)]
