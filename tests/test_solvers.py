"""Solvers and step rules: bilinear saddle, accumulator semantics, sparse rows."""

from __future__ import annotations

import torch
from torch import nn

from distprop_fast.data import IndexedDataset
from distprop_fast.formulations import ExtraProp, Formulation, Terms
from distprop_fast.models import Block, Chain
from distprop_fast.ops import reference
from distprop_fast.solvers import DenseStepRule, SaddlePointStep, StepRuleConfig
from tests.compare import assert_close


class Scalar(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor([value]))

    def forward(self, x):
        return x * self.value


class Bilinear(Formulation):
    """``min_u max_v u * v``: the saddle point is (0, 0)."""

    def __init__(self, u0: float, v0: float):
        super().__init__()
        self.network = Chain([Block(Scalar(u0))], (1,), "scalar")
        self.v = nn.Parameter(torch.tensor([v0]))

    def dense_multipliers(self):
        return [self.v]

    def lagrangian(self, x, y, index, rows):
        u = self.network.blocks[0].body.value
        product = (u * self.v).sum()
        return Terms(loss=product.detach(), lagrangian=product)


def run_bilinear(solver: str, steps: int = 400) -> float:
    form = Bilinear(1.0, 1.0)
    rule = StepRuleConfig(0.1, "sgd")
    step = SaddlePointStep(form, solver, weights=rule, multipliers=rule, num_examples=1, num_classes=1)
    batch = (torch.zeros(1, 1), torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    for _ in range(steps):
        step(*batch)
    u = form.network.blocks[0].body.value.item()
    return (u * u + form.v.item() ** 2) ** 0.5


def test_extragradient_converges_on_bilinear_saddle():
    # Extragradient contracts the distance to (0, 0) by about (1 - lr^2 / 2) per
    # step: sqrt(2) * 0.995^400 = 0.19.
    assert run_bilinear("extragradient") < 0.3


def test_gda_diverges_on_bilinear_saddle():
    # GDA multiplies the distance by sqrt(1 + lr^2) per step: sqrt(2) * 1.005^400 = 10.4.
    assert run_bilinear("gda") > 5.0


def test_extra_adagrad_accumulates_both_half_steps():
    p = torch.tensor([1.0, -2.0])
    rule = DenseStepRule([p], StepRuleConfig(0.5, "adagrad", eps=0.0), maximize=False)
    g0 = torch.tensor([2.0, 1.0])
    g1 = torch.tensor([1.0, 3.0])
    rule.extrapolate([g0])
    assert_close(p, torch.tensor([1.0 - 0.5, -2.0 - 0.5]), what="look-ahead point")
    rule.update([g1])
    acc = g0 * g0 + g1 * g1
    assert_close(rule.accums[0], acc, what="accumulator after both half-steps")
    expected = torch.tensor([1.0, -2.0]) - 0.5 * g1 / acc.sqrt()
    assert_close(p, expected, what="updated point restarts from the saved point")


def test_sparse_extra_adagrad_duplicates_equal_dense_step():
    torch.manual_seed(0)
    table = torch.randn(6, 3)
    accum = torch.rand(6, 3)
    index = torch.tensor([4, 1, 4, 0, 4])
    grad = torch.randn(5, 3)

    dense_table, dense_accum = table.clone(), accum.clone()
    dense_grad = torch.zeros(6, 3).index_add_(0, index, grad)
    dense_accum += dense_grad**2
    dense_table -= 0.1 * dense_grad / (dense_accum.sqrt() + 1e-10)

    reference.sparse_extra_adagrad_(table, accum, index, grad, 0.1, 1e-10, "extrapolate")
    assert_close(table, dense_table, what="table")
    assert_close(accum, dense_accum, what="accumulator")


def test_sparse_update_restarts_from_saved_rows():
    table = torch.zeros(4, 2)
    accum = torch.zeros(4, 2)
    index = torch.tensor([2, 2])
    g0 = torch.ones(2, 2)
    saved = reference.sparse_extra_adagrad_(table, accum, index, g0, 1.0, 0.0, "extrapolate", maximize=True)
    assert torch.equal(saved, torch.zeros(2, 2))
    # Summed gradient 2, accumulator 4: the ascent step is 2 / 2 = 1.
    assert torch.equal(table[2], torch.ones(2))
    g1 = torch.full((2, 2), 3.0)
    reference.sparse_extra_adagrad_(table, accum, index, g1, 1.0, 0.0, "update", saved, maximize=True)
    # Restored to 0, summed gradient 6, accumulator 4 + 36 = 40.
    assert_close(table[2], torch.full((2,), 6.0 / 40**0.5), what="updated row")
    assert_close(accum[2], torch.full((2,), 40.0), what="accumulator")


def make_extraprop(num_examples=20, seed=0):
    torch.manual_seed(seed)
    chain = Chain([Block(nn.Linear(5, 4), nn.ReLU()), Block(nn.Linear(4, 3))], (5,), "mlp")
    data = IndexedDataset(torch.randn(num_examples, 5), torch.randint(0, 3, (num_examples,)), 3, "toy")
    form = ExtraProp(chain, num_examples)
    form.initialise_states(data)
    with torch.no_grad():
        for t in form.sparse_tables():
            t.table.add_(torch.randn_like(t.table) * 0.1)
    return form, data


def test_untouched_rows_stay_bitwise_unchanged():
    form, data = make_extraprop()
    step = SaddlePointStep(
        form,
        "extragradient",
        weights=StepRuleConfig(0.01),
        states=StepRuleConfig(0.1, "adagrad"),
        multipliers=StepRuleConfig(0.1, "adagrad"),
        num_examples=len(data),
        num_classes=3,
    )
    before = [t.table.clone() for t in form.sparse_tables()]
    accums_before = [r.accum.clone() for r in step.sparse_rules]
    index = torch.tensor([3, 7, 7, 11])
    step(data.x[index], data.y[index], index)

    untouched = torch.ones(len(data), dtype=torch.bool)
    untouched[index] = False
    for t, old in zip(form.sparse_tables(), before):
        assert torch.equal(t.table[untouched], old[untouched]), f"{t.name} changed outside the batch"
        assert not torch.equal(t.table[index], old[index]), f"{t.name} batch rows did not move"
    for rule, old in zip(step.sparse_rules, accums_before):
        assert torch.equal(rule.accum[untouched], old[untouched]), "accumulator changed outside the batch"


def test_duplicate_batch_rows_equal_deduplicated_gradient():
    # A batch that lists example 5 twice steps with the gradients of both copies summed.
    form_a, data = make_extraprop(seed=1)
    form_b, _ = make_extraprop(seed=1)
    sgd = StepRuleConfig(0.05, "sgd")
    step_a = SaddlePointStep(form_a, "gda", weights=StepRuleConfig(0.0, "sgd"), states=sgd,
                             multipliers=sgd, num_examples=20, num_classes=3)
    step_b = SaddlePointStep(form_b, "gda", weights=StepRuleConfig(0.0, "sgd"), states=sgd,
                             multipliers=sgd, num_examples=20, num_classes=3)
    dup = torch.tensor([5, 5])
    step_a(data.x[dup], data.y[dup], dup)

    # Same gradient by hand: evaluate the single row and double its gradient.
    one = torch.tensor([5])
    rows = {t.name: t.table[one].clone().requires_grad_() for t in form_b.sparse_tables()}
    terms = form_b.lagrangian(data.x[one], data.y[one], one, rows)
    # The loss is a batch mean: two identical rows give each copy half the loss
    # gradient, and the multiplier term (a sum) counts each copy once.
    loss_grads = torch.autograd.grad(
        terms.loss, list(rows.values()), allow_unused=True, retain_graph=True
    )
    term_grads = torch.autograd.grad(terms.lagrangian - terms.loss, list(rows.values()), allow_unused=True)
    tables_a = {t.name: t.table for t in form_a.sparse_tables()}
    for t, loss_grad, term_grad in zip(form_b.sparse_tables(), loss_grads, term_grads):
        total = torch.zeros(1, t.table.shape[1])
        if loss_grad is not None:
            total += loss_grad
        if term_grad is not None:
            total += 2 * term_grad
        sign = 1.0 if t.role == "multiplier" else -1.0
        expected = t.table[5] + sign * 0.05 * total[0]
        assert_close(tables_a[t.name][5], expected, what=t.name)


def test_distprop_every_layer_touches_only_batch_rows():
    from distprop_fast.formulations import DistProp
    from distprop_fast.models import build_network

    torch.manual_seed(0)
    network = build_network("mnist-every-layer", (1, 28, 28), 10, cut_activation=False)
    assert network.cut_sizes == [21632, 9216, 128]
    form = DistProp(network, num_examples=40, num_classes=10, samples_per_class=1, margin=0.1)
    step = SaddlePointStep(
        form, "extragradient", multipliers=StepRuleConfig(1e-3, "adagrad"),
        num_examples=40, num_classes=10,
    )
    table = form.first_multipliers.table
    assert table.shape == (40, 21632)
    index = torch.tensor([9, 30, 9])
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 1])
    step(x, y, index)
    step(x, y, index)

    touched = torch.zeros(40, dtype=torch.bool)
    touched[index] = True
    assert torch.count_nonzero(table[~touched]) == 0
    assert torch.count_nonzero(step.sparse_rules[0].accum[~touched]) == 0
    assert torch.count_nonzero(table[touched]) > 0


