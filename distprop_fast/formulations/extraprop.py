"""ExtraProp's tabular formulation: one state row and one multiplier row per example and cut."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distprop_fast.data import IndexedDataset, IndexPartition, iterate_in_order, shard_of
from distprop_fast.formulations.base import (
    BatchShard,
    Formulation,
    SparseTable,
    Terms,
    batch_cross_entropy,
    zeros_table,
)
from distprop_fast.models import Chain

SHRINKS = ("hard", "soft", "none")


def shrink(g: torch.Tensor, margin: float, kind: str) -> torch.Tensor:
    """Shrink a defect so that entries with ``|g| <= margin`` count as satisfied."""
    if kind == "none" or margin == 0:
        return g
    if kind == "hard":
        return F.hardshrink(g, margin)
    if kind == "soft":
        return F.softshrink(g, margin)
    raise ValueError(f"shrink must be one of {SHRINKS}, got {kind!r}")


class ExtraProp(Formulation):
    """Multiple shooting with a state table ``H_l`` and a multiplier table per cut.

    The constraint at cut ``l`` for example ``i`` is
    ``g = shrink(act(h_hat_{l,i}) - f_l(act(h_hat_{l-1,i})), margin)``: the state is
    stored before the cut's activation (re-parameterisation), so the state and the
    block output live in the same domain. The loss reads the last state only.

    Args:
        network: the chain; blocks may end in an activation.
        num_examples: ``|D|``.
        margin: the margin ``eps`` on raw activations.
        shrink_kind: ``"hard"``, ``"soft"`` or ``"none"``.
        multiplier_dtype: storage of the multiplier tables.
        partition: in data-parallel training, the indices this rank owns; every
            table then holds only their rows, ``(partition.shard_size, d)``.
            ``None`` keeps all ``|D|`` rows.
    """

    name = "extraprop"

    def __init__(
        self,
        network: Chain,
        num_examples: int,
        margin: float = 0.0,
        shrink_kind: str = "none",
        multiplier_dtype: torch.dtype = torch.float32,
        partition: IndexPartition | None = None,
    ):
        super().__init__()
        if shrink_kind not in SHRINKS:
            raise ValueError(f"shrink must be one of {SHRINKS}, got {shrink_kind!r}")
        if not margin >= 0:
            raise ValueError(f"margin must be a number >= 0, got {margin}")
        if num_examples < 1:
            raise ValueError(f"num_examples must be at least 1, got {num_examples}")
        self.network = network
        self.margin = float(margin)
        self.shrink_kind = shrink_kind
        self.num_examples = num_examples
        if partition is not None and partition.num_examples != num_examples:
            raise ValueError(
                f"the partition covers {partition.num_examples} indices but num_examples is "
                f"{num_examples}; build both from the same training split"
            )
        self.partition = partition
        rows = num_examples if partition is None else partition.shard_size
        self.states = [
            SparseTable(f"states/cut{l + 1}", zeros_table(rows, d), "state")
            for l, d in enumerate(network.cut_sizes)
        ]
        self.multipliers = [
            SparseTable(f"multipliers/cut{l + 1}", zeros_table(rows, d, multiplier_dtype), "multiplier")
            for l, d in enumerate(network.cut_sizes)
        ]

    def sparse_tables(self) -> list[SparseTable]:
        return self.states + self.multipliers

    @torch.no_grad()
    def initialise_states(
        self, data: IndexedDataset, batch_size: int = 1024, workers: int = 0
    ) -> None:
        """Fill the state tables by one forward pass, so every defect starts at zero.

        ``data`` may also be an image folder read by ``workers`` processes.
        NOTE: an augmented split then gives one random crop per example, so the
        defects start at zero for that crop only.
        With a partition, only the owned examples are read and computed.
        """
        if len(data) != self.num_examples:
            raise ValueError(
                f"the state tables are built for {self.num_examples} examples but the data set "
                f"has {len(data)}; build the formulation from the training split"
            )
        if self.partition is not None:
            data = shard_of(data, self.partition)
        # With a partition, ``local`` is the row position in this rank's shard.
        for x, _, local in iterate_in_order(data, batch_size, workers):
            inp = x
            for l, block in enumerate(self.network.blocks[:-1]):
                pre = block.body(inp)
                self.states[l].table[local] = pre.flatten(1).to(self.states[l].table.dtype)
                inp = block.activate(pre)

    def lagrangian(self, x, y, index, rows, shard: BatchShard | None = None):
        batch = x.shape[0]
        inp = x
        term = x.new_zeros(())
        defects = {}
        for l, block in enumerate(self.network.blocks[:-1]):
            name = f"cut{l + 1}"
            state = block.activate(rows[f"states/{name}"])
            out = block(inp).flatten(1)
            g = shrink(state - out, self.margin, self.shrink_kind)
            term = term + (rows[f"multipliers/{name}"] * g).sum()
            defects[name] = g
            inp = state.view(batch, *self.network.cut_shapes[l])
        loss = batch_cross_entropy(self.network.blocks[-1](inp), y, shard)
        return Terms(loss=loss, lagrangian=loss + term, defects=defects)
