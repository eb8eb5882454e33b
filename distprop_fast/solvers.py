"""Saddle-point solvers (GDA, extragradient, extrapolation from the past) with Adagrad or SGD step rules.

One :class:`SaddlePointStep` call performs one step on a batch. Each group of
variables has its own step size and rule: network weights, other dense primal
variables (Gaussians), multipliers, and per-example state tables. Weights and
states descend the Lagrangian, multipliers ascend it.

ExtraAdagrad accumulator semantics: the squared-gradient accumulator is updated
at the extrapolation *and* at the update, and it is never restored. Each
half-step divides by the square root of the accumulator at that moment. Only
the parameter values are restored before the update half-step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distprop_fast import ops
from distprop_fast.formulations.base import Formulation, SparseTable, Terms, zeros_table

SOLVERS = ("gda", "extragradient", "past-extragradient")
STEP_RULES = ("adagrad", "sgd")


class DivergenceError(FloatingPointError):
    """A run left the region where its iterates mean anything.

    Attributes:
        quantity: what failed the guard, such as ``"loss"`` or ``"multiplier norm"``,
            or ``None`` when the raiser did not say.
        step: the 1-based step at which it was seen, or ``None``.
        cut: the cut it belongs to, or ``None`` for whole-network quantities.
    """

    def __init__(
        self,
        message: str,
        quantity: str | None = None,
        step: int | None = None,
        cut: str | None = None,
    ):
        super().__init__(message)
        self.quantity = quantity
        self.step = step
        self.cut = cut


class NonFiniteError(DivergenceError):
    """A loss, Lagrangian, defect or multiplier became NaN or infinite."""


_DIVERGENCE_ADVICE = (
    "Try a smaller multiplier step size (--lr-multipliers), smaller primal step sizes "
    "(--lr-weights, --lr-states) or, with shrunk constraints, a larger margin (--margin)"
)


@dataclass
class StepRuleConfig:
    """Step size and rule for one group of variables."""

    lr: float
    rule: str = "adagrad"
    eps: float = 1e-10

    def __post_init__(self):
        if self.rule not in STEP_RULES:
            raise ValueError(f"step rule must be one of {STEP_RULES}, got {self.rule!r}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"step size must be finite and non-negative, got {self.lr}")


class DenseStepRule:
    """(Extra)Adagrad or (extra)SGD on a list of dense tensors, in place."""

    def __init__(self, params: list[torch.Tensor], config: StepRuleConfig, maximize: bool):
        self.params = params
        self.config = config
        self.sign = 1.0 if maximize else -1.0
        self.accums = [torch.zeros_like(p) for p in params] if config.rule == "adagrad" else []
        self._saved: list[torch.Tensor] | None = None

    @torch.no_grad()
    def _step(self, grads: list[torch.Tensor | None]) -> None:
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            if self.config.rule == "adagrad":
                acc = self.accums[i]
                acc.addcmul_(g, g)
                p.addcdiv_(g, acc.sqrt().add_(self.config.eps), value=self.sign * self.config.lr)
            else:
                p.add_(g, alpha=self.sign * self.config.lr)

    def step(self, grads) -> None:
        """Take one plain step from the current point (GDA)."""
        self._step(grads)

    @torch.no_grad()
    def extrapolate(self, grads) -> None:
        """Save the current point and step to the look-ahead point."""
        self._saved = [p.detach().clone() for p in self.params]
        self._step(grads)

    @torch.no_grad()
    def update(self, grads) -> None:
        """Restore the saved point and step from it with the look-ahead gradient."""
        if self._saved is None:
            raise RuntimeError("update() needs a preceding extrapolate()")
        for p, saved in zip(self.params, self._saved):
            p.copy_(saved)
        self._saved = None
        self._step(grads)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the point saved by :meth:`extrapolate` back, without a step."""
        if self._saved is None:
            raise RuntimeError("restore() needs a preceding extrapolate()")
        for p, saved in zip(self.params, self._saved):
            p.copy_(saved)
        self._saved = None

    def state_dict(self) -> dict:
        return {"accums": list(self.accums), "saved": self._saved}

    def load_state_dict(self, state: dict, where: str) -> None:
        _copy_tensors(self.accums, state["accums"], f"{where} accumulators")
        saved = state["saved"]
        if saved is None:
            self._saved = None
        else:
            self._saved = [p.detach().clone() for p in self.params]
            _copy_tensors(self._saved, saved, f"{where} extrapolation buffers")


