"""Block-parallel DistProp: each rank trains a contiguous group of blocks.

DistProp's Lagrangian is a sum of per-block terms. Block 0 z-scores its
outputs on real data against the Gaussians of cut 0. A middle block ``l``
reads synthetic samples of cut ``l - 1`` and is z-scored against the
Gaussians of cut ``l``, and the last block's loss reads the samples of the
last cut. Blocks and cuts are numbered from 0 here, and the statistics name
cut ``c`` as ``cut{c+1}``. A block's weights, and the multipliers of its cut,
appear in its own term only. The Gaussians of cut ``c`` appear in the terms
of blocks ``c`` and ``c + 1``.

So a rank needs only the Gaussians at the cuts its blocks read and write.
Where two neighbouring ranks share a cut, both keep a copy of its Gaussians
and of their Adagrad accumulators. At every gradient evaluation each rank
sends the other its partial gradient of those ``(M, d)`` parameters, and both
step with the same sum, so the copies stay equal. No activation of real data
leaves rank 0.

Exchange schedules:

* ``synchronous``: a rank waits for its neighbours' partial gradients of this
  evaluation before it steps. The run equals sequential DistProp, up to the
  order of floating-point sums.
* ``stale``: a rank sends this evaluation's partial gradients and steps the
  shared Gaussians with the sums exchanged at the same evaluation of the
  previous step, which arrived while it computed. Communication overlaps the
  next step's computation, at the price of one step of delay on the shared
  Gaussians. At the first step the shared Gaussians do not move, and the
  gradients of the last step are never applied. Weights, multipliers and the
  Gaussians of cuts inside a rank's group use current gradients in both
  schedules.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distprop_fast.distributed.context import EXCHANGES, DistributedContext
from distprop_fast.distributed.statistics import StatisticsLayout, multiplier_rows
from distprop_fast.formulations.base import Terms, zeros_table
from distprop_fast.formulations.distprop import DistProp
from distprop_fast.solvers import _DIVERGENCE_ADVICE, NonFiniteError, SaddlePointStep


class BlockLayout:
    """The contiguous group of blocks that each rank trains.

    Args:
        num_blocks: the network's number of blocks ``L``.
        counts: blocks per rank, in rank order; each at least 1, summing to ``L``.
    """

    def __init__(self, num_blocks: int, counts: list[int]):
        counts = list(counts)
        if not counts or any(c < 1 for c in counts) or sum(counts) != num_blocks:
            raise ValueError(
                f"blocks per rank must be positive and add up to the network's {num_blocks} "
                f"blocks, got {counts}"
            )
        self.num_blocks = num_blocks
        self.counts = counts
        self.starts = [sum(counts[:r]) for r in range(len(counts))]

    @classmethod
    def balanced(cls, num_blocks: int, world_size: int) -> BlockLayout:
        """Split the blocks into ``world_size`` groups whose sizes differ by at most one."""
        if world_size > num_blocks:
            raise ValueError(
                f"block-parallel training needs at most one rank per block; the network has "
                f"{num_blocks} blocks but {world_size} processes were launched"
            )
        base, extra = divmod(num_blocks, world_size)
        return cls(num_blocks, [base + (1 if r < extra else 0) for r in range(world_size)])

    @classmethod
    def parse(cls, text: str | None, num_blocks: int, world_size: int) -> BlockLayout:
        """Build a layout from ``"1,3"`` (blocks per rank), or a balanced one for ``None``."""
        if text is None:
            return cls.balanced(num_blocks, world_size)
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"blocks per rank must be comma-separated integers such as '1,3', got {text!r}"
            ) from None
        if len(counts) != world_size:
            raise ValueError(
                f"blocks per rank {text!r} names {len(counts)} ranks but {world_size} "
                "processes were launched"
            )
        return cls(num_blocks, counts)

    @property
    def world_size(self) -> int:
        return len(self.counts)

    def blocks(self, rank: int) -> range:
        """Return the blocks rank ``rank`` trains."""
        return range(self.starts[rank], self.starts[rank] + self.counts[rank])

    def owner(self, block: int) -> int:
        """Return the rank that trains ``block``."""
        for rank in range(self.world_size):
            if block in self.blocks(rank):
                return rank
        raise ValueError(f"block {block} is outside [0, {self.num_blocks})")


class _Pending:
    """One posted exchange: its requests, this rank's partial gradients and the receive buffers."""

    def __init__(self, requests, own: dict, received: dict):
        self.requests = requests
        self.own = own
        self.received = received

    def sums(self) -> dict[int, torch.Tensor]:
        for request in self.requests:
            request.wait()
        # own + peer on one rank and peer + own on the other: IEEE addition of
        # two numbers is commutative, so both copies get bitwise the same sum.
        return {cut: self.own[cut] + self.received[cut] for cut in self.own}


