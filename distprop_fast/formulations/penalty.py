"""Quadratic penalty and augmented Lagrangian versions of a constrained formulation.

Both add ``(c / 2) * mean_rows ||g_row||^2`` for every cut to the objective,
where ``g`` is the defect of the wrapped formulation (shrunk, as its
multipliers see it). The mean runs over the rows of the cut (the batch for
the first cut, the ``N * M`` synthetic samples for later DistProp cuts), so
``c`` means the same thing at every batch size, as the mean loss does.

* ``multipliers=False``: the quadratic penalty method ("Regularized"). The
  objective is ``loss + penalty``; there are no multipliers to store or step.
* ``multipliers=True``: the augmented Lagrangian
  ``loss + sum(lambda * g) + penalty``, stepped by any saddle-point solver.
"""

from __future__ import annotations

import math

import torch

from distprop_fast.formulations.base import BatchShard, Formulation, SparseTable, Terms, batch_mean


class Penalised(Formulation):
    """Add a quadratic penalty on the defects of ``inner``, with or without its multipliers.

    Args:
        inner: a constrained formulation (:class:`DistProp` or :class:`ExtraProp`).
        coefficient: the penalty coefficient ``c > 0``.
        multipliers: keep the inner multipliers (augmented Lagrangian) or drop
            them (quadratic penalty).
    """

    def __init__(self, inner: Formulation, coefficient: float, multipliers: bool):
        super().__init__()
        if not (isinstance(coefficient, (int, float)) and math.isfinite(coefficient)
                and coefficient > 0):
            raise ValueError(f"the penalty coefficient must be a positive number, got {coefficient}")
        self.inner = inner
        self.network = inner.network
        self.coefficient = float(coefficient)
        self.with_multipliers = multipliers
        self.name = f"{inner.name}-{'auglag' if multipliers else 'penalty'}"
        # Forward the attributes the solver and the trainer read from the inner problem.
        self.num_classes = getattr(inner, "num_classes", None)
        self.num_examples = getattr(inner, "num_examples", None)

    def weight_parameters(self):
        return self.inner.weight_parameters()

    def state_parameters(self):
        return self.inner.state_parameters()

    def dense_multipliers(self):
        return self.inner.dense_multipliers() if self.with_multipliers else []

    def sparse_tables(self) -> list[SparseTable]:
        tables = self.inner.sparse_tables()
        if self.with_multipliers:
            return tables
        return [t for t in tables if t.role != "multiplier"]

    def begin_step(self) -> None:
        begin = getattr(self.inner, "begin_step", None)
        if begin is not None:
            begin()

    def lagrangian(self, x, y, index, rows, shard: BatchShard | None = None):
        rows = dict(rows)
        if not self.with_multipliers:
            # The inner problem still reads multiplier rows; zeros make its term vanish.
            for t in self.inner.sparse_tables():
                if t.role == "multiplier":
                    rows[t.name] = torch.zeros(
                        index.shape[0], t.table.shape[1], device=x.device, dtype=torch.float32
                    )
        if shard is None:
            # Formulations written before data-parallel training take no shard.
            terms = self.inner.lagrangian(x, y, index, rows)
        else:
            terms = self.inner.lagrangian(x, y, index, rows, shard=shard)
        penalty = terms.loss.new_zeros(())
        for cut, g in terms.defects.items():
            per_row = g.float().pow(2).sum(dim=1)
            # Synthetic rows are the same on every rank and appear on one rank only.
            if cut in terms.synthetic:
                penalty = penalty + per_row.mean()
            else:
                penalty = penalty + batch_mean(per_row, shard)
        penalty = 0.5 * self.coefficient * penalty
        base = terms.lagrangian if self.with_multipliers else terms.loss
        extras = dict(terms.extras)
        extras["penalty"] = penalty.item()
        return Terms(
            loss=terms.loss, lagrangian=base + penalty, defects=terms.defects, extras=extras,
            synthetic=terms.synthetic,
        )

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.predict(x)

    def variable_counts(self) -> dict[str, int]:
        counts = self.inner.variable_counts()
        if not self.with_multipliers:
            counts["multipliers"] = 0
        return counts