class SparseRowStepRule:
    """(Extra)Adagrad or (extra)SGD on batch rows of a ``(|D|, d)`` table.

    Only the rows named by the batch index change, in the table and in its
    accumulator; gradients of duplicate indices are summed before the step.
    The table may live on another device than the model: tables stay in host
    memory when the model moves to a GPU, so the index and the row gradients
    are copied to the table's device for the step.
    """

    def __init__(self, table: SparseTable, config: StepRuleConfig, maximize: bool, backend: str):
        self.table = table
        self.config = config
        self.maximize = maximize
        self.backend = backend
        self.accum = None
        if config.rule == "adagrad":
            # float16's maximum is 65504, which one squared defect above 256 exceeds.
            # The per-example L1 defect sums |z| over a cut and can reach thousands,
            # so a float16 table gets a float32 accumulator. bfloat16 has float32's
            # range and keeps its own dtype.
            dtype = table.table.dtype
            accum_dtype = torch.float32 if dtype == torch.float16 else dtype
            self.accum = zeros_table(*table.table.shape, dtype=accum_dtype)
        self._saved: torch.Tensor | None = None

    def _half_step(self, index, grad, phase, saved):
        device = self.table.table.device
        index, grad = index.to(device), grad.to(device)
        if self.config.rule == "adagrad":
            return ops.sparse_extra_adagrad_(
                self.table.table, self.accum, index, grad, self.config.lr, self.config.eps,
                phase, saved, maximize=self.maximize, backend=self.backend,
            )
        return ops.sparse_sgd_(
            self.table.table, index, grad, self.config.lr, phase, saved, maximize=self.maximize
        )

    @torch.no_grad()
    def step(self, index, grad) -> None:
        self._half_step(index, grad, "extrapolate", None)

    @torch.no_grad()
    def extrapolate(self, index, grad) -> None:
        self._saved = self._half_step(index, grad, "extrapolate", None)

    @torch.no_grad()
    def update(self, index, grad) -> None:
        if self._saved is None:
            raise RuntimeError("update() needs a preceding extrapolate()")
        self._half_step(index, grad, "update", self._saved)
        self._saved = None

    @torch.no_grad()
    def restore(self, index) -> None:
        """Write the rows saved by :meth:`extrapolate` at ``index`` back, without a step.

        ``index`` must be the one given to :meth:`extrapolate` and hold no duplicates.
        """
        if self._saved is None:
            raise RuntimeError("restore() needs a preceding extrapolate()")
        self.table.table[index.to(self.table.table.device)] = self._saved
        self._saved = None

    def state_dict(self) -> dict:
        return {"accum": self.accum, "saved": self._saved}

    def load_state_dict(self, state: dict, where: str) -> None:
        if (self.accum is None) != (state["accum"] is None):
            raise ValueError(
                f"{where}: the checkpoint was written with a different step rule "
                f"(accumulator {'absent' if state['accum'] is None else 'present'})"
            )
        if self.accum is not None:
            _copy_tensors([self.accum], [state["accum"]], f"{where} accumulator")
        saved = state["saved"]
        self._saved = None if saved is None else saved.clone()


