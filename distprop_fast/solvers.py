"""Saddle-point solvers (GDA, extragradient) with Adagrad or SGD step rules.

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

SOLVERS = ("gda", "extragradient")
STEP_RULES = ("adagrad", "sgd")


class NonFiniteError(FloatingPointError):
    """A loss, Lagrangian or defect became NaN or infinite."""


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


class SparseRowStepRule:
    """(Extra)Adagrad or (extra)SGD on batch rows of a ``(|D|, d)`` table.

    Only the rows named by the batch index change, in the table and in its
    accumulator; gradients of duplicate indices are summed before the step.
    """

    def __init__(self, table: SparseTable, config: StepRuleConfig, maximize: bool, backend: str):
        self.table = table
        self.config = config
        self.maximize = maximize
        self.backend = backend
        self.accum = None
        if config.rule == "adagrad":
            self.accum = zeros_table(*table.table.shape, dtype=table.table.dtype)
        self._saved: torch.Tensor | None = None

    def _half_step(self, index, grad, phase, saved):
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


class SaddlePointStep:
    """One GDA or extragradient step of a formulation on a batch.

    Args:
        formulation: the problem (:class:`~distprop_fast.formulations.Formulation`).
        solver: ``"gda"`` or ``"extragradient"``.
        weights: step rule for the network weights.
        states: step rule for dense primal variables and state tables.
        multipliers: step rule for all multipliers.
        num_examples: ``|D|``; batch indices must lie in ``[0, |D|)``.
        num_classes: ``M``; labels must lie in ``[0, M)``.
        backend: implementation of the fused ops.

    Calling the object with ``(x, y, index)`` performs one step and returns the
    statistics of the current point: ``loss``, ``lagrangian``, and per cut the
    mean absolute defect and the multiplier norm over the batch rows.
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
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.formulation = formulation
        self.solver = solver
        self.num_examples = num_examples
        self.num_classes = num_classes
        self.step_count = 0
        weights = weights or StepRuleConfig(1e-3)
        states = states or StepRuleConfig(1e-2)
        multipliers = multipliers or StepRuleConfig(1e-6, "sgd")
        self.configs = {"weights": weights, "states": states, "multipliers": multipliers}

        self.dense_params = (
            formulation.weight_parameters()
            + formulation.state_parameters()
            + formulation.dense_multipliers()
        )
        self.dense_rules = [
            DenseStepRule(formulation.weight_parameters(), weights, maximize=False),
            DenseStepRule(formulation.state_parameters(), states, maximize=False),
            DenseStepRule(formulation.dense_multipliers(), multipliers, maximize=True),
        ]
        self.tables = formulation.sparse_tables()
        self.sparse_rules = [
            SparseRowStepRule(
                t, states if t.role == "state" else multipliers, t.role == "multiplier", backend
            )
            for t in self.tables
        ]
        self._param_device = next(formulation.parameters()).device
        self._check_sizes(num_examples, num_classes)

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

    def check_batch(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        """Raise a ValueError naming the value and the fix for an invalid batch."""
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
        if x.shape[0] == 0:
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
            rows[t.name] = t.table[index].float().requires_grad_(True)
        terms = self.formulation.lagrangian(x, y, index, rows)
        self._check_finite(terms)
        leaves = list(rows.values())
        grads = torch.autograd.grad(
            terms.lagrangian, self.dense_params + leaves, allow_unused=True
        )
        dense_grads = list(grads[: len(self.dense_params)])
        row_grads = [g if g is not None else torch.zeros_like(r) for g, r in zip(grads[len(self.dense_params) :], leaves)]
        return terms, rows, dense_grads, row_grads

    def _check_finite(self, terms: Terms) -> None:
        checks = [("loss", terms.loss), ("Lagrangian", terms.lagrangian)]
        checks += [(f"defect at {cut}", g) for cut, g in terms.defects.items()]
        for what, value in checks:
            if not torch.isfinite(value).all():
                raise NonFiniteError(
                    f"{what} is not finite at step {self.step_count + 1}; the run diverged. "
                    "Try smaller step sizes (--lr-weights, --lr-states, --lr-multipliers) "
                    "or, with constraints, a larger margin"
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
        begin = getattr(self.formulation, "begin_step", None)
        if begin is not None:
            begin()

        terms, rows, dense_grads, row_grads = self._evaluate(x, y, index)
        stats = self._statistics(terms, rows)

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
