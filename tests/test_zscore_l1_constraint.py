"""Tests of the per-example L1 z-score constraint: values by hand, gradients by gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from distprop_fast.ops import BackendUnavailableError, reference, zscore_l1_constraint
from tests.compare import assert_close

# softplus^{-1}(s) = log(e^s - 1): pre-softplus scales that give sigma = 1 and sigma = 2.
SIGMA_ONE = math.log(math.e - 1.0)
SIGMA_TWO = math.log(math.e**2 - 1.0)


def hand_inputs():
    """Two rows, three features, two classes, in float64.

    Row 0 (class 0, sigma 1): z = (0.5, -2, 0), ||z||_1 = 2.5.
    Row 1 (class 1, sigma 2): z = (-0.5, 1.5, -1), ||z||_1 = 3.0.
    """
    a = torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    w_mu = torch.tensor([[0.5, 0.0, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float64)
    w_sigma = torch.tensor([[SIGMA_ONE] * 3, [SIGMA_TWO] * 3], dtype=torch.float64)
    multipliers = torch.tensor([[2.0], [4.0]], dtype=torch.float64)
    return a, labels, w_mu, w_sigma, multipliers


@pytest.mark.parametrize(
    "margin, defect, term",
    [
        # 2.5 - 2.75 < 0 is satisfied; 3.0 - 2.75 = 0.25; term = 4 * 0.25.
        (2.75, [[0.0], [0.25]], 1.0),
        # No margin: g = ||z||_1; term = 2 * 2.5 + 4 * 3.0.
        (0.0, [[2.5], [3.0]], 17.0),
        # Both rows within the margin.
        (3.0, [[0.0], [0.0]], 0.0),
    ],
)
def test_l1_constraint_by_hand(margin, defect, term):
    a, labels, w_mu, w_sigma, multipliers = hand_inputs()
    got_defect, got_term = zscore_l1_constraint(a, labels, w_mu, w_sigma, margin, multipliers)
    assert_close(got_defect, torch.tensor(defect, dtype=torch.float64), what="defect")
    assert_close(got_term, torch.tensor(term, dtype=torch.float64), what="term")


def test_l1_constraint_without_multipliers():
    a, labels, w_mu, w_sigma, _ = hand_inputs()
    defect, term = zscore_l1_constraint(a, labels, w_mu, w_sigma, 2.75)
    assert tuple(defect.shape) == (2, 1)
    assert term.item() == 0.0


def test_l1_constraint_gradient_by_hand():
    # dt/da_i = lambda_i * 1[g_i > 0] * sign(z_i) / sigma[y_i]; only row 1 is active.
    a, labels, w_mu, w_sigma, multipliers = hand_inputs()
    a.requires_grad_(True)
    multipliers.requires_grad_(True)
    _, term = zscore_l1_constraint(a, labels, w_mu, w_sigma, 2.75, multipliers)
    grad_a, grad_multipliers = torch.autograd.grad(term, (a, multipliers))

    expected_a = torch.tensor(
        [[0.0, 0.0, 0.0], [4.0 * -1 / 2, 4.0 * 1 / 2, 4.0 * -1 / 2]], dtype=torch.float64
    )
    assert_close(grad_a, expected_a, what="dt/da")
    expected_multipliers = torch.tensor([[0.0], [0.25]], dtype=torch.float64)
    assert_close(grad_multipliers, expected_multipliers, what="dt/dlambda")


def random_inputs(seed: int, batch: int = 6, d: int = 5, n_classes: int = 3):
    """Float64 inputs whose z-scores and L1 norms stay away from the kinks of |.| and ReLU."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, d, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, n_classes, (batch,), generator=generator)
    w_mu = torch.randn(n_classes, d, generator=generator, dtype=torch.float64)
    w_sigma = torch.randn(n_classes, d, generator=generator, dtype=torch.float64)
    multipliers = torch.rand(batch, 1, generator=generator, dtype=torch.float64) + 0.5

    z = (a - w_mu[labels]) / torch.nn.functional.softplus(w_sigma)[labels]
    norms = z.abs().sum(dim=1).sort().values
    # A margin halfway between the two middle norms: half the rows are active.
    margin = float(norms[batch // 2 - 1] + norms[batch // 2]) / 2
    return a, labels, w_mu, w_sigma, multipliers, margin, z, norms


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_l1_constraint_gradcheck_float64(seed):
    a, labels, w_mu, w_sigma, multipliers, margin, z, norms = random_inputs(seed)
    # gradcheck's finite differences (eps 1e-6) must not cross a kink.
    assert z.abs().min() > 1e-3, "the inputs put a z-score at the kink of |z|"
    assert (norms - margin).abs().min() > 1e-3, "the inputs put a row at the kink of ReLU"

    def term_and_defect(a, w_mu, w_sigma, multipliers):
        defect, term = zscore_l1_constraint(a, labels, w_mu, w_sigma, margin, multipliers)
        return defect, term

    inputs = tuple(t.clone().requires_grad_(True) for t in (a, w_mu, w_sigma, multipliers))
    assert torch.autograd.gradcheck(term_and_defect, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_l1_constraint_half_multipliers_compute_in_float32():
    # float16 storage of the multipliers must not turn the term into float16 arithmetic.
    a, labels, w_mu, w_sigma, multipliers, margin, _, _ = random_inputs(3)
    a, w_mu, w_sigma = a.float(), w_mu.float(), w_sigma.float()
    half = multipliers.half()
    defect, term = zscore_l1_constraint(a, labels, w_mu, w_sigma, margin, half)
    assert term.dtype == torch.float32
    _, expected = reference.zscore_l1_constraint(a, labels, w_mu, w_sigma, margin, half.float())
    assert_close(term, expected, what="term with float16 multipliers")


def test_l1_constraint_rejects_fused_backend():
    a, labels, w_mu, w_sigma, multipliers = hand_inputs()
    with pytest.raises(BackendUnavailableError, match="no fused kernel for backend='cpu'"):
        zscore_l1_constraint(a, labels, w_mu, w_sigma, 1.0, multipliers, backend="cpu")


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"multipliers": torch.zeros(2, 3, dtype=torch.float64)}, ValueError, r"\(B, 1\)"),
        ({"margin": -1.0}, ValueError, "margin must be a number >= 0"),
        ({"labels": torch.tensor([0, 2])}, ValueError, r"outside \[0, M\)"),
        ({"labels": torch.tensor([0.0, 1.0])}, TypeError, "integer tensor"),
    ],
)
def test_l1_constraint_rejects_invalid_input(change, error, message):
    a, labels, w_mu, w_sigma, multipliers = hand_inputs()
    args = {"a": a, "labels": labels, "w_mu": w_mu, "w_sigma": w_sigma, "margin": 1.0,
            "multipliers": multipliers}
    args.update(change)
    with pytest.raises(error, match=message):
        zscore_l1_constraint(**args)
