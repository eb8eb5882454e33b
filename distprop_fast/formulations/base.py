"""The interface every formulation implements, and the tables of sparse rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distprop_fast.models import Chain


@dataclass
class SparseTable:
    """A ``(|D|, d)`` table of per-example variables read and written by batch rows only.

    Attributes:
        name: a name such as ``"multipliers/cut1"``.
        table: the values, shape ``(|D|, d)``; never a Parameter, so autograd
            never tracks the whole table.
        role: ``"state"`` (primal, descended) or ``"multiplier"`` (dual, ascended).
    """

    name: str
    table: torch.Tensor
    role: str


@dataclass
class Terms:
    """The result of one evaluation of the Lagrangian.

    Attributes:
        loss: the mean classification loss.
        lagrangian: ``loss + sum(lambda * g)`` over all cuts (penalties included).
        defects: per cut, the defect ``g`` that the multipliers multiply.
        extras: further scalars to log.
        synthetic: the cuts of ``defects`` whose rows are synthetic samples
            rather than batch rows, so they do not depend on the batch.
    """

    loss: torch.Tensor
    lagrangian: torch.Tensor
    defects: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)
    synthetic: frozenset[str] = frozenset()


@dataclass(frozen=True)
class BatchShard:
    """One rank's part of a global batch in data-parallel training.

    The ranks' Lagrangians must add up to the single-process Lagrangian of the
    global batch. So a rank divides its sum of per-row losses by the global
    batch size, not by its own row count. Only the rank with ``shared=True``
    adds the terms that do not depend on the batch (DistProp's
    synthetic-sample terms), so that they count once.

    Attributes:
        global_size: the number of rows ``B`` of the global batch.
        shared: whether this rank adds the batch-independent terms.
    """

    global_size: int
    shared: bool


def batch_mean(per_row: torch.Tensor, shard: BatchShard | None) -> torch.Tensor:
    """Average ``per_row`` over the batch, or over the global batch when ``shard`` is given."""
    if shard is None:
        return per_row.mean()
    return per_row.sum() / shard.global_size


def batch_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, shard: BatchShard | None
) -> torch.Tensor:
    """Return the cross-entropy averaged over the batch, or over the global batch with ``shard``."""
    if shard is None:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum") / shard.global_size


def zeros_table(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Allocate a zero table whose pages the OS maps only when a row is first written.

    NumPy allocates zeros with ``calloc``, so a 60,000 x 21,632 table costs no
    memory until its rows are touched.
    """
    if dtype in (torch.float32, torch.float16, torch.float64):
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}
        return torch.from_numpy(np.zeros((rows, cols), dtype=np_dtype[dtype]))
    return torch.zeros(rows, cols, dtype=dtype)


class Formulation(nn.Module):
    """A training problem: primal variables, multipliers and a Lagrangian.

    Subclasses set ``network`` (a :class:`Chain`) and implement :meth:`lagrangian`.
    Variables fall into four groups with their own step sizes: network weights,
    other dense primal variables (Gaussians), dense multipliers, and sparse
    tables (states and multipliers) indexed by the example's position.
    """

    network: Chain
    name = "formulation"

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.network.parameters())

    def state_parameters(self) -> list[nn.Parameter]:
        return []

    def dense_multipliers(self) -> list[nn.Parameter]:
        return []

    def sparse_tables(self) -> list[SparseTable]:
        return []

    def lagrangian(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor,
        rows: dict[str, torch.Tensor],
        shard: BatchShard | None = None,
    ) -> Terms:
        """Evaluate the Lagrangian on a batch.

        Args:
            x: inputs ``(B, C, H, W)``.
            y: labels ``(B,)``.
            index: row positions ``(B,)`` in the sparse tables.
            rows: for each sparse table name, its batch rows ``(B, d)`` as
                leaves that receive gradients.
            shard: in data-parallel training, this rank's part of the global
                batch; ``None`` for a single process.
        """
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of the plain composed network."""
        return self.network(x)

    def variable_counts(self) -> dict[str, int]:
        """Count state variables and multipliers (weights excluded)."""
        states = sum(p.numel() for p in self.state_parameters())
        multipliers = sum(p.numel() for p in self.dense_multipliers())
        for table in self.sparse_tables():
            if table.role == "state":
                states += table.table.numel()
            else:
                multipliers += table.table.numel()
        return {"state_variables": states, "multipliers": multipliers}
