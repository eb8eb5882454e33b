"""Backprop baseline: the plain loss of the composed network, no constraints."""

from __future__ import annotations

from distprop_fast.formulations.base import BatchShard, Formulation, Terms, batch_cross_entropy
from distprop_fast.models import Chain


class Backprop(Formulation):
    """``min_w mean_i CE(f(x_i; w), y_i)``."""

    name = "backprop"

    def __init__(self, network: Chain):
        super().__init__()
        self.network = network

    def lagrangian(self, x, y, index, rows, shard: BatchShard | None = None):
        loss = batch_cross_entropy(self.network(x), y, shard)
        return Terms(loss=loss, lagrangian=loss)
