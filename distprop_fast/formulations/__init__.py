"""Formulations: the training problems a solver steps on."""

from distprop_fast.formulations.backprop import Backprop
from distprop_fast.formulations.base import Formulation, SparseTable, Terms
from distprop_fast.formulations.distprop import DistProp
from distprop_fast.formulations.extraprop import ExtraProp, shrink
from distprop_fast.formulations.penalty import Penalised

__all__ = ["Backprop", "DistProp", "ExtraProp", "Formulation", "Penalised", "SparseTable", "Terms", "shrink"]
