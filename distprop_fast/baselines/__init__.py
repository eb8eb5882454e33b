"""Layer-local baselines that train a network without backpropagating through it.

* :class:`DFA`: direct feedback alignment (Nøkland 2016), ``mlp`` and ``conv``.
* :class:`DTP`: difference target propagation (Lee et al. 2015), ``mlp`` only.
* :class:`OAM`: online alternating minimisation (Choromanska et al. 2019), ``mlp`` and ``conv``.

Each is called like :class:`~distprop_fast.solvers.SaddlePointStep`:
``method(x, y, index)`` takes one step and returns ``{"loss": ..., ...}``, and
``method.predict(x)`` returns the logits of the plain network ``method.network``.
"""

from distprop_fast.baselines._common import BASELINE_NETWORKS, build_baseline_network
from distprop_fast.baselines.dfa import DFA
from distprop_fast.baselines.dtp import DTP
from distprop_fast.baselines.oam import OAM

BASELINES = {"dfa": DFA, "dtp": DTP, "oam": OAM}

# Step sizes of the weights under each method's default step rule (DFA: SGD
# with momentum 0.9; DTP: RMSprop; OAM: Adam) at batch 128. With each, the
# 784-256-256-10 mlp reached >= 0.97 test accuracy on full MNIST in 20 epochs
# (seed 0). DTP's was picked from four settings (results/baselines/README.md).
DEFAULT_LR = {"dfa": 0.01, "dtp": 5e-4, "oam": 1e-3}

__all__ = [
    "BASELINES",
    "BASELINE_NETWORKS",
    "DEFAULT_LR",
    "DFA",
    "DTP",
    "OAM",
    "build_baseline_network",
]
