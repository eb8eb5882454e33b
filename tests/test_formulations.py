"""Hand-worked cases of the reference formulations on tiny linear chains."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distprop_fast.formulations import DistProp, ExtraProp
from distprop_fast.models import Block, Chain
from tests.compare import assert_close


def linear_chain(w1, w2, b1=None, b2=None) -> Chain:
    """Two linear blocks ``x -> W1 x -> W2 h`` with the given weights and no activation."""
    first = nn.Linear(w1.shape[1], w1.shape[0], bias=b1 is not None)
    second = nn.Linear(w2.shape[1], w2.shape[0], bias=b2 is not None)
    with torch.no_grad():
        first.weight.copy_(w1)
        second.weight.copy_(w2)
        if b1 is not None:
            first.bias.copy_(b1)
        if b2 is not None:
            second.bias.copy_(b2)
    return Chain([Block(first), Block(second)], (w1.shape[1],), "linear")


def test_extraprop_defect_lagrangian_and_gradients():
    # x = (1, 2), W1 = [[1, 0], [1, 1]] so W1 x = (1, 3); the stored state is h = (2, 3).
    w1 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    w2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    form = ExtraProp(linear_chain(w1, w2), num_examples=1)
    x = torch.tensor([[1.0, 2.0]])
    y = torch.tensor([0])
    h = torch.tensor([[2.0, 3.0]], requires_grad=True)
    lam = torch.tensor([[0.5, -1.0]], requires_grad=True)

    terms = form.lagrangian(x, y, torch.tensor([0]), {"states/cut1": h, "multipliers/cut1": lam})

    # g = h - W1 x = (1, 0); logits = W2 h = (2, 3); CE with class 0 = log(e^2 + e^3) - 2.
    assert torch.equal(terms.defects["cut1"].detach(), torch.tensor([[1.0, 0.0]]))
    expected_loss = math.log(math.exp(2) + math.exp(3)) - 2
    assert math.isclose(terms.loss.item(), expected_loss, rel_tol=1e-6)
    # lambda . g = 0.5 * 1 + (-1) * 0 = 0.5
    assert math.isclose(terms.lagrangian.item(), expected_loss + 0.5, rel_tol=1e-6)

    terms.lagrangian.backward()
    p = torch.softmax(torch.tensor([2.0, 3.0]), 0)
    # dL/dh = W2^T (softmax - onehot) + lambda ; dL/dlambda = g ; dL/dW1 = -lambda x^T
    assert_close(h.grad, (p - torch.tensor([1.0, 0.0])).unsqueeze(0) + lam.detach(), what="dL/dh")
    assert_close(lam.grad, torch.tensor([[1.0, 0.0]]), what="dL/dlambda")
    w1_grad = form.network.blocks[0].body.weight.grad
    assert_close(w1_grad, -lam.detach().T @ x, what="dL/dW1")


def test_extraprop_soft_and_hard_shrink():
    w1 = torch.eye(2)
    w2 = torch.eye(2)
    x = torch.tensor([[0.0, 0.0]])
    h = torch.tensor([[0.3, -1.0]])
    rows = {"states/cut1": h, "multipliers/cut1": torch.zeros(1, 2)}
    hard = ExtraProp(linear_chain(w1, w2), 1, margin=0.5, shrink_kind="hard")
    soft = ExtraProp(linear_chain(w1, w2), 1, margin=0.5, shrink_kind="soft")
    g_hard = hard.lagrangian(x, torch.tensor([1]), torch.tensor([0]), rows).defects["cut1"]
    g_soft = soft.lagrangian(x, torch.tensor([1]), torch.tensor([0]), rows).defects["cut1"]
    assert torch.equal(g_hard, torch.tensor([[0.0, -1.0]]))
    assert torch.equal(g_soft, torch.tensor([[0.0, -0.5]]))


def test_extraprop_initialisation_gives_zero_defect():
    torch.manual_seed(0)
    chain = Chain(
        [Block(nn.Linear(3, 4), nn.ReLU()), Block(nn.Linear(4, 5), nn.ReLU()), Block(nn.Linear(5, 2))],
        (3,),
        "mlp",
    )
    from distprop_fast.data import IndexedDataset

    data = IndexedDataset(torch.randn(7, 3), torch.randint(0, 2, (7,)), 2, "toy")
    form = ExtraProp(chain, len(data))
    form.initialise_states(data, batch_size=3)
    index = torch.arange(7)
    rows = {t.name: t.table[index] for t in form.sparse_tables()}
    terms = form.lagrangian(data.x, data.y, index, rows)
    for cut, g in terms.defects.items():
        assert g.abs().max().item() < 1e-6, f"defect at {cut} is {g.abs().max().item()}"
    # The state is stored before the activation: some entries must be negative.
    assert (form.states[0].table < 0).any()


def test_distprop_zscore_defect_and_term_by_hand():
    # One cut of 2 features, 2 classes; mu(1) = (0, 1), sigma = 1 for every class.
    w1 = torch.eye(2)
    w2 = torch.eye(2)
    form = DistProp(linear_chain(w1, w2), num_examples=3, num_classes=2, margin=1.5)
    with torch.no_grad():
        form.w_mu[0].copy_(torch.tensor([[5.0, 5.0], [0.0, 1.0]]))
        form.w_sigma[0].fill_(math.log(math.e - 1))
    x = torch.tensor([[1.0, 3.0]])  # a = W1 x = (1, 3)
    y = torch.tensor([1])
    lam = torch.tensor([[2.0, 0.25]], requires_grad=True)
    terms = form.lagrangian(x, y, torch.tensor([2]), {"multipliers/cut1": lam})

    # z = (a - mu(1)) / 1 = (1, 2); hardshrink with margin 1.5 keeps only 2.
    assert_close(terms.defects["cut1"], torch.tensor([[0.0, 2.0]]), what="defect")
    # The loss is on the synthetic samples S[n, c] = mu(c) + E sigma(c) through W2 = I.
    samples = form.w_mu[0].detach() + form.noise1[0]
    expected_loss = F.cross_entropy(samples, torch.tensor([0, 1])).item()
    assert math.isclose(terms.loss.item(), expected_loss, rel_tol=1e-6)
    assert math.isclose(terms.lagrangian.item(), expected_loss + 0.25 * 2.0, rel_tol=1e-6)

    terms.lagrangian.backward()
    assert_close(lam.grad, torch.tensor([[0.0, 2.0]]), what="dL/dlambda")
    # d(lambda . g)/dW1 = (lambda * m / sigma)^T x with m = (0, 1)
    expected = torch.tensor([[0.0], [0.25]]) @ x
    # The loss does not depend on W1 (it reads synthetic samples only).
    assert_close(form.network.blocks[0].body.weight.grad, expected, what="dL/dW1")


def test_distprop_later_cut_uses_dense_multipliers():
    torch.manual_seed(0)
    chain = Chain([Block(nn.Linear(3, 4)), Block(nn.Linear(4, 5)), Block(nn.Linear(5, 2))], (3,), "mlp")
    form = DistProp(chain, num_examples=10, num_classes=2, margin=0.0, samples_per_class=3)
    assert form.later_multipliers[0].shape == (6, 5)
    assert form.first_multipliers.table.shape == (10, 4)
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 1, 0])
    terms = form.lagrangian(x, y, torch.arange(4), {"multipliers/cut1": torch.zeros(4, 4)})
    # Margin 0: the second cut's defect is the z-score of block 2 on cut-1 samples.
    s1 = form.w_mu[0] + form.noise1 * F.softplus(form.w_sigma[0])
    a2 = chain.blocks[1](s1.reshape(6, 4))
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    z2 = (a2 - form.w_mu[1][labels]) / F.softplus(form.w_sigma[1])[labels]
    assert_close(terms.defects["cut2"], z2, what="cut-2 defect")


def test_distprop_gaussian_initialisation():
    chain = linear_chain(torch.eye(3), torch.eye(3))
    form = DistProp(chain, num_examples=2, num_classes=3)
    norms = form.w_mu[0].norm(dim=1)
    assert_close(norms, torch.ones(3), what="row norms of W_mu")
    assert_close(F.softplus(form.w_sigma[0]), torch.ones(3, 3), what="sigma")


def test_distprop_rejects_activation_at_cut():
    chain = Chain([Block(nn.Linear(2, 2), nn.ReLU()), Block(nn.Linear(2, 2))], (2,), "relu-cut")
    try:
        DistProp(chain, num_examples=2, num_classes=2)
    except ValueError as err:
        assert "cut_activation=False" in str(err)
    else:
        raise AssertionError("DistProp accepted a ReLU at the cut")


def test_distprop_per_example_constraint_by_hand():
    # One cut of 2 features, 2 classes, sigma = 1. Per-example margin = 0.5 * d = 1.0.
    form = DistProp(
        linear_chain(torch.eye(2), torch.eye(2)), num_examples=3, num_classes=2, margin=0.5,
        constraint="per-example",
    )
    assert form.first_multipliers.table.shape == (3, 1)
    assert form.first_margin == 1.0
    with torch.no_grad():
        form.w_mu[0].copy_(torch.tensor([[5.0, 5.0], [0.0, 1.0]]))
        form.w_sigma[0].fill_(math.log(math.e - 1))
    x = torch.tensor([[1.0, 3.0], [0.5, 1.25]])  # a = x
    y = torch.tensor([1, 1])
    lam = torch.tensor([[2.0], [8.0]], requires_grad=True)
    terms = form.lagrangian(x, y, torch.tensor([2, 0]), {"multipliers/cut1": lam})

    # z = a - mu(1): (1, 2) with ||z||_1 = 3, and (0.5, 0.25) with 0.75 <= 1.
    assert_close(terms.defects["cut1"], torch.tensor([[2.0], [0.0]]), what="defect")
    assert math.isclose(terms.lagrangian.item() - terms.loss.item(), 4.0, rel_tol=1e-6)

    terms.lagrangian.backward()
    assert_close(lam.grad, torch.tensor([[2.0], [0.0]]), what="dL/dlambda")
    # d(lambda_0 g_0)/dW1 = lambda_0 sign(z_0) x_0^T; the second row is inactive.
    expected = 2.0 * torch.tensor([[1.0], [1.0]]) @ x[:1]
    assert_close(form.network.blocks[0].body.weight.grad, expected, what="dL/dW1")


def test_distprop_per_example_keeps_later_cuts_per_feature():
    blocks = [Block(nn.Linear(3, 4)), Block(nn.Linear(4, 5)), Block(nn.Linear(5, 2))]
    chain = Chain(blocks, (3,), "mlp")
    form = DistProp(chain, num_examples=10, num_classes=2, samples_per_class=3,
                    constraint="per-example")
    assert form.first_multipliers.table.shape == (10, 1)
    assert form.later_multipliers[0].shape == (6, 5)
    terms = form.lagrangian(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), torch.arange(4),
                            {"multipliers/cut1": torch.zeros(4, 1)})
    assert terms.defects["cut1"].shape == (4, 1)
    assert terms.defects["cut2"].shape == (6, 5)


def test_distprop_rejects_unknown_constraint():
    chain = linear_chain(torch.eye(2), torch.eye(2))
    try:
        DistProp(chain, num_examples=2, num_classes=2, constraint="per-class")
    except ValueError as err:
        assert "'per-class'" in str(err)
    else:
        raise AssertionError("DistProp accepted constraint='per-class'")