class SaddlePointStep:
    """One GDA, extragradient or past-extragradient step of a formulation on a batch.

    Args:
        formulation: the problem (:class:`~distprop_fast.formulations.Formulation`).
        solver: ``"gda"``, ``"extragradient"`` or ``"past-extragradient"``
            (extrapolation from the past: one gradient evaluation per step).
        weights: step rule for the network weights.
        states: step rule for dense primal variables and state tables.
        multipliers: step rule for all multipliers.
        num_examples: ``|D|``; batch indices must lie in ``[0, |D|)``.
        num_classes: ``M``; labels must lie in ``[0, M)``.
        backend: implementation of the fused ops.
        max_multiplier_norm: divergence guard; a step whose multiplier norm at
            any cut exceeds it raises :class:`DivergenceError`. ``None`` disables it.

    Calling the object with ``(x, y, index)`` performs one step and returns the
    statistics of the point where the gradient was evaluated (the current point,
    or for ``"past-extragradient"`` the look-ahead point): ``loss``,
    ``lagrangian``, and per cut the mean absolute defect and the multiplier norm
    over the batch rows. A non-finite loss, Lagrangian, defect or multiplier
    raises :class:`NonFiniteError` before any variable changes.
    """

    def __init__(
        self,
        formulation: Formulation,
        solver: str = "extragradient",
        weights: StepRuleConfig | None = None,
        states: StepRuleConfig | None = None,
        multipliers: StepRuleConfig | None = None,
        num_examples: int | None = None,
        num_classes: int | None = None,
        backend: str = "auto",
        max_multiplier_norm: float | None = None,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.formulation = formulation
        self.solver = solver
        self.num_examples = num_examples
        self.num_classes = num_classes
        self.step_count = 0
        if max_multiplier_norm is not None and not max_multiplier_norm > 0:
            raise ValueError(
                f"max_multiplier_norm must be a positive number or None, got {max_multiplier_norm}"
            )
        self.max_multiplier_norm = max_multiplier_norm
        weights = weights or StepRuleConfig(1e-3)
        states = states or StepRuleConfig(1e-2)
        multipliers = multipliers or StepRuleConfig(1e-6, "sgd")
        self.configs = {"weights": weights, "states": states, "multipliers": multipliers}

        weight_params, state_params, multiplier_params, self.tables = self._select_variables()
        self.dense_params = weight_params + state_params + multiplier_params
        self.dense_rules = [
            DenseStepRule(weight_params, weights, maximize=False),
            DenseStepRule(state_params, states, maximize=False),
            DenseStepRule(multiplier_params, multipliers, maximize=True),
        ]
        self.sparse_rules = [
            SparseRowStepRule(
                t, states if t.role == "state" else multipliers, t.role == "multiplier", backend
            )
            for t in self.tables
        ]
        self._param_device = next(formulation.parameters()).device
        self._check_sizes(num_examples, num_classes)
        # Extrapolation from the past: the look-ahead gradient of the previous
        # step, dense and, for each table, per row (the last gradient the row saw).
        self._past_dense: list[torch.Tensor | None] | None = None
        self._past_rows: list[torch.Tensor] = []
        if solver == "past-extragradient":
            self._past_dense = [None] * len(self.dense_params)
            self._past_rows = [zeros_table(*t.table.shape) for t in self.tables]

    def _select_variables(self):
        """Return the weights, dense states, dense multipliers and sparse tables this step changes."""
        f = self.formulation
        return f.weight_parameters(), f.state_parameters(), f.dense_multipliers(), f.sparse_tables()

    # -- checks ----------------------------------------------------------------

    def _check_sizes(self, num_examples: int | None, num_classes: int | None) -> None:
        for t in self.tables:
            if num_examples is not None and t.table.shape[0] != num_examples:
                raise ValueError(
                    f"num_examples={num_examples} but the table {t.name!r} has "
                    f"{t.table.shape[0]} rows; pass the |D| the formulation was built with"
                )
        built_for = getattr(self.formulation, "num_classes", None)
        if num_classes is not None and built_for is not None and built_for != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the formulation was built for {built_for} "
                "classes; pass the same M to both"
            )

    def check_batch(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, allow_empty: bool = False
    ) -> None:
        """Raise a ValueError naming the value and the fix for an invalid batch.

        ``allow_empty`` accepts a batch of 0 rows, which a rank's part of a
        small global batch can be.
        """
        device = self._param_device
        for name, t in (("x", x), ("y", y), ("index", index)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != device:
                raise ValueError(
                    f"{name} is on {t.device} but the model is on {device}; "
                    f"move the batch with .to({str(device)!r})"
                )
        if x.dtype != torch.float32:
            raise ValueError(f"x must be float32, got {x.dtype}; convert it with x.float()")
        for name, t in (("y", y), ("index", index)):
            if t.dtype != torch.int64:
                raise ValueError(f"{name} must be int64, got {t.dtype}; convert it with .long()")
            if t.dim() != 1 or t.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{name} must have shape ({x.shape[0]},) to match x of shape "
                    f"{tuple(x.shape)}, got {tuple(t.shape)}"
                )
        if x.shape[0] == 0 and not allow_empty:
            raise ValueError("the batch is empty (x has 0 rows); pass at least one example")
        expected = self.formulation.network.input_shape
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or Inf values; clean or re-normalise the inputs")
        _check_range("label", y, self.num_classes, "the number of classes M")
        _check_range("index", index, self.num_examples, "the training-set size |D|")

    # -- evaluation ------------------------------------------------------------

    def _evaluate(self, x, y, index):
        rows = {}
        for t in self.tables:
            # The rows go to the model's device, which need not be the table's.
            row_values = t.table[index.to(t.table.device)]
            rows[t.name] = row_values.to(x.device, torch.float32).requires_grad_(True)
        terms = self._lagrangian(x, y, index, rows)
        self._check_finite(terms)
        leaves = list(rows.values())
        if terms.lagrangian.requires_grad:
            grads = torch.autograd.grad(
                terms.lagrangian, self.dense_params + leaves, allow_unused=True
            )
        else:
            # A rank whose part of the Lagrangian touches no variable.
            grads = (None,) * (len(self.dense_params) + len(leaves))
        dense_grads = self._combine_dense_grads(list(grads[: len(self.dense_params)]), terms, rows)
        row_grads = [g if g is not None else torch.zeros_like(r) for g, r in zip(grads[len(self.dense_params) :], leaves)]
        return terms, rows, dense_grads, row_grads

    def _lagrangian(self, x, y, index, rows) -> Terms:
        """Evaluate this step's part of the Lagrangian (all of it in a single process)."""
        return self.formulation.lagrangian(x, y, index, rows)

    def _combine_dense_grads(self, grads: list, terms: Terms, rows: dict) -> list:
        """Turn this process's dense gradients into the ones to step with.

        A single process steps with its own gradients; the distributed steps sum
        them across ranks here.
        """
        return grads

    def _check_finite(self, terms: Terms) -> None:
        checks = [("loss", None, terms.loss), ("Lagrangian", None, terms.lagrangian)]
        checks += [("defect", cut, g) for cut, g in terms.defects.items()]
        for quantity, cut, value in checks:
            if not torch.isfinite(value).all():
                where = f" at {cut}" if cut else ""
                step = self.step_count + 1
                raise NonFiniteError(
                    f"{quantity}{where} is not finite at step {step}; the run diverged. "
                    + _DIVERGENCE_ADVICE,
                    quantity, step, cut,
                )

    def _check_multipliers(self, stats: dict[str, float], step: int | None = None) -> None:
        if step is None:
            step = self.step_count + 1
        for key, norm in stats.items():
            if not key.startswith("multiplier_norm/"):
                continue
            cut = key.split("/", 1)[1]
            if not math.isfinite(norm):
                raise NonFiniteError(
                    f"multiplier norm at {cut} is not finite at step {step}; the dual ascent "
                    "diverged. " + _DIVERGENCE_ADVICE,
                    "multiplier norm", step, cut,
                )
            bound = self.max_multiplier_norm
            if bound is not None and norm > bound:
                raise DivergenceError(
                    f"multiplier norm at {cut} is {norm:.4g} at step {step}, above the bound "
                    f"{bound:g} (--max-multiplier-norm); the dual ascent is diverging. "
                    + _DIVERGENCE_ADVICE,
                    "multiplier norm", step, cut,
                )

    def _split(self, dense_grads):
        sizes = [len(rule.params) for rule in self.dense_rules]
        out, start = [], 0
        for n in sizes:
            out.append(dense_grads[start : start + n])
            start += n
        return out

    # -- one step --------------------------------------------------------------

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> dict[str, float]:
        self.check_batch(x, y, index)
        return self._step(x, y, index)

    def _step(self, x, y, index) -> dict[str, float]:
        """Take one step on a checked batch whose ``index`` addresses the table rows."""
        begin = getattr(self.formulation, "begin_step", None)
        if begin is not None:
            begin()

        if self.solver == "past-extragradient":
            return self._past_extragradient_step(x, y, index)

        terms, rows, dense_grads, row_grads = self._evaluate(x, y, index)
        stats = self._statistics(terms, rows)
        self._check_multipliers(stats)

        if self.solver == "gda":
            for rule, grads in zip(self.dense_rules, self._split(dense_grads)):
                rule.step(grads)
            for rule, grad in zip(self.sparse_rules, row_grads):
                rule.step(index, grad)
        else:
            for rule, grads in zip(self.dense_rules, self._split(dense_grads)):
                rule.extrapolate(grads)
            for rule, grad in zip(self.sparse_rules, row_grads):
                rule.extrapolate(index, grad)
            _, _, dense_grads, row_grads = self._evaluate(x, y, index)
            for rule, grads in zip(self.dense_rules, self._split(dense_grads)):
                rule.update(grads)
            for rule, grad in zip(self.sparse_rules, row_grads):
                rule.update(index, grad)

        self.step_count += 1
        return stats

    def _past_extragradient_step(self, x, y, index) -> dict[str, float]:
        # Extrapolate every batch row once with its stored gradient: the kernels
        # sum duplicate indices, so passing the batch index would count a row twice.
        unique = torch.unique(index)
        for rule, grads in zip(self.dense_rules, self._split(self._past_dense)):
            rule.extrapolate(grads)
        for rule, past in zip(self.sparse_rules, self._past_rows):
            rule.extrapolate(unique, past[unique.to(past.device)])

        try:
            terms, rows, dense_grads, row_grads = self._evaluate(x, y, index)
            stats = self._statistics(terms, rows)
            self._check_multipliers(stats)
        except DivergenceError:
            # Leave the variables at the current point, as the other solvers do.
            for rule in self.dense_rules:
                rule.restore()
            for rule in self.sparse_rules:
                rule.restore(unique)
            raise

        for rule in self.dense_rules:
            rule.restore()
        for rule in self.sparse_rules:
            rule.restore(unique)
        for rule, grads in zip(self.dense_rules, self._split(dense_grads)):
            rule.step(grads)
        for rule, grad in zip(self.sparse_rules, row_grads):
            rule.step(index, grad)

        self._past_dense = [None if g is None else g.detach().clone() for g in dense_grads]
        with torch.no_grad():
            for past, grad in zip(self._past_rows, row_grads):
                past_index = index.to(past.device)
                past[past_index] = 0.0
                past.index_add_(0, past_index, grad.to(past.device, past.dtype))
        self.step_count += 1
        return stats

    # -- checkpoints -----------------------------------------------------------

    def state_dict(self) -> dict:
        """Return every tensor and counter needed to continue this run exactly.

        Holds the formulation's parameters, buffers and sparse tables, every
        accumulator, the extrapolation buffers (empty between steps) and the
        stored look-ahead gradients of extrapolation from the past. The tensors
        are the live ones, not copies; ``torch.save`` them before the next step.
        """
        return {
            "solver": self.solver,
            "step_count": self.step_count,
            "formulation": self.formulation.state_dict(),
            "tables": {t.name: t.table for t in self.tables},
            "dense_rules": [rule.state_dict() for rule in self.dense_rules],
            "sparse_rules": [rule.state_dict() for rule in self.sparse_rules],
            "past_dense": self._past_dense,
            "past_rows": list(self._past_rows),
        }

    def load_state_dict(self, state: dict) -> None:
        """Copy a :meth:`state_dict` into this step's variables, checking every shape.

        Raises:
            ValueError: the solver, a table, a tensor shape or a step rule differs;
                the message names it.
        """
        if state["solver"] != self.solver:
            raise ValueError(
                f"the checkpoint was written by solver {state['solver']!r}, this step uses "
                f"{self.solver!r}; pass the same solver"
            )
        own = self.formulation.state_dict()
        saved = state["formulation"]
        missing = sorted(set(own) - set(saved))
        extra = sorted(set(saved) - set(own))
        if missing or extra:
            raise ValueError(
                f"the checkpoint's formulation does not match: missing {missing}, "
                f"unexpected {extra}; build the same network and formulation"
            )
        for key, tensor in own.items():
            _check_same_shape(f"formulation {key}", tensor, saved[key])
        tables = {t.name: t.table for t in self.tables}
        if set(tables) != set(state["tables"]):
            raise ValueError(
                f"the checkpoint holds tables {sorted(state['tables'])}, this formulation "
                f"has {sorted(tables)}"
            )
        for name, table in tables.items():
            _check_same_shape(f"table {name}", table, state["tables"][name])

        self.formulation.load_state_dict(saved)
        with torch.no_grad():
            for name, table in tables.items():
                table.copy_(state["tables"][name])
        for i, rule in enumerate(self.dense_rules):
            rule.load_state_dict(state["dense_rules"][i], f"dense rule {i}")
        for t, rule, rule_state in zip(self.tables, self.sparse_rules, state["sparse_rules"]):
            rule.load_state_dict(rule_state, f"table {t.name}")
        if self._past_dense is not None:
            self._past_dense = [
                None if g is None else g.clone() for g in state["past_dense"]
            ]
            _copy_tensors(self._past_rows, state["past_rows"], "stored look-ahead rows")
        self.step_count = int(state["step_count"])

    @torch.no_grad()
    def _statistics(self, terms: Terms, rows: dict[str, torch.Tensor]) -> dict[str, float]:
        stats = {"loss": terms.loss.item(), "lagrangian": terms.lagrangian.item()}
        for cut, g in terms.defects.items():
            stats[f"defect/{cut}"] = g.abs().mean().item()
        for name, r in rows.items():
            if name.startswith("multipliers/"):
                stats[f"multiplier_norm/{name.split('/', 1)[1]}"] = r.norm().item()
        dense = self.formulation.dense_multipliers()
        for l, lam in enumerate(dense):
            stats[f"multiplier_norm/cut{l + 2}"] = lam.norm().item()
        stats.update(terms.extras)
        return stats


