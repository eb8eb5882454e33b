"""Data-parallel training: every rank steps on its part of the global batch.

Weights, Gaussians and dense multipliers are replicated. Every rank evaluates
its part of the Lagrangian, the dense gradients are summed across ranks, and
every rank takes the same step. The sparse tables (DistProp's first-cut
multipliers, ExtraProp's states and multipliers) and their Adagrad
accumulators are sharded by dataset index. Rank ``r`` allocates only the rows
of the indices it owns, and their gradients never leave it.

The summed gradients equal the single-process gradients of the global batch,
up to the order of floating-point sums, because each rank's Lagrangian is its
share of the global one. A rank divides its sum of per-row losses by the
global batch size, the multiplier term is a plain sum over rows, and only
rank 0 adds the terms that do not depend on the batch (see
:class:`~distprop_fast.formulations.base.BatchShard`).
"""

from __future__ import annotations

import torch

from distprop_fast.data import IndexPartition
from distprop_fast.distributed.context import DistributedContext
from distprop_fast.distributed.statistics import StatisticsLayout, multiplier_rows
from distprop_fast.formulations.base import BatchShard, Formulation, Terms
from distprop_fast.solvers import _DIVERGENCE_ADVICE, NonFiniteError, SaddlePointStep


class DataParallelStep(SaddlePointStep):
    """One saddle-point step of data-parallel training, taken by all ranks together.

    Args:
        formulation: the problem, built with ``partition`` so that its sparse
            tables hold this rank's rows only.
        context: the process group.
        partition: the dataset indices this rank owns.
        **kwargs: as :class:`~distprop_fast.solvers.SaddlePointStep`;
            ``num_examples`` is the whole training set's ``|D|``.

    Call it with this rank's part ``(x, y, index)`` of the global batch, where
    ``index`` contains dataset indices this rank owns (as
    :class:`~distprop_fast.data.ShardedBatchLoader` yields them); the part may
    be empty. Every rank must call it at every step. It returns the statistics
    of the global batch, the same on every rank, and a guard that stops the
    run raises on every rank at the same step.

    At construction, rank 0's dense parameters and buffers are copied to every
    rank, so the replicas start equal even if their initialisations differ.
    """

    def __init__(
        self,
        formulation: Formulation,
        context: DistributedContext,
        partition: IndexPartition,
        **kwargs,
    ):
        if partition.world_size != context.world_size or partition.rank != context.rank:
            raise ValueError(
                f"{partition} does not match rank {context.rank} of {context.world_size}; "
                "build it from the same process group"
            )
        self.context = context
        self.partition = partition
        self._shard: BatchShard | None = None
        self._failure: NonFiniteError | None = None
        self._layout: StatisticsLayout | None = None
        self._stats: dict[str, float] = {}
        super().__init__(formulation, **kwargs)
        with torch.no_grad():
            for tensor in list(formulation.parameters()) + list(formulation.buffers()):
                context.broadcast_(tensor.data, src=0)

    def _check_sizes(self, num_examples: int | None, num_classes: int | None) -> None:
        super()._check_sizes(None, num_classes)
        if num_examples is not None and num_examples != self.partition.num_examples:
            raise ValueError(
                f"num_examples={num_examples} but the partition covers "
                f"{self.partition.num_examples} indices; pass the training set's |D|"
            )
        for t in self.tables:
            if t.table.shape[0] != self.partition.shard_size:
                raise ValueError(
                    f"the table {t.name!r} has {t.table.shape[0]} rows, but rank "
                    f"{self.partition.rank} owns {self.partition.shard_size} indices; build "
                    "the formulation with partition= so that it allocates only its shard"
                )

    def _check_owned(self, index: torch.Tensor) -> None:
        owned = self.partition.owns(index)
        if not bool(owned.all()):
            bad = int(index[~owned][0])
            raise ValueError(
                f"index {bad} belongs to rank {bad % self.partition.world_size}, not to rank "
                f"{self.partition.rank}; give each rank its part of the global batch "
                "(ShardedBatchLoader does)"
            )

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> dict[str, float]:
        problem: Exception | None = None
        try:
            self.check_batch(x, y, index, allow_empty=True)
            self._check_owned(index)
        except (TypeError, ValueError) as err:
            problem = err

        # Every rank learns the global batch size and whether any rank rejected
        # its part, so that all of them raise together instead of waiting.
        rows = index.numel() if problem is None else 0
        counts = torch.tensor([rows, 0 if problem is None else 1], device=self.context.device)
        self.context.all_reduce_(counts)
        global_size, rejected = (int(v) for v in counts.tolist())
        if problem is not None:
            raise problem
        if rejected:
            raise ValueError(
                f"{rejected} other rank(s) rejected their part of the batch at step "
                f"{self.step_count + 1}; their error messages name the problem"
            )
        if global_size == 0:
            raise ValueError("the global batch is empty on every rank; pass at least one example")

        self._shard = BatchShard(global_size, shared=self.context.rank == 0)
        return self._step(x, y, self.partition.to_local(index))

    def _lagrangian(self, x, y, index, rows) -> Terms:
        return self.formulation.lagrangian(x, y, index, rows, shard=self._shard)

    def _check_finite(self, terms: Terms) -> None:
        # Recorded, not raised: the other ranks learn of it in the all-reduce.
        self._failure = None
        try:
            super()._check_finite(terms)
        except NonFiniteError as err:
            self._failure = err

    def _dense_multiplier_report(self) -> dict[str, torch.Tensor]:
        # Rank 0 alone reports the replicated multipliers, so they count once.
        if self.context.rank != 0:
            return {}
        dense = self.formulation.dense_multipliers()
        return {f"cut{l + 2}": lam for l, lam in enumerate(dense)}

    def _combine_dense_grads(self, grads: list, terms: Terms, rows: dict) -> list:
        if self._layout is None:
            self._layout = StatisticsLayout(
                self.formulation.network.num_cuts, tuple(sorted(terms.extras))
            )
        partial = self._layout.partial(
            terms, multiplier_rows(rows), self._dense_multiplier_report(),
            self._failure is not None,
        )

        # One all-reduce carries the gradients and the statistics together.
        flat = []
        for g, p in zip(grads, self.dense_params):
            flat.append(torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1))
        buffer = torch.cat(flat + [partial.to(self.context.device)])
        self.context.all_reduce_(buffer)
        self._stats, failures = self._layout.assemble(buffer[-self._layout.size :])
        if failures:
            self._raise_failure(failures)

        combined, start = [], 0
        for p in self.dense_params:
            combined.append(buffer[start : start + p.numel()].view_as(p))
            start += p.numel()
        return combined

    def _raise_failure(self, failures: int) -> None:
        own, self._failure = self._failure, None
        if own is not None:
            raise own
        step = self.step_count + 1
        raise NonFiniteError(
            f"a loss, Lagrangian or defect is not finite on {failures} other rank(s) at step "
            f"{step}; the run diverged. " + _DIVERGENCE_ADVICE,
            "loss", step, None,
        )

    def _statistics(self, terms, rows) -> dict[str, float]:
        # Summed across ranks in the last evaluation's all-reduce.
        return dict(self._stats)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["partition"] = {
            "num_examples": self.partition.num_examples,
            "world_size": self.partition.world_size,
            "rank": self.partition.rank,
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load this rank's :meth:`state_dict`; the partition must be the same."""
        own = self.state_dict()["partition"]
        saved = state.get("partition")
        if saved != own:
            raise ValueError(
                f"the checkpoint contains the shard {saved}, but this rank owns {own}; "
                "resume with the same number of processes"
            )
        super().load_state_dict(state)
