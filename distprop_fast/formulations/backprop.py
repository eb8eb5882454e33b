"""Backprop baseline: the plain loss of the composed network, no constraints."""

from __future__ import annotations

import torch.nn.functional as F

from distprop_fast.formulations.base import Formulation, Terms
from distprop_fast.models import Chain


class Backprop(Formulation):
    """``min_w mean_i CE(f(x_i; w), y_i)``."""

    name = "backprop"

    def __init__(self, network: Chain):
        super().__init__()
        self.network = network

    def lagrangian(self, x, y, index, rows):
        loss = F.cross_entropy(self.network(x), y)
        return Terms(loss=loss, lagrangian=loss)
