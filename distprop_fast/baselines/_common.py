"""Networks, batch checks, step rules and the shared interface of the layer-local baselines.

Every baseline trains a :class:`~distprop_fast.models.Chain` whose blocks each
hold one learnable affine map (``nn.Linear`` or ``nn.Conv2d``), possibly
preceded by parameter-free operations (flatten, max-pooling), and end in an
element-wise activation, except the last block, whose output is the logits.
The output of block ``l`` before its activation is ``a_l``; after it, ``h_l``.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import nn

from distprop_fast.models import Block, Chain
from distprop_fast.solvers import NonFiniteError

BASELINE_NETWORKS = ("mlp", "conv")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
STEP_RULES = ("sgd", "adam", "rmsprop")


def build_baseline_network(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    activation: str = "tanh",
    hidden: tuple[int, ...] = (256, 256),
    channels: tuple[int, int] = (16, 32),
) -> Chain:
    """Build a network with one learnable layer per block.

    * ``mlp``: flatten, then ``linear(prod(input_shape) -> hidden[0])``,
      ``linear(hidden[i-1] -> hidden[i])`` ..., ``linear(hidden[-1] -> M)``, with
      ``activation`` after every hidden layer. The default is 784-256-256-10 on MNIST.
    * ``conv``: ``conv(C -> channels[0], 5, pad 2)`` act | ``maxpool(2)
      conv(channels[0] -> channels[1], 5, pad 2)`` act | ``maxpool(2) flatten
      linear(channels[1]·(H/4)·(W/4) -> M)``. The pooling of a layer's input sits
      in the next block, so every block's activation is element-wise.

    Raises:
        ValueError: unknown name or activation, empty ``hidden``, or an input
            shape the network cannot take.
    """
    if name not in BASELINE_NETWORKS:
        raise ValueError(
            f"unknown baseline network {name!r}; choose one of {', '.join(BASELINE_NETWORKS)}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    act = ACTIVATIONS[activation]
    input_shape = tuple(input_shape)
    if name == "mlp":
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must list at least one positive width, got {hidden}")
        blocks = _mlp_blocks(math.prod(input_shape), num_classes, act, hidden)
    else:
        if len(input_shape) != 3 or input_shape[1] < 4 or input_shape[2] < 4:
            raise ValueError(
                f"network 'conv' takes (C, H, W) inputs with H, W >= 4, got {input_shape}; "
                "use 'mlp' for flat inputs"
            )
        blocks = _conv_blocks(input_shape, num_classes, act, channels)
    return Chain(blocks, input_shape, name)


def _mlp_blocks(width_in, num_classes, act, hidden):
    widths = [width_in, *hidden]
    blocks = []
    for i, (width_prev, width) in enumerate(itertools.pairwise(widths)):
        lead = [nn.Flatten()] if i == 0 else []
        blocks.append(Block(nn.Sequential(*lead, nn.Linear(width_prev, width)), act()))
    lead = [nn.Flatten()] if not blocks else []
    blocks.append(Block(nn.Sequential(*lead, nn.Linear(widths[-1], num_classes))))
    return blocks


def _conv_blocks(input_shape, num_classes, act, channels):
    in_channels, height, width = input_shape
    flat = channels[1] * (height // 4) * (width // 4)
    return [
        Block(nn.Conv2d(in_channels, channels[0], 5, padding=2), act()),
        Block(
            nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(channels[0], channels[1], 5, padding=2)), act()
        ),
        Block(nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(flat, num_classes))),
    ]


def seeded_network(seed: int, device: torch.device, **kwargs) -> Chain:
    """Build a network whose initial weights depend on ``seed`` only; the global RNG is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_baseline_network(**kwargs)
    return network.to(device)


def make_optimizer(rule: str, groups: list[dict], momentum: float = 0.0) -> torch.optim.Optimizer:
    """Create one optimiser over parameter groups, each with its own ``lr``.

    Adam and RMSprop keep per-parameter state, so one optimiser with a group per
    layer steps exactly like one optimiser per layer.

    Raises:
        ValueError: unknown rule, or momentum outside ``[0, 1)``.
    """
    if rule not in STEP_RULES:
        raise ValueError(f"step rule must be one of {STEP_RULES}, got {rule!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    for group in groups:
        check_step_size(group["lr"], "lr")
    if rule == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)
    if rule == "adam":
        return torch.optim.Adam(groups, lr=groups[0]["lr"])
    return torch.optim.RMSprop(groups, lr=groups[0]["lr"], momentum=momentum)