class GaussianExchange:
    """Sums the partial gradients of the Gaussians a rank shares with its neighbours.

    Args:
        peers: per shared cut, the neighbouring rank that keeps the other copy.
        schedule: ``"synchronous"`` or ``"stale"``.
    """

    def __init__(self, peers: dict[int, int], schedule: str):
        if schedule not in EXCHANGES:
            raise ValueError(f"exchange schedule must be one of {EXCHANGES}, got {schedule!r}")
        self.peers = dict(peers)
        self.schedule = schedule
        # Per evaluation slot (0: first evaluation of a step, 1: second), the
        # exchange posted at the previous step or, after a checkpoint, its sums.
        self._waiting: dict[int, _Pending | dict[int, torch.Tensor]] = {}

    def _post(self, partials: dict[int, torch.Tensor], slot: int) -> _Pending:
        requests, received = [], {}
        for cut, peer in sorted(self.peers.items()):
            own = partials[cut].contiguous()
            received[cut] = torch.empty_like(own)
            tag = 2 * cut + slot
            requests.append(dist.isend(own, peer, tag=tag))
            requests.append(dist.irecv(received[cut], peer, tag=tag))
        return _Pending(requests, partials, received)

    def combine(self, partials: dict[int, torch.Tensor], slot: int) -> dict[int, torch.Tensor | None]:
        """Return, per shared cut, the summed gradient to step with (``None``: do not step).

        Args:
            partials: per shared cut, this rank's flat partial gradient.
            slot: which evaluation of the step this is (0 or 1).
        """
        if not self.peers:
            return {}
        if self.schedule == "synchronous":
            return self._post(partials, slot).sums()

        # Wait for the previous step's exchange before posting this one, so
        # that at most one exchange per slot and peer is in flight.
        previous = self._waiting.pop(slot, None)
        sums = previous.sums() if isinstance(previous, _Pending) else previous
        self._waiting[slot] = self._post(partials, slot)
        if sums is None:
            return {cut: None for cut in self.peers}
        return sums

    def settle(self) -> None:
        """Wait for every exchange in flight and keep its sums (before a checkpoint or exit)."""
        for slot, waiting in list(self._waiting.items()):
            if isinstance(waiting, _Pending):
                self._waiting[slot] = waiting.sums()

    def state_dict(self) -> dict:
        """Return the sums the next step applies (stale schedule); settles first."""
        self.settle()
        return {"schedule": self.schedule, "waiting": dict(self._waiting)}

    def load_state_dict(self, state: dict) -> None:
        if state["schedule"] != self.schedule:
            raise ValueError(
                f"the checkpoint used the {state['schedule']!r} exchange, this run "
                f"{self.schedule!r}; pass the same --exchange"
            )
        self._waiting = {int(k): dict(v) for k, v in state["waiting"].items()}


