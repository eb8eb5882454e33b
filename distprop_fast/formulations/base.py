"""The interface every formulation implements, and the tables of sparse rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
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
    """

    loss: torch.Tensor
    lagrangian: torch.Tensor
    defects: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)


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
    ) -> Terms:
        """Evaluate the Lagrangian on a batch.

        Args:
            x: inputs ``(B, C, H, W)``.
            y: labels ``(B,)``.
            index: dataset positions ``(B,)``.
            rows: for each sparse table name, its batch rows ``(B, d)`` as
                leaves that receive gradients.
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
