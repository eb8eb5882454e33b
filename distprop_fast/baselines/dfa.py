"""Direct feedback alignment (Nøkland 2016, "Direct Feedback Alignment Provides
Learning in Deep Neural Networks", NeurIPS).

The output error of the mean softmax cross-entropy,

.. math::

    e = \\partial \\text{loss} / \\partial a_L = (\\mathrm{softmax}(a_L) - \\mathrm{onehot}(y)) / B,

reaches every hidden layer ``l`` through a fixed random matrix ``B_l`` of shape
``(d_l, M)``: ``delta_l = (B_l e) * phi'(a_l)``, where ``a_l`` is the layer's
output before its activation ``phi`` and ``d_l`` the number of entries of
``a_l`` (``C·H·W`` for a convolution). Each layer then gets the gradient its
own affine map would get with ``delta_l`` as the gradient of its output:
``dW_l = delta_l^T h_{l-1}`` and ``db_l = sum_b delta_l`` for a linear layer, the
same rule through ``conv2d_weight`` for a convolution. The top layer uses ``e``
itself. The ``1 / B`` in ``e`` makes the update the batch mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distprop_fast.baselines._common import (
    LayerLocalMethod,
    affine_layer,
    make_optimizer,
    seeded_network,
)


class DFA(LayerLocalMethod):
    """Direct feedback alignment on an ``mlp`` or ``conv`` network.

    Args:
        network_name: ``"mlp"`` or ``"conv"`` (see :func:`build_baseline_network`).
        input_shape: the shape of one example, e.g. ``(1, 28, 28)``.
        num_classes: the number of classes ``M``.
        lr: step size of the weights.
        seed: seeds the initial weights and the feedback matrices.
        step_rule: ``"sgd"`` (default), ``"adam"`` or ``"rmsprop"``.
        momentum: momentum of SGD or RMSprop.
        activation: ``"tanh"`` (default) or ``"relu"`` after each hidden layer.
        feedback_scale: the entries of ``B_l`` are uniform in
            ``[-feedback_scale, feedback_scale]``; the default is ``1 / sqrt(M)``.
        num_examples: ``|D|``, to check batch indices; ``None`` skips the upper bound.
        device: where the network and the feedback matrices live.
        **network_options: ``hidden`` widths or conv ``channels``.

    The step rule and the feedback scale are this implementation's choices.
    Each step's weight gradient estimate is Nøkland's rule, and the step rule
    (momentum by default) turns it into an update.
    """

    name = "dfa"

    def __init__(
        self,
        network_name: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        lr: float,
        seed: int = 0,
        step_rule: str = "sgd",
        momentum: float = 0.9,
        activation: str = "tanh",
        feedback_scale: float | None = None,
        num_examples: int | None = None,
        device: str | torch.device = "cpu",
        **network_options,
    ):
        device = torch.device(device)
        self.network = seeded_network(
            seed,
            device,
            name=network_name,
            input_shape=input_shape,
            num_classes=num_classes,
            activation=activation,
            **network_options,
        )
        self.num_classes = num_classes
        self.num_examples = num_examples
        self.step_count = 0
        self.layers = [affine_layer(block) for block in self.network.blocks]
        groups = [{"params": list(layer.parameters()), "lr": lr} for layer in self.layers]
        self.optimizer = make_optimizer(step_rule, groups, momentum)

        scale = 1.0 / math.sqrt(num_classes) if feedback_scale is None else feedback_scale
        generator = torch.Generator().manual_seed(seed)
        # One (d_l, M) matrix per hidden layer, d_l the number of entries of a_l.
        self.feedback = [
            (torch.rand(d, num_classes, generator=generator) * 2 - 1).mul_(scale).to(device)
            for d in self.network.cut_sizes
        ]

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        inputs, pre_activations, logits = self._forward(x)
        loss = F.cross_entropy(logits, y)
        self.check_finite("loss", loss)

        # (B, M): gradient of the mean cross-entropy with respect to the logits.
        error = (logits.softmax(dim=1) - F.one_hot(y, self.num_classes).to(logits.dtype)) / x.shape[
            0
        ]

        self.optimizer.zero_grad(set_to_none=True)
        last = len(self.network.blocks) - 1
        for l in range(last + 1):
            delta = error if l == last else self._hidden_delta(l, error, pre_activations[l])
            self._set_local_gradient(l, inputs[l], delta)
        self.optimizer.step()

        accuracy = (logits.argmax(dim=1) == y).float().mean()
        return {"loss": loss.item(), "accuracy": accuracy.item()}

    @torch.no_grad()
    def _forward(self, x):
        inputs, pre_activations = [], []
        h = x
        for block in self.network.blocks:
            inputs.append(h)
            a = block.body(h)
            pre_activations.append(a)
            h = block.activate(a)
        return inputs, pre_activations, h

    def _hidden_delta(self, l: int, error: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Return ``delta_l = (B_l e) * phi'(a_l)``, shaped like ``a_l``."""
        # (B, M) @ (M, d_l) -> (B, d_l), one row of B_l e per example.
        signal = (error @ self.feedback[l].T).view_as(a)
        a = a.detach().requires_grad_(True)
        with torch.enable_grad():
            h = self.network.blocks[l].activate(a)
            (delta,) = torch.autograd.grad(h, a, signal)
        return delta

    def _set_local_gradient(self, l: int, layer_input: torch.Tensor, delta: torch.Tensor) -> None:
        """Store in ``.grad`` the gradient of layer ``l``'s weights for output gradient ``delta``."""
        params = list(self.layers[l].parameters())
        with torch.enable_grad():
            a = self.network.blocks[l].body(layer_input.detach())
            grads = torch.autograd.grad(a, params, delta)
        for p, g in zip(params, grads):
            p.grad = g

    def _extra_state(self) -> dict:
        return {"feedback": [b.clone() for b in self.feedback]}

    def _tensor_groups(self) -> tuple[str, ...]:
        return ("network", "feedback")

    def _load_extra_state(self, state: dict) -> None:
        self.feedback = [b.to(self.device) for b in state["feedback"]]

    def variable_counts(self) -> dict[str, int]:
        """Count states and multipliers (none) and the fixed feedback entries."""
        return {
            "state_variables": 0,
            "multipliers": 0,
            "feedback_entries": sum(b.numel() for b in self.feedback),
        }