class BlockParallelStep(SaddlePointStep):
    """One saddle-point step of block-parallel DistProp, taken by all ranks together.

    Every rank builds the whole :class:`DistProp` formulation and copies rank
    0's initial values at construction, so all ranks start from the same
    point. Each rank steps only the variables of its blocks. Rank 0 (block 0) keeps the
    ``(|D|, d_1)`` multiplier table, and the other ranks replace it by an
    empty ``(0, d_1)`` table. Every rank must call the step with the same
    batch at every step, because the loader and the redrawn noise share one
    random generator. Only rank 0 reads the batch's images.

    Args:
        formulation: a :class:`DistProp` (the penalty and augmented Lagrangian
            wrappers are not supported).
        context: the process group.
        layout: which blocks each rank trains.
        schedule: ``"synchronous"`` or ``"stale"`` exchange of shared Gaussians.
        **kwargs: as :class:`~distprop_fast.solvers.SaddlePointStep`.

    Returns the statistics of the whole network, the same on every rank. With
    the ``stale`` schedule they are summed while the step runs and checked at
    its end, so a guard stops the run after that step's update.

    Raises:
        TypeError: ``formulation`` is not a DistProp.
        ValueError: the layout does not fit the network or the process group.
    """

    def __init__(
        self,
        formulation: DistProp,
        context: DistributedContext,
        layout: BlockLayout,
        schedule: str = "synchronous",
        **kwargs,
    ):
        if not isinstance(formulation, DistProp):
            raise TypeError(
                f"block-parallel training runs DistProp only, got {type(formulation).__name__}; "
                "use --method distprop, or --distributed data"
            )
        num_blocks = len(formulation.network.blocks)
        if layout.num_blocks != num_blocks or layout.world_size != context.world_size:
            raise ValueError(
                f"the block layout {layout.counts} does not fit {num_blocks} blocks on "
                f"{context.world_size} ranks"
            )
        self.context = context
        self.layout = layout
        self.own_blocks = layout.blocks(context.rank)
        num_cuts = formulation.network.num_cuts
        # Cuts whose z-score term this rank evaluates, and cuts it reads or writes.
        self.target_cuts = [c for c in self.own_blocks if c < num_cuts]
        first, last = self.own_blocks[0], self.own_blocks[-1]
        self.touched_cuts = ([first - 1] if first > 0 else []) + self.target_cuts
        peers = {}
        if first > 0:
            peers[first - 1] = context.rank - 1
        if last < num_cuts:
            peers[last] = context.rank + 1
        if first > 0:
            d1 = formulation.first_multipliers.table.shape[1]
            formulation.first_multipliers.table = zeros_table(0, d1)

        self._layout_stats = StatisticsLayout(num_cuts)
        self._failure: NonFiniteError | None = None
        self._last_failure: NonFiniteError | None = None
        self._slot = 0
        self._pending_stats = None
        super().__init__(formulation, **kwargs)
        self.exchange = GaussianExchange(peers, schedule)
        self._shared_positions = self._positions_of_shared(peers)
        with torch.no_grad():
            for tensor in list(formulation.parameters()) + list(formulation.buffers()):
                context.broadcast_(tensor.data, src=0)

    def _select_variables(self):
        f = self.formulation
        weights = [p for b in self.own_blocks for p in f.network.blocks[b].parameters()]
        states = [f.w_mu[c] for c in self.touched_cuts] + [f.w_sigma[c] for c in self.touched_cuts]
        multipliers = [f.later_multipliers[c - 1] for c in self.target_cuts if c >= 1]
        tables = [f.first_multipliers] if self.own_blocks[0] == 0 else []
        return weights, states, multipliers, tables

    def _positions_of_shared(self, peers: dict[int, int]) -> dict[int, tuple[int, int]]:
        f = self.formulation
        ids = [id(p) for p in self.dense_params]
        return {c: (ids.index(id(f.w_mu[c])), ids.index(id(f.w_sigma[c]))) for c in peers}

    @property
    def schedule(self) -> str:
        return self.exchange.schedule

    def check_batch(self, x, y, index, allow_empty: bool = False) -> None:
        """Check the batch on rank 0; the other ranks read neither ``x`` nor ``y`` nor ``index``.

        Ranks that do not train block 0 may get empty ``x`` and ``y`` (see
        :class:`~distprop_fast.data.IndexOnlyLoader`).
        """
        if self.own_blocks[0] == 0:
            super().check_batch(x, y, index, allow_empty)

    # -- evaluation ------------------------------------------------------------

    def _lagrangian(self, x, y, index, rows) -> Terms:
        f = self.formulation
        term = None
        defects, synthetic = {}, []
        if self.own_blocks[0] == 0:
            term, defects["cut1"] = f.first_cut_term(x, y, rows["multipliers/cut1"])
        for c in self.target_cuts:
            if c == 0:
                continue
            t, defects[f"cut{c + 1}"] = f.synthetic_cut_term(c)
            synthetic.append(f"cut{c + 1}")
            term = t if term is None else term + t
        if self.own_blocks[-1] == len(f.network.blocks) - 1:
            loss = f.synthetic_loss()
        else:
            loss = f.w_mu[0].new_zeros(())
        lagrangian = loss if term is None else loss + term
        return Terms(loss, lagrangian, defects, synthetic=frozenset(synthetic))

    def _check_finite(self, terms: Terms) -> None:
        # Recorded and reported with the statistics, so every rank raises together.
        try:
            super()._check_finite(terms)
        except NonFiniteError as err:
            self._failure = self._failure or err

    def _combine_dense_grads(self, grads: list, terms: Terms, rows: dict) -> list:
        grads = list(grads)
        partials = {}
        for cut, (i_mu, i_sigma) in self._shared_positions.items():
            pieces = []
            for i in (i_mu, i_sigma):
                g = grads[i]
                pieces.append((torch.zeros_like(self.dense_params[i]) if g is None else g).reshape(-1))
            partials[cut] = torch.cat(pieces)
        sums = self.exchange.combine(partials, self._slot)
        self._slot += 1
        for cut, total in sums.items():
            i_mu, i_sigma = self._shared_positions[cut]
            if total is None:
                grads[i_mu] = grads[i_sigma] = None
                continue
            n = self.dense_params[i_mu].numel()
            grads[i_mu] = total[:n].view_as(self.dense_params[i_mu])
            grads[i_sigma] = total[n:].view_as(self.dense_params[i_sigma])
        return grads

    # -- statistics ------------------------------------------------------------

    def _partial_statistics(self, terms: Terms, rows: dict) -> torch.Tensor:
        f = self.formulation
        dense = {f"cut{c + 1}": f.later_multipliers[c - 1] for c in self.target_cuts if c >= 1}
        failed, self._failure = self._failure, None
        self._last_failure = failed
        return self._layout_stats.partial(terms, multiplier_rows(rows), dense, failed is not None)

    def _finish_statistics(self, total: torch.Tensor, step: int) -> dict[str, float]:
        stats, failures = self._layout_stats.assemble(total)
        if failures:
            own = self._last_failure
            if own is not None:
                raise own
            raise NonFiniteError(
                f"a loss, Lagrangian or defect is not finite on {failures} other rank(s) at "
                f"step {step}; the run diverged. " + _DIVERGENCE_ADVICE,
                "loss", step, None,
            )
        self._check_multipliers(stats, step)
        return stats

    def _statistics(self, terms, rows) -> dict[str, float]:
        partial = self._partial_statistics(terms, rows).to(self.context.device)
        if self.schedule == "stale":
            # Summed while the step goes on and checked in _step.
            work = dist.all_reduce(partial, async_op=True)
            self._pending_stats = (work, partial)
            return {}
        self.context.all_reduce_(partial)
        return self._finish_statistics(partial, self.step_count + 1)

    def _step(self, x, y, index) -> dict[str, float]:
        self._slot = 0
        stats = super()._step(x, y, index)
        if self._pending_stats is not None:
            work, total = self._pending_stats
            self._pending_stats = None
            work.wait()
            stats = self._finish_statistics(total, self.step_count)
        return stats

    def finish(self) -> None:
        """Wait for every exchange still in flight; call it on every rank before the group closes."""
        self.exchange.settle()

    # -- evaluation of the whole network -----------------------------------------

    @torch.no_grad()
    def _broadcast_group(self, params: list[torch.Tensor], src: int) -> None:
        if not params:
            return
        flat = torch.cat([p.reshape(-1) for p in params])
        self.context.broadcast_(flat, src=src)
        start = 0
        for p in params:
            p.copy_(flat[start : start + p.numel()].view_as(p))
            start += p.numel()

    def share_weights(self) -> None:
        """Copy every block's current weights from the rank that trains it to all ranks.

        Evaluation of the composed network needs all blocks; training does not.
        """
        for b, block in enumerate(self.formulation.network.blocks):
            self._broadcast_group(list(block.parameters()), self.layout.owner(b))

    def share_state(self) -> None:
        """Copy every block's weights, and every cut's Gaussians and dense multipliers, to all ranks.

        A cut's Gaussians and multipliers come from the rank whose block the cut
        ends. Afterwards every rank's formulation is the sequential run's, except
        for the multiplier table, which only rank 0 has.
        """
        self.share_weights()
        f = self.formulation
        for c in range(f.network.num_cuts):
            owned = [f.w_mu[c], f.w_sigma[c]]
            if c >= 1:
                owned.append(f.later_multipliers[c - 1])
            self._broadcast_group(owned, self.layout.owner(c))

    # -- checkpoints -----------------------------------------------------------

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["block_layout"] = {"counts": self.layout.counts, "rank": self.context.rank}
        state["exchange"] = self.exchange.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load this rank's :meth:`state_dict`; the block layout must be the same."""
        own = {"counts": self.layout.counts, "rank": self.context.rank}
        if state.get("block_layout") != own:
            raise ValueError(
                f"the checkpoint contains the block layout {state.get('block_layout')}, but "
                f"this rank has {own}; resume with the same --blocks-per-rank and number of "
                "processes"
            )
        super().load_state_dict(state)
        self.exchange.load_state_dict(state["exchange"])