def check_step_size(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def affine_layer(block: Block) -> nn.Module:
    """Return the one learnable layer of a block (its last Linear or Conv2d)."""
    layers = [m for m in block.body.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if len(layers) != 1:
        raise ValueError(
            f"a baseline block must hold one Linear or Conv2d layer, found {len(layers)}"
        )
    return layers[0]


class LayerLocalMethod:
    """The interface the training loop calls, shared by DFA, DTP and OAM.

    Subclasses set ``network``, ``optimizer`` and ``num_classes`` and implement
    :meth:`_step`, :meth:`_extra_state` and :meth:`_load_extra_state`.
    """

    name = "layer-local"
    network: Chain
    optimizer: torch.optim.Optimizer
    num_classes: int
    num_examples: int | None = None
    step_count: int = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> dict[str, float]:
        """Take one training step on a batch and return its statistics (at least ``loss``)."""
        self.check_batch(x, y, index)
        stats = self._step(x, y)
        self.step_count += 1
        return stats

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def check_batch(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        """Raise a ValueError naming the value and the fix for an invalid batch."""
        check_batch(
            x, y, index, self.network.input_shape, self.num_classes, self.num_examples, self.device
        )

    def check_finite(self, quantity: str, value: torch.Tensor) -> None:
        """Raise :class:`NonFiniteError` when ``value`` contains NaN or Inf."""
        if not torch.isfinite(value).all():
            step = self.step_count + 1
            raise NonFiniteError(
                f"{quantity} is not finite at step {step} of {self.name.upper()}; "
                "the run diverged. Try a smaller step size (lr)",
                quantity,
                step,
            )

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``(B, M)`` of the plain network."""
        return self.network(x)

    def train(self, mode: bool = True):
        self.network.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def variable_counts(self) -> dict[str, int]:
        """Count variables beside the network weights; a baseline keeps no states or multipliers."""
        return {"state_variables": 0, "multipliers": 0}

    def state_dict(self) -> dict:
        """Return a deep copy of everything a bitwise-equal continuation needs."""
        state = {
            "method": self.name,
            "step_count": self.step_count,
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **self._extra_state(),
        }
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict` of an object built with the same arguments.

        Nothing changes when a check fails.

        Raises:
            ValueError: the state belongs to another method, misses a key, or
                contains tensors of other shapes (a network built with other arguments).
        """
        if state.get("method") != self.name:
            raise ValueError(
                f"this state was saved by {state.get('method')!r}, not {self.name!r}; "
                f"load it into a {state.get('method')!r} object"
            )
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise ValueError(
                f"the state misses {missing}; save it with state_dict() of {self.name!r}"
            )
        current = self.state_dict()
        for key in self._tensor_groups():
            check_same_shapes(state[key], current[key], key, self.name)
        state = copy.deepcopy(state)
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])
        self._load_extra_state(state)

    def _tensor_groups(self) -> tuple[str, ...]:
        """Return the state keys whose tensors must match this object's shapes."""
        return ("network",)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass


def check_same_shapes(loaded, expected, key: str, method: str) -> None:
    """Raise a ValueError when ``loaded`` and ``expected`` differ in tensor names or shapes."""
    if isinstance(expected, dict):
        loaded_shapes = {name: tuple(t.shape) for name, t in loaded.items()}
        expected_shapes = {name: tuple(t.shape) for name, t in expected.items()}
    else:
        loaded_shapes = [tuple(t.shape) for t in loaded]
        expected_shapes = [tuple(t.shape) for t in expected]
    if loaded_shapes != expected_shapes:
        raise ValueError(
            f"the saved {key!r} tensors have shapes {loaded_shapes}, but this {method!r} object "
            f"has {expected_shapes}; build it with the arguments the state was saved with"
        )


def check_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    input_shape: tuple[int, ...],
    num_classes: int,
    num_examples: int | None,
    device: torch.device,
) -> None:
    """Raise a ValueError (TypeError for a non-tensor) naming the invalid value and the fix."""
    for name, t in (("x", x), ("y", y), ("index", index)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but the model is on {device}; "
                f"move the batch with .to({str(device)!r})"
            )
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}; convert it with x.float()")
    for name, t in (("y", y), ("index", index)):
        if t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {t.dtype}; convert it with .long()")
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"{name} must have shape ({x.shape[0]},) to match x of shape "
                f"{tuple(x.shape)}, got {tuple(t.shape)}"
            )
    if x.shape[0] == 0:
        raise ValueError("the batch is empty (x has 0 rows); pass at least one example")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"x must have shape (B, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf values; clean or re-normalise the inputs")
    _check_range("label", y, num_classes, "the number of classes M")
    _check_range("index", index, num_examples, "the training-set size |D|")


def _check_range(quantity: str, values: torch.Tensor, bound: int | None, meaning: str) -> None:
    low, high = values.min().item(), values.max().item()
    if low < 0 and bound is None:
        raise ValueError(f"{quantity} {low} is negative; every {quantity} must be >= 0")
    if low < 0 or (bound is not None and high >= bound):
        bad = low if low < 0 else high
        raise ValueError(
            f"{quantity} {bad} is outside [0, {bound}), where {bound} is {meaning}; check the "
            "data set and the num_classes / num_examples the method was built with"
        )
