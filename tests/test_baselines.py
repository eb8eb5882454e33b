"""Layer-local baselines (DFA, DTP, OAM): one step against hand-computed updates,
bitwise continuation from a state dict, input checks and learning on a toy problem.

Expected updates are computed here in float64 from explicit formulas. The
methods run in float32, so comparisons use the float32 tolerances of
``tests/compare.py`` (rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distprop_fast.baselines import BASELINES, DEFAULT_LR, DFA, DTP, OAM, build_baseline_network
from distprop_fast.solvers import NonFiniteError
from tests.compare import assert_close


def fixed(shape, seed, scale=0.5):
    """Return float64 values in [-scale, scale] drawn from a generator private to the test."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale


def set_layer(layer, weight, bias):
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)


def check_layer(layer, weight, bias, label):
    assert_close(layer.weight, weight, torch.float32, f"{label} weight")
    assert_close(layer.bias, bias, torch.float32, f"{label} bias")


def toy_batch(batch=5, features=3, classes=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=generator)
    y = torch.arange(batch) % classes
    return x, y, torch.arange(batch)


# -- DFA --------------------------------------------------------------------


def test_dfa_mlp_step_matches_formula():
    lr = 0.1
    dfa = DFA("mlp", (3,), 2, lr=lr, seed=0, hidden=(4,), step_rule="sgd", momentum=0.0)
    w1, b1, w2, b2 = fixed((4, 3), 1), fixed((4,), 2), fixed((2, 4), 3), fixed((2,), 4)
    feedback = fixed((4, 2), 5, scale=1.0)
    set_layer(dfa.layers[0], w1, b1)
    set_layer(dfa.layers[1], w2, b2)
    dfa.feedback[0] = feedback.float()
    x, y, index = toy_batch()

    stats = dfa(x, y, index)

    X, Y = x.double(), F.one_hot(y, 2).double()
    h1 = torch.tanh(X @ w1.T + b1)
    logits = h1 @ w2.T + b2
    e = (logits.softmax(1) - Y) / 5
    delta1 = (e @ feedback.T) * (1 - h1**2)
    check_layer(dfa.layers[0], w1 - lr * delta1.T @ X, b1 - lr * delta1.sum(0), "hidden")
    check_layer(dfa.layers[1], w2 - lr * e.T @ h1, b2 - lr * e.sum(0), "output")
    assert stats["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)

    # Backprop would send e through w2; the update must come from the feedback matrix instead.
    backprop_delta = (e @ w2) * (1 - h1**2)
    assert (backprop_delta - delta1).abs().max() > 1e-3


def test_dfa_conv_step_matches_formula():
    lr = 0.2
    dfa = DFA("conv", (1, 6, 6), 3, lr=lr, seed=0, channels=(2, 2), step_rule="sgd", momentum=0.0)
    w1, b1 = fixed((2, 1, 5, 5), 1), fixed((2,), 2)
    w2, b2 = fixed((2, 2, 5, 5), 3), fixed((2,), 4)
    w3, b3 = fixed((3, 2), 5), fixed((3,), 6)
    # a_1 is (2, 6, 6) = 72 entries, a_2 is (2, 3, 3) = 18 entries.
    feedback1, feedback2 = fixed((72, 3), 7, 1.0), fixed((18, 3), 8, 1.0)
    for layer, (w, b) in zip(dfa.layers, [(w1, b1), (w2, b2), (w3, b3)]):
        set_layer(layer, w, b)
    dfa.feedback = [feedback1.float(), feedback2.float()]
    x = fixed((4, 1, 6, 6), 9, 1.0).float()
    y = torch.tensor([0, 1, 2, 1])

    dfa(x, y, torch.arange(4))

    X, Y = x.double(), F.one_hot(y, 3).double()
    a1 = F.conv2d(X, w1, b1, padding=2)
    h1 = torch.tanh(a1)
    pooled1 = F.max_pool2d(h1, 2)
    a2 = F.conv2d(pooled1, w2, b2, padding=2)
    h2 = torch.tanh(a2)
    flat = F.max_pool2d(h2, 2).flatten(1)
    e = ((flat @ w3.T + b3).softmax(1) - Y) / 4
    delta1 = (e @ feedback1.T).view_as(a1) * (1 - h1**2)
    delta2 = (e @ feedback2.T).view_as(a2) * (1 - h2**2)
    grad_w1 = torch.nn.grad.conv2d_weight(X, w1.shape, delta1, padding=2)
    grad_w2 = torch.nn.grad.conv2d_weight(pooled1, w2.shape, delta2, padding=2)
    check_layer(dfa.layers[0], w1 - lr * grad_w1, b1 - lr * delta1.sum((0, 2, 3)), "conv1")
    check_layer(dfa.layers[1], w2 - lr * grad_w2, b2 - lr * delta2.sum((0, 2, 3)), "conv2")
    check_layer(dfa.layers[2], w3 - lr * e.T @ flat, b3 - lr * e.sum(0), "output")


def test_dfa_zero_feedback_freezes_hidden_layers():
    dfa = DFA("mlp", (3,), 2, lr=0.1, seed=0, hidden=(4, 4), feedback_scale=0.0)
    before = [layer.weight.clone() for layer in dfa.layers]
    dfa(*toy_batch())
    assert torch.equal(dfa.layers[0].weight, before[0])
    assert torch.equal(dfa.layers[1].weight, before[1])
    assert not torch.equal(dfa.layers[2].weight, before[2])


# -- DTP --------------------------------------------------------------------


def test_dtp_step_matches_formula():
    lr, lr_inverse, eta = 0.1, 0.05, 0.5
    dtp = DTP(
        "mlp",
        (3,),
        2,
        lr=lr,
        seed=0,
        hidden=(3, 2),
        lr_inverse=lr_inverse,
        target_step=eta,
        noise_std=0.0,
        step_rule="sgd",
    )
    w1, b1, w2, b2 = fixed((3, 3), 1), fixed((3,), 2), fixed((2, 3), 3), fixed((2,), 4)
    w3, b3 = fixed((2, 2), 5, 1.0), fixed((2,), 6)
    v, c = fixed((3, 2), 7), fixed((3,), 8)
    for layer, (w, b) in zip(dtp.layers, [(w1, b1), (w2, b2), (w3, b3)]):
        set_layer(layer, w, b)
    set_layer(dtp.inverses[0][0], v, c)
    x, y, index = toy_batch()

    dtp(x, y, index)

    X, Y, B = x.double(), F.one_hot(y, 2).double(), 5
    h1 = torch.tanh(X @ w1.T + b1)
    h2 = torch.tanh(h1 @ w2.T + b2)
    p = (h2 @ w3.T + b3).softmax(1)

    def inverse(h):
        return torch.tanh(h @ v.T + c)

    # Top target: one step of size eta on the summed cross-entropy at h2.
    target2 = h2 - eta * (p - Y) @ w3
    target1 = h1 + inverse(target2) - inverse(h2)

    # Without noise, g_2 reconstructs h1 from f_2(h1) = h2.
    reconstruction = inverse(h2)
    d_inverse = 2 * (reconstruction - h1) / B * (1 - reconstruction**2)
    d1 = 2 * (h1 - target1) / B * (1 - h1**2)
    d2 = 2 * (h2 - target2) / B * (1 - h2**2)
    e = (p - Y) / B
    check_layer(dtp.layers[0], w1 - lr * d1.T @ X, b1 - lr * d1.sum(0), "hidden 1")
    check_layer(dtp.layers[1], w2 - lr * d2.T @ h1, b2 - lr * d2.sum(0), "hidden 2")
    check_layer(dtp.layers[2], w3 - lr * e.T @ h2, b3 - lr * e.sum(0), "output")
    check_layer(
        dtp.inverses[0][0],
        v - lr_inverse * d_inverse.T @ h2,
        c - lr_inverse * d_inverse.sum(0),
        "inverse 2",
    )


def test_dtp_noise_changes_only_inverses():
    def one_step(noise_std):
        dtp = DTP("mlp", (3,), 2, lr=0.1, seed=0, hidden=(4, 4), noise_std=noise_std)
        dtp(*toy_batch())
        return dtp

    quiet, noisy = one_step(0.0), one_step(0.5)
    for layer_quiet, layer_noisy in zip(quiet.layers, noisy.layers):
        assert torch.equal(layer_quiet.weight, layer_noisy.weight)
    assert not torch.equal(quiet.inverses[0][0].weight, noisy.inverses[0][0].weight)


def test_dtp_rejects_conv_and_single_hidden_layer():
    with pytest.raises(ValueError, match="DTP supports only the 'mlp' network"):
        DTP("conv", (1, 8, 8), 2, lr=0.1, seed=0)
    with pytest.raises(ValueError, match="at least two hidden layers"):
        DTP("mlp", (3,), 2, lr=0.1, seed=0, hidden=(4,))


# -- OAM --------------------------------------------------------------------


def test_oam_step_matches_formula():
    lr, lr_codes, mu, code_steps = 0.1, 0.05, 0.5, 2
    oam = OAM(
        "mlp",
        (3,),
        2,
        lr=lr,
        seed=0,
        hidden=(3, 2),
        lr_codes=lr_codes,
        code_steps=code_steps,
        mu=mu,
        mu_growth=2.0,
        mu_max=0.8,
        step_rule="sgd",
        activation="tanh",
    )
    w1, b1, w2, b2 = fixed((3, 3), 1), fixed((3,), 2), fixed((2, 3), 3), fixed((2,), 4)
    w3, b3 = fixed((2, 2), 5, 1.0), fixed((2,), 6)
    for layer, (w, b) in zip(oam.layers, [(w1, b1), (w2, b2), (w3, b3)]):
        set_layer(layer, w, b)
    x, y, index = toy_batch()

    stats = oam(x, y, index)

    X, Y, B = x.double(), F.one_hot(y, 2).double(), 5
    c1 = X @ w1.T + b1
    c2 = torch.tanh(c1) @ w2.T + b2

    def top_objective(code):
        logits = torch.tanh(code) @ w3.T + b3
        ce = -(logits.log_softmax(1) * Y).sum(1)
        return ce + mu * (code - c2).pow(2).sum(1)

    def top_gradient(code):
        p = (torch.tanh(code) @ w3.T + b3).softmax(1)
        return ((p - Y) @ w3) * (1 - torch.tanh(code) ** 2) + 2 * mu * (code - c2)

    def gradient_steps(objective, gradient, code):
        # Plain steps of lr_codes; the test's values keep every first trial step accepted.
        for _ in range(code_steps):
            grad = gradient(code)
            new_code = code - lr_codes * grad
            armijo = objective(code) - 1e-4 * lr_codes * grad.pow(2).sum(1)
            assert (objective(new_code) <= armijo).all(), "the test expects no backtracking"
            code = new_code
        return code

    new_c2 = gradient_steps(top_objective, top_gradient, c2)

    # The hidden block's objective, divided by mu, with the top code already updated.
    def hidden_objective(code):
        residual = new_c2 - (torch.tanh(code) @ w2.T + b2)
        return residual.pow(2).sum(1) + (code - c1).pow(2).sum(1)

    def hidden_gradient(code):
        residual = new_c2 - (torch.tanh(code) @ w2.T + b2)
        return -2 * (residual @ w2) * (1 - torch.tanh(code) ** 2) + 2 * (code - c1)

    new_c1 = gradient_steps(hidden_objective, hidden_gradient, c1)

    # Each layer regresses onto its code from the code below (mean over the batch).
    r1 = new_c1 - (X @ w1.T + b1)
    r2 = new_c2 - (torch.tanh(new_c1) @ w2.T + b2)
    e = ((torch.tanh(new_c2) @ w3.T + b3).softmax(1) - Y) / B
    check_layer(oam.layers[0], w1 + lr * 2 / B * r1.T @ X, b1 + lr * 2 / B * r1.sum(0), "hidden 1")
    check_layer(
        oam.layers[1],
        w2 + lr * 2 / B * r2.T @ torch.tanh(new_c1),
        b2 + lr * 2 / B * r2.sum(0),
        "hidden 2",
    )
    check_layer(oam.layers[2], w3 - lr * e.T @ torch.tanh(new_c2), b3 - lr * e.sum(0), "output")
    assert stats["mu"] == mu
    assert oam.mu == 0.8, "mu should grow by mu_growth and stop at mu_max"


def test_oam_backtracking_never_increases_code_objective():
    # A first step of 100 overshoots; ten halvings bring it to about 0.1.
    oam = OAM("mlp", (3,), 2, lr=0.1, seed=0, hidden=(4, 4), lr_codes=100.0, activation="tanh")
    x, y, _ = toy_batch()
    with torch.no_grad():
        c1 = oam._layer(1, x)
        c2 = oam._layer(2, c1)
    codes = [x, c1, c2 + 1.0]
    before = oam._code_objective(1, c1, c1, codes, y)
    after_code, steps = oam._code_step(1, c1, c1, codes, y, torch.full((5,), 100.0))
    after = oam._code_objective(1, after_code, c1, codes, y)
    assert (steps < 100.0).all(), f"every example should have backtracked, steps {steps.tolist()}"
    assert (after <= before).all(), f"objective rose: {before.tolist()} -> {after.tolist()}"
    assert (after < before).any(), "no example made progress"


def test_oam_conv_step_updates_every_layer():
    oam = OAM("conv", (1, 8, 8), 3, lr=1e-2, seed=0, channels=(2, 3))
    before = [layer.weight.clone() for layer in oam.layers]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    stats = oam(x, torch.tensor([0, 1, 2, 0]), torch.arange(4))
    assert set(stats) >= {"loss", "code_penalty/1", "code_penalty/2"}
    for l, (layer, weight) in enumerate(zip(oam.layers, before)):
        assert not torch.equal(layer.weight, weight), f"layer {l + 1} did not move"


# -- shared interface -------------------------------------------------------

SMALL = {
    "dfa-mlp": lambda seed: DFA("mlp", (4,), 3, lr=0.05, seed=seed, hidden=(5, 5), num_examples=8),
    "dfa-conv": lambda seed: DFA(
        "conv", (1, 8, 8), 3, lr=0.05, seed=seed, channels=(2, 3), num_examples=8
    ),
    "dtp-mlp": lambda seed: DTP("mlp", (4,), 3, lr=1e-2, seed=seed, hidden=(5, 5), num_examples=8),
    "oam-mlp": lambda seed: OAM("mlp", (4,), 3, lr=1e-2, seed=seed, hidden=(5, 5), num_examples=8),
    "oam-conv": lambda seed: OAM(
        "conv", (1, 8, 8), 3, lr=1e-2, seed=seed, channels=(2, 3), num_examples=8
    ),
}


def small_batches(method, count=4):
    generator = torch.Generator().manual_seed(1)
    shape = method.network.input_shape
    return [
        (
            torch.randn(6, *shape, generator=generator),
            torch.randint(0, 3, (6,), generator=generator),
            torch.randint(0, 8, (6,), generator=generator),
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_state_dict_continues_bitwise(kind):
    original = SMALL[kind](0)
    batches = small_batches(original)
    for batch in batches[:2]:
        original(*batch)
    state = original.state_dict()
    stats_original = [original(*batch) for batch in batches[2:]]

    restored = SMALL[kind](seed=7)
    restored.load_state_dict(state)
    stats_restored = [restored(*batch) for batch in batches[2:]]

    assert stats_restored == stats_original
    final_original, final_restored = original.state_dict(), restored.state_dict()
    for name, value in final_original["network"].items():
        assert torch.equal(final_restored["network"][name], value), f"{kind}: {name} differs"
    if kind.startswith("dtp"):
        for name, value in final_original["inverses"].items():
            assert torch.equal(final_restored["inverses"][name], value), f"{kind}: inverse {name}"
    if kind.startswith("dfa"):
        for b_original, b_restored in zip(original.feedback, restored.feedback):
            assert torch.equal(b_original, b_restored)


def test_load_state_dict_rejects_other_method():
    dfa, oam = SMALL["dfa-mlp"](0), SMALL["oam-mlp"](0)
    with pytest.raises(ValueError, match="saved by 'oam', not 'dfa'"):
        dfa.load_state_dict(oam.state_dict())


def test_load_state_dict_rejects_other_shapes():
    wide = DFA("mlp", (4,), 3, lr=0.05, seed=0, hidden=(6, 5))
    narrow = SMALL["dfa-mlp"](0)
    before = narrow.state_dict()
    with pytest.raises(ValueError, match="saved 'network' tensors have shapes"):
        narrow.load_state_dict(wide.state_dict())
    for name, value in narrow.state_dict()["network"].items():
        assert torch.equal(value, before["network"][name]), f"a rejected state changed {name}"


BAD_BATCHES = [
    (lambda x, y, i: (x, torch.tensor([0, 3]), i), "label 3 is outside [0, 3)"),
    (lambda x, y, i: (x, torch.tensor([-1, 0]), i), "label -1 is outside [0, 3)"),
    (lambda x, y, i: (x, y, torch.tensor([0, 8])), "index 8 is outside [0, 8)"),
    (lambda x, y, i: (x, y, torch.tensor([-2, 1])), "index -2 is outside [0, 8)"),
    (lambda x, y, i: (x.double(), y, i), "x must be float32, got torch.float64"),
    (lambda x, y, i: (x, y.int(), i), "y must be int64, got torch.int32"),
    (lambda x, y, i: (x, y, i[:1]), "index must have shape (2,)"),
    (lambda x, y, i: (x[:, :3], y, i), "x must have shape (B, 4), got (2, 3)"),
    (lambda x, y, i: (x.to("meta"), y, i), "x is on meta but the model is on cpu"),
    (lambda x, y, i: (x.fill_(float("nan")), y, i), "x contains NaN or Inf"),
    (lambda x, y, i: (x[:0], y[:0], i[:0]), "the batch is empty"),
]


@pytest.mark.parametrize("kind", ["dfa-mlp", "dtp-mlp", "oam-mlp"])
@pytest.mark.parametrize("change, message", BAD_BATCHES)
def test_invalid_batch_raises_named_error(kind, change, message):
    method = SMALL[kind](0)
    before = method.state_dict()["network"]
    batch = (torch.randn(2, 4), torch.zeros(2, dtype=torch.int64), torch.arange(2))
    with pytest.raises(ValueError) as info:
        method(*change(*batch))
    assert message in str(info.value)
    for name, value in method.state_dict()["network"].items():
        assert torch.equal(value, before[name]), f"a rejected batch changed {name}"


def test_negative_index_without_dataset_size():
    dfa = DFA("mlp", (4,), 3, lr=0.05, seed=0, hidden=(5,))
    batch = (torch.randn(2, 4), torch.zeros(2, dtype=torch.int64), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="index -1 is negative; every index must be >= 0"):
        dfa(*batch)


@pytest.mark.parametrize("kind", ["dfa-mlp", "dtp-mlp", "oam-mlp"])
def test_non_finite_loss_raises_with_step(kind):
    method = SMALL[kind](0)
    with torch.no_grad():
        method.layers[-1].weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="at step 1 .* smaller step size"):
        method(torch.randn(2, 4), torch.zeros(2, dtype=torch.int64), torch.arange(2))


def test_unknown_network_and_options_raise():
    with pytest.raises(ValueError, match="unknown baseline network 'resnet'"):
        build_baseline_network("resnet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="takes \\(C, H, W\\) inputs"):
        build_baseline_network("conv", (784,), 10)
    with pytest.raises(ValueError, match="step rule must be one of"):
        DFA("mlp", (4,), 3, lr=0.1, seed=0, step_rule="adagrad")
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got nan"):
        OAM("mlp", (4,), 3, lr=float("nan"), seed=0)


def test_interface_counts_and_predict():
    assert set(BASELINES) == set(DEFAULT_LR) == {"dfa", "dtp", "oam"}
    for kind, build in SMALL.items():
        method = build(0)
        counts = method.variable_counts()
        assert counts["state_variables"] == 0, kind
        assert counts["multipliers"] == 0, kind
        x = small_batches(method, 1)[0][0]
        assert method.eval() is method
        assert not method.network.training
        assert method.predict(x).shape == (6, 3), kind
        method.train()
        assert method.network.training
    assert SMALL["dfa-mlp"](0).variable_counts()["feedback_entries"] == (5 + 5) * 3
    assert SMALL["dtp-mlp"](0).variable_counts()["inverse_weights"] == 5 * 5 + 5


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_learns_separable_blobs(name):
    # Three Gaussian blobs in 8-D, 2 standard deviations apart: every method
    # should fit them within 150 steps of batch 32.
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 2
    y = torch.arange(600) % 3
    x = centres[y] + torch.randn(600, 8, generator=generator) * 0.5
    lr = {"dfa": 0.05, "dtp": 1e-3, "oam": 1e-3}[name]
    method = BASELINES[name]("mlp", (8,), 3, lr=lr, seed=0, hidden=(16, 16), num_examples=600)
    for step in range(150):
        index = torch.randint(0, 600, (32,), generator=generator)
        method(x[index], y[index], index)
    accuracy = (method.predict(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.95, f"{name} reached only {accuracy:.3f} training accuracy"
