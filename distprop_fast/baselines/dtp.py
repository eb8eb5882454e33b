"""Difference target propagation (Lee, Zhang, Fischer, Bengio 2015, "Difference
Target Propagation", ECML PKDD).

With hidden layers ``h_l = f_l(h_{l-1}) = tanh(W_l h_{l-1} + b_l)`` for
``l = 1 .. L-1`` and the softmax output layer ``L``, one step is:

1. Top target, a gradient step of size ``eta`` on the last hidden layer, with
   ``loss`` the cross-entropy of each example (so ``eta`` does not depend on ``B``):
   ``hhat_{L-1} = h_{L-1} - eta * dloss/dh_{L-1}``.
2. Targets further down, with the difference correction:
   ``hhat_{l-1} = h_{l-1} + g_l(hhat_l) - g_l(h_l)`` for ``l = L-1 .. 2``, where
   ``g_l(h) = tanh(V_l h + c_l)`` is the learned approximate inverse of ``f_l``.
3. Each inverse ``g_l`` is trained to reconstruct noise-corrupted inputs:
   ``|| g_l(f_l(h_{l-1} + noise)) - (h_{l-1} + noise) ||^2``, noise ``N(0, noise_std^2)``.
4. Each hidden layer regresses its output onto its target,
   ``|| f_l(h_{l-1}) - hhat_l ||^2``, with ``h_{l-1}`` fixed (a local gradient only).
   The output layer is trained by the gradient of its own cross-entropy, as in
   Lee et al., whose targets start at the last hidden layer.

Squared norms are summed over features and averaged over the batch. Targets
are computed with the inverses and weights from before the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distprop_fast.baselines._common import (
    LayerLocalMethod,
    affine_layer,
    check_step_size,
    make_optimizer,
    seeded_network,
)


class DTP(LayerLocalMethod):
    """Difference target propagation on an ``mlp`` network.

    Only the ``mlp`` network is supported, because the inverses ``g_l`` here
    are dense layers. A convolutional inverse is not implemented.

    Args:
        network_name: ``"mlp"``.
        input_shape: the shape of one example, e.g. ``(1, 28, 28)``.
        num_classes: the number of classes ``M``.
        lr: step size of the forward weights.
        seed: seeds the initial weights and the noise of step 3.
        lr_inverse: step size of the inverses; defaults to ``lr``.
        target_step: ``eta`` of the top target.
        noise_std: standard deviation of the noise that trains the inverses.
        step_rule: ``"rmsprop"`` (default), ``"adam"`` or ``"sgd"``, for weights and inverses.
        activation: ``"tanh"`` (default) or ``"relu"`` after each hidden layer.
        num_examples: ``|D|``, to check batch indices; ``None`` skips the upper bound.
        device: where the network and the inverses live.
        hidden: the hidden widths, at least two so that one inverse exists.

    Raises:
        ValueError: a network other than ``mlp``, or fewer than two hidden layers.
    """

    name = "dtp"

    def __init__(
        self,
        network_name: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        lr: float,
        seed: int = 0,
        lr_inverse: float | None = None,
        target_step: float = 0.1,
        noise_std: float = 0.1,
        step_rule: str = "rmsprop",
        activation: str = "tanh",
        num_examples: int | None = None,
        device: str | torch.device = "cpu",
        hidden: tuple[int, ...] = (256, 256),
    ):
        if network_name != "mlp":
            raise ValueError(
                f"DTP supports only the 'mlp' network, got {network_name!r}; its inverses "
                "are dense layers"
            )
        if len(hidden) < 2:
            raise ValueError(
                f"DTP needs at least two hidden layers so that targets pass through an "
                f"inverse, got hidden={tuple(hidden)}"
            )
        check_step_size(target_step, "target_step")
        check_step_size(noise_std, "noise_std")
        device = torch.device(device)
        self.network = seeded_network(
            seed,
            device,
            name="mlp",
            input_shape=input_shape,
            num_classes=num_classes,
            activation=activation,
            hidden=tuple(hidden),
        )
        self.num_classes = num_classes
        self.num_examples = num_examples
        self.step_count = 0
        self.target_step = target_step
        self.noise_std = noise_std

        # inverses[k] inverts hidden layer k + 2: it maps h_{k+2} back to h_{k+1}.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.inverses = nn.ModuleList(
                nn.Sequential(nn.Linear(hidden[k + 1], hidden[k]), nn.Tanh())
                for k in range(len(hidden) - 1)
            ).to(device)
        self.layers = [affine_layer(block) for block in self.network.blocks]
        lr_inverse = lr if lr_inverse is None else lr_inverse
        groups = [{"params": list(layer.parameters()), "lr": lr} for layer in self.layers]
        groups += [{"params": list(g.parameters()), "lr": lr_inverse} for g in self.inverses]
        self.optimizer = make_optimizer(step_rule, groups)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        blocks = self.network.blocks
        num_hidden = len(blocks) - 1
        with torch.no_grad():
            # activations[l] is h_l; activations[0] is the input x.
            activations = [x]
            for block in blocks[:-1]:
                activations.append(block(activations[-1]))
        targets = self._targets(activations, y)

        self.optimizer.zero_grad(set_to_none=True)
        inverse_losses = [
            self._inverse_gradient(l, activations[l - 1]) for l in range(2, num_hidden + 1)
        ]
        layer_losses = [
            self._regression_gradient(l, activations[l - 1], targets[l])
            for l in range(1, num_hidden + 1)
        ]
        loss, accuracy = self._output_gradient(activations[-1], y)
        self.optimizer.step()

        stats = {"loss": loss, "accuracy": accuracy}
        stats.update({f"layer_loss/{l + 1}": v for l, v in enumerate(layer_losses)})
        stats.update({f"inverse_loss/{l + 2}": v for l, v in enumerate(inverse_losses)})
        return stats

    def _targets(self, activations: list[torch.Tensor], y: torch.Tensor) -> dict[int, torch.Tensor]:
        """Return the target ``{l: hhat_l}`` of every hidden layer ``l``."""
        num_hidden = len(activations) - 1
        top = activations[-1].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.network.blocks[-1](top)
            loss = F.cross_entropy(logits, y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, top)
        self.check_finite("loss", loss)
        targets = {num_hidden: activations[-1] - self.target_step * grad}
        with torch.no_grad():
            for l in range(num_hidden, 1, -1):
                inverse = self.inverses[l - 2]
                targets[l - 1] = activations[l - 1] + inverse(targets[l]) - inverse(activations[l])
        return targets

    def _inverse_gradient(self, l: int, below: torch.Tensor) -> float:
        """Store the gradient of ``g_l``'s reconstruction loss on ``h_{l-1} + noise``; return the loss."""
        noise = torch.randn(below.shape, generator=self.generator, device=below.device)
        corrupted = below + self.noise_std * noise
        with torch.no_grad():
            forward = self.network.blocks[l - 1](corrupted)
        with torch.enable_grad():
            inverse = self.inverses[l - 2]
            reconstruction = inverse(forward)
            loss = (reconstruction - corrupted).pow(2).sum(dim=1).mean()
            grads = torch.autograd.grad(loss, list(inverse.parameters()))
        for p, g in zip(inverse.parameters(), grads):
            p.grad = g
        return loss.item()

    def _regression_gradient(self, l: int, below: torch.Tensor, target: torch.Tensor) -> float:
        """Store the gradient of ``mean_b ||f_l(h_{l-1}) - hhat_l||^2`` for layer ``l``; return the value."""
        params = list(self.layers[l - 1].parameters())
        with torch.enable_grad():
            output = self.network.blocks[l - 1](below)
            loss = (output - target).pow(2).sum(dim=1).mean()
            grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        return loss.item()

    def _output_gradient(self, top: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        params = list(self.layers[-1].parameters())
        with torch.enable_grad():
            logits = self.network.blocks[-1](top)
            loss = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        return loss.item(), accuracy.item()

    def _extra_state(self) -> dict:
        return {"inverses": self.inverses.state_dict(), "generator": self.generator.get_state()}

    def _tensor_groups(self) -> tuple[str, ...]:
        return ("network", "inverses")

    def _load_extra_state(self, state: dict) -> None:
        self.inverses.load_state_dict(state["inverses"])
        self.generator.set_state(state["generator"])

    def variable_counts(self) -> dict[str, int]:
        """Count states and multipliers (none) and the weights of the inverses."""
        return {
            "state_variables": 0,
            "multipliers": 0,
            "inverse_weights": sum(p.numel() for p in self.inverses.parameters()),
        }

    def train(self, mode: bool = True):
        self.inverses.train(mode)
        return super().train(mode)