def test_sparse_sgd_float16_table_steps_in_float32():
    # Row 0 contains 1.0, whose float16 ulp is 2**-10. The increment 2**-11 + 2**-23 is
    # just over half an ulp, so a float32 step rounds once, up, to 1 + 2**-10. A
    # float16 product first rounds the increment to 2**-11, a tie that the add
    # then rounds to even, 1.0.
    table = torch.zeros(3, 1, dtype=torch.float16)
    table[0] = 1.0
    lr = 2**-11 + 2**-23
    reference.sparse_sgd_(
        table, torch.tensor([0]), torch.ones(1, 1), lr, phase="extrapolate", maximize=True
    )

    assert table[0].item() == 1.0 + 2**-10
    assert table[1:].eq(0).all()


def test_sparse_sgd_float16_duplicates_sum_before_rounding():
    # Two increments of 3e-4 are each under half an ulp of 1.0 but sum to more.
    table = torch.ones(2, 1, dtype=torch.float16)
    grad = torch.full((2, 1), 3e-4)
    reference.sparse_sgd_(table, torch.tensor([0, 0]), grad, 1.0, "extrapolate", maximize=True)

    assert table[0].item() == 1.0 + 2**-10
    assert table[1].item() == 1.0


def test_sparse_adagrad_float16_table_keeps_float32_accumulator():
    # A defect of 300 squares to 90,000, past float16's maximum of 65,504. A float16
    # accumulator would hold inf, and the row would not move.
    from distprop_fast.formulations.base import SparseTable
    from distprop_fast.solvers import SparseRowStepRule

    table = SparseTable("multipliers/cut1", torch.zeros(4, 1, dtype=torch.float16), "multiplier")
    rule = SparseRowStepRule(table, StepRuleConfig(0.01, "adagrad"), maximize=True, backend="auto")
    assert rule.accum.dtype == torch.float32

    rule.step(torch.tensor([2]), torch.tensor([[300.0]]))
    assert rule.accum[2].item() == 90000.0
    # Adagrad's first step moves by lr * g / |g| = lr.
    assert table.table[2].item() == torch.tensor(0.01).half().item()
    assert table.table[[0, 1, 3]].eq(0).all()
