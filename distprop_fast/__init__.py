"""distprop_fast: Lagrangian training of neural networks (ExtraProp, DistProp).

The public API for a training loop of your own::

    from distprop_fast import DistProp, SaddlePointStep, StepRuleConfig, build_network
"""

from distprop_fast.data import BatchLoader, IndexedDataset, load_dataset
from distprop_fast.formulations import Backprop, DistProp, ExtraProp, Formulation
from distprop_fast.models import Block, Chain, build_network
from distprop_fast.solvers import NonFiniteError, SaddlePointStep, StepRuleConfig
from distprop_fast.train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "Backprop",
    "BatchLoader",
    "Block",
    "Chain",
    "DistProp",
    "ExtraProp",
    "Formulation",
    "IndexedDataset",
    "NonFiniteError",
    "SaddlePointStep",
    "StepRuleConfig",
    "TrainConfig",
    "build_network",
    "load_dataset",
    "train",
]