def _check_same_shape(what: str, own: torch.Tensor, saved: torch.Tensor) -> None:
    if not isinstance(saved, torch.Tensor):
        raise ValueError(f"{what}: the checkpoint holds {type(saved).__name__}, not a tensor")
    if tuple(own.shape) != tuple(saved.shape):
        raise ValueError(
            f"{what} has shape {tuple(own.shape)} here but {tuple(saved.shape)} in the "
            "checkpoint; build the run with the same network, data set and sizes"
        )


def _copy_tensors(own: list[torch.Tensor], saved: list, what: str) -> None:
    if len(own) != len(saved):
        raise ValueError(f"{what}: {len(own)} tensors here but {len(saved)} in the checkpoint")
    with torch.no_grad():
        for i, (mine, theirs) in enumerate(zip(own, saved)):
            _check_same_shape(f"{what} [{i}]", mine, theirs)
            mine.copy_(theirs)


def _check_range(what: str, values: torch.Tensor, bound: int | None, meaning: str) -> None:
    if values.numel() == 0:
        return
    low, high = values.min().item(), values.max().item()
    if low < 0 and bound is None:
        raise ValueError(f"{what} {low} is negative; {what}s must lie in [0, {meaning})")
    if low < 0 or (bound is not None and high >= bound):
        bad = low if low < 0 else high
        raise ValueError(
            f"{what} {bad} is outside [0, {bound}), where {bound} is {meaning}; check the "
            "data set and that the formulation was built for it"
        )
