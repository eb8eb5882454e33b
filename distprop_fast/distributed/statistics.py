"""Step statistics of a distributed step, assembled from per-rank partial sums.

Each rank writes its part of the loss, the Lagrangian, the absolute defects,
the squared multipliers and its count of non-finite evaluations into one
vector of fixed layout. After the vector is summed across ranks, every rank
builds the same statistics that :class:`~distprop_fast.solvers.SaddlePointStep`
reports in a single process, so every rank takes the same decision when a
guard stops the run.
"""

from __future__ import annotations

import math

import torch

from distprop_fast.formulations.base import Terms

# Entries per cut: sum |g|, number of entries of g, sum lambda^2, and 1 on each
# rank that has multipliers of that cut.
_PER_CUT = 4
_HEAD = ("loss", "lagrangian", "failures")


class StatisticsLayout:
    """The order of the partial sums, the same on every rank.

    Args:
        num_cuts: the network's number of cuts; cut ``k`` is named ``cut{k+1}``.
        extras: names of :attr:`Terms.extras` that every rank reports and that
            add up across ranks (the penalty).
    """

    def __init__(self, num_cuts: int, extras: tuple[str, ...] = ()):
        self.cuts = [f"cut{k + 1}" for k in range(num_cuts)]
        self.extras = tuple(extras)

    @property
    def size(self) -> int:
        return len(_HEAD) + _PER_CUT * len(self.cuts) + len(self.extras)

    def partial(
        self,
        terms: Terms,
        multiplier_rows: dict[str, torch.Tensor],
        dense_multipliers: dict[str, torch.Tensor],
        failed: bool,
    ) -> torch.Tensor:
        """Return this rank's partial sums, float32 of shape ``(size,)``.

        Args:
            terms: this rank's part of the Lagrangian.
            multiplier_rows: per cut name, the multiplier rows this rank read, ``(B_r, d)``.
            dense_multipliers: per cut name, the dense multipliers this rank reports.
            failed: whether this rank saw a non-finite value since the last report.
        """
        values = [terms.loss.detach().float(), terms.lagrangian.detach().float()]
        values.append(terms.loss.new_tensor(1.0 if failed else 0.0, dtype=torch.float32))
        zero = terms.loss.new_zeros((), dtype=torch.float32)
        for cut in self.cuts:
            g = terms.defects.get(cut)
            if g is None:
                values += [zero, zero]
            else:
                g = g.detach().float()
                values += [g.abs().sum(), zero + g.numel()]
            lam = multiplier_rows.get(cut)
            if lam is None:
                lam = dense_multipliers.get(cut)
            if lam is None:
                values += [zero, zero]
            else:
                values += [lam.detach().float().pow(2).sum(), zero + 1.0]
        for name in self.extras:
            values.append(zero + float(terms.extras.get(name, 0.0)))
        return torch.stack([v.reshape(()) for v in values])

    def assemble(self, total: torch.Tensor) -> tuple[dict[str, float], int]:
        """Return ``(statistics, ranks that failed)`` from the summed vector."""
        values = total.tolist()
        stats = {"loss": values[0], "lagrangian": values[1]}
        failures = round(values[2])
        norms = {}
        for k, cut in enumerate(self.cuts):
            abs_sum, count, square_sum, present = values[3 + _PER_CUT * k : 3 + _PER_CUT * (k + 1)]
            if count > 0:
                stats[f"defect/{cut}"] = abs_sum / count
            if present > 0:
                # NaN fails the comparison and is reported as it is.
                norm = math.sqrt(square_sum) if square_sum >= 0 else square_sum
                norms[f"multiplier_norm/{cut}"] = norm
        stats.update(norms)
        offset = len(_HEAD) + _PER_CUT * len(self.cuts)
        for i, name in enumerate(self.extras):
            stats[name] = values[offset + i]
        return stats, failures


def multiplier_rows(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the multiplier rows of a step's sparse tables, keyed by cut name."""
    return {
        name.split("/", 1)[1]: r for name, r in rows.items() if name.startswith("multipliers/")
    }
