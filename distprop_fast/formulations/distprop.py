"""DistProp: per-class Gaussians at every cut in place of per-example states."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distprop_fast import ops
from distprop_fast.data import IndexPartition
from distprop_fast.formulations.base import BatchShard, Formulation, SparseTable, Terms, zeros_table
from distprop_fast.models import Chain

NOISE_MODES = ("fixed", "redraw")
GAUSSIAN_INITS = ("sphere", "linear")
CONSTRAINTS = ("per-feature", "per-example")
# softplus^{-1}(1) = log(e - 1), so that sigma starts at 1.
_UNIT_SIGMA = math.log(math.e - 1.0)


class DistProp(Formulation):
    """The distributional formulation.

    Cut ``l`` has per-class Gaussians ``mu_l(c) = W_mu[c]`` and
    ``sigma_l(c) = softplus(W_sigma[c])``. The first cut constrains real data:
    ``g_i = hardshrink((f_1(x_i) - mu_1(y_i)) / sigma_1(y_i), margin)`` with one
    multiplier row per example in a sparse ``(|D|, d_1)`` table. Later cuts
    constrain synthetic samples ``S_{l-1}[n, c] = mu(c) + E[n, c] * sigma(c)``
    with dense ``(N * M, d_l)`` multipliers, and the loss is the cross-entropy of
    the last block on the last cut's samples.

    With ``constraint="per-example"`` the first cut has one scalar constraint per
    example, ``g_i = ReLU(||z_i||_1 - margin * d_1)``, and its multiplier table is
    ``(|D|, 1)``: the mean ``|z|`` over the cut's features must stay within the
    margin. Later cuts keep the per-feature constraint.

    Args:
        network: a chain whose cuts end in a linear map.
        num_examples: ``|D|``.
        num_classes: ``M``.
        margin: the margin ``eps`` on z-scores, per feature in both constraint modes.
        samples_per_class: ``N``.
        noise: ``"fixed"`` draws ``E`` once; ``"redraw"`` draws it every step.
        gaussian_init: ``"sphere"`` (unit-norm means, ``sigma = 1``) or
            ``"linear"`` (``nn.Linear``'s default initialisation for both).
        multiplier_dtype: storage of the first cut's multiplier table.
        constraint: ``"per-feature"`` (a ``(|D|, d_1)`` table) or ``"per-example"``
            (a ``(|D|, 1)`` table) at the first cut. The per-example constraint runs
            the PyTorch reference for any ``backend``, since it has no fused kernel.
        backend: implementation of the fused ops (see :mod:`distprop_fast.ops`).
        generator: random source for the initialisation and the noise.
        partition: in data-parallel training, the indices this rank owns; the
            first cut's multiplier table then has only their rows,
            ``(partition.shard_size, d_1)``. ``None`` keeps all ``|D|`` rows.
    """

    name = "distprop"

    def __init__(
        self,
        network: Chain,
        num_examples: int,
        num_classes: int,
        margin: float = 0.3967,
        samples_per_class: int = 1,
        noise: str = "fixed",
        gaussian_init: str = "sphere",
        multiplier_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        generator: torch.Generator | None = None,
        constraint: str = "per-feature",
        partition: IndexPartition | None = None,
    ):
        super().__init__()
        if constraint not in CONSTRAINTS:
            raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        if gaussian_init not in GAUSSIAN_INITS:
            raise ValueError(f"gaussian_init must be one of {GAUSSIAN_INITS}, got {gaussian_init!r}")
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be at least 1, got {samples_per_class}")
        if not margin >= 0:
            raise ValueError(f"margin must be a number >= 0, got {margin}")
        if num_classes < 1 or num_examples < 1:
            raise ValueError(
                f"num_classes and num_examples must be at least 1, got {num_classes} "
                f"and {num_examples}"
            )
        for l, block in enumerate(network.blocks[:-1]):
            if block.activation is not None:
                raise ValueError(
                    f"block {l + 1} of {network.name!r} ends in {block.activation}; DistProp "
                    "needs linear cuts, so build the network with cut_activation=False"
                )
        self.network = network
        self.num_classes = num_classes
        self.num_examples = num_examples
        self.margin = float(margin)
        self.samples_per_class = samples_per_class
        self.noise_mode = noise
        self.backend = backend
        self.generator = generator
        self.constraint = constraint

        sizes = network.cut_sizes
        self.w_mu = nn.ParameterList([nn.Parameter(torch.empty(num_classes, d)) for d in sizes])
        self.w_sigma = nn.ParameterList([nn.Parameter(torch.empty(num_classes, d)) for d in sizes])
        self.reset_gaussians(gaussian_init)
        for l, d in enumerate(sizes):
            self.register_buffer(f"noise{l + 1}", torch.empty(samples_per_class, num_classes, d))
        self.redraw_noise()

        if partition is not None and partition.num_examples != num_examples:
            raise ValueError(
                f"the partition covers {partition.num_examples} indices but num_examples is "
                f"{num_examples}; build both from the same training split"
            )
        self.partition = partition
        rows = num_examples if partition is None else partition.shard_size
        width = sizes[0] if constraint == "per-feature" else 1
        self.first_multipliers = SparseTable(
            "multipliers/cut1", zeros_table(rows, width, multiplier_dtype), "multiplier"
        )
        self.later_multipliers = nn.ParameterList(
            [nn.Parameter(torch.zeros(samples_per_class * num_classes, d)) for d in sizes[1:]]
        )
        # Sample ``[n, c]`` flattened to row ``n * M + c`` has class ``c``.
        self.register_buffer(
            "sample_labels", torch.arange(num_classes).repeat(samples_per_class), persistent=False
        )

    @torch.no_grad()
    def reset_gaussians(self, kind: str) -> None:
        for w_mu, w_sigma in zip(self.w_mu, self.w_sigma):
            if kind == "sphere":
                w_mu.copy_(torch.randn(w_mu.shape, generator=self.generator))
                w_mu.div_(w_mu.norm(dim=1, keepdim=True))
                w_sigma.fill_(_UNIT_SIGMA)
            else:
                bound = 1.0 / math.sqrt(w_mu.shape[0])
                w_mu.uniform_(-bound, bound, generator=self.generator)
                w_sigma.uniform_(-bound, bound, generator=self.generator)

    @torch.no_grad()
    def redraw_noise(self) -> None:
        for l in range(self.network.num_cuts):
            buffer = getattr(self, f"noise{l + 1}")
            buffer.copy_(torch.randn(buffer.shape, generator=self.generator))

    @property
    def first_margin(self) -> float:
        """The margin of the first cut's constraint: per feature, or ``margin * d_1`` on
        the L1 norm of a per-example constraint."""
        if self.constraint == "per-example":
            return self.margin * self.network.cut_sizes[0]
        return self.margin

    def state_parameters(self):
        return list(self.w_mu) + list(self.w_sigma)

    def dense_multipliers(self):
        return list(self.later_multipliers)

    def sparse_tables(self):
        return [self.first_multipliers]

    def begin_step(self) -> None:
        """Draw new noise when the mode is ``"redraw"``; both half-steps share it."""
        if self.noise_mode == "redraw":
            self.redraw_noise()

    def samples(self, l: int) -> torch.Tensor:
        """Return the synthetic states of cut ``l`` (0-based), shape ``(N * M, *cut_shape)``."""
        noise = getattr(self, f"noise{l + 1}")
        s = ops.sample_classes(self.w_mu[l], self.w_sigma[l], noise, backend=self.backend)
        return s.reshape(-1, *self.network.cut_shapes[l])

    def first_cut_term(self, x: torch.Tensor, y: torch.Tensor, multipliers: torch.Tensor):
        """Return ``(sum(lambda * g), g)`` of the first cut on real data.

        ``g`` has shape ``(B, d_1)`` for the per-feature constraint and ``(B, 1)``
        for the per-example one.
        """
        a = self.network.blocks[0](x).flatten(1)
        if self.constraint == "per-example":
            # No fused kernel exists for this op; the reference runs on any device.
            g, term = ops.zscore_l1_constraint(
                a, y, self.w_mu[0], self.w_sigma[0], self.first_margin, multipliers,
                backend="reference",
            )
        else:
            g, term = ops.zscore_constraint(
                a, y, self.w_mu[0], self.w_sigma[0], self.margin, multipliers,
                backend=self.backend,
            )
        return term, g

    def synthetic_cut_term(self, l: int):
        """Return ``(sum(lambda * g), g)`` of cut ``l >= 1`` (0-based) on synthetic samples.

        Block ``l`` reads the samples of cut ``l - 1`` and is z-scored against
        the Gaussians of cut ``l``, so the term depends on those two cuts only.
        """
        a = self.network.blocks[l](self.samples(l - 1)).flatten(1)
        g, term = ops.zscore_constraint(
            a, self.sample_labels, self.w_mu[l], self.w_sigma[l], self.margin,
            self.later_multipliers[l - 1], backend=self.backend,
        )
        return term, g

    def synthetic_loss(self) -> torch.Tensor:
        """Return the cross-entropy of the last block on the last cut's samples."""
        logits = self.network.blocks[-1](self.samples(self.network.num_cuts - 1))
        return F.cross_entropy(logits, self.sample_labels)

    def lagrangian(self, x, y, index, rows, shard: BatchShard | None = None):
        term, g = self.first_cut_term(x, y, rows["multipliers/cut1"])
        defects = {"cut1": g}
        if shard is not None and not shard.shared:
            # Another rank adds the synthetic terms; this rank's loss is zero.
            return Terms(loss=term.new_zeros(()), lagrangian=term, defects=defects)

        synthetic = []
        for l in range(1, self.network.num_cuts):
            t, g = self.synthetic_cut_term(l)
            term = term + t
            defects[f"cut{l + 1}"] = g
            synthetic.append(f"cut{l + 1}")
        loss = self.synthetic_loss()
        return Terms(
            loss=loss, lagrangian=loss + term, defects=defects, synthetic=frozenset(synthetic)
        )

    def variable_counts(self):
        counts = super().variable_counts()
        counts["noise"] = sum(getattr(self, f"noise{l + 1}").numel() for l in range(self.network.num_cuts))
        return counts
