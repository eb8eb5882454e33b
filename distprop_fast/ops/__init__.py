"""The operations of a DistProp step, each behind one ``backend=`` dispatch.

Three have fused kernels; ``zscore_l1_constraint`` runs as a PyTorch reference only.
"""

from distprop_fast.ops._backend import BACKENDS, BackendUnavailableError, resolve_backend
from distprop_fast.ops.reference import sparse_sgd_
from distprop_fast.ops.sampling import sample_classes
from distprop_fast.ops.sparse_extra_adagrad import sparse_extra_adagrad_
from distprop_fast.ops.zscore_constraint import zscore_constraint
from distprop_fast.ops.zscore_l1_constraint import zscore_l1_constraint

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "resolve_backend",
    "sample_classes",
    "sparse_extra_adagrad_",
    "sparse_sgd_",
    "zscore_constraint",
    "zscore_l1_constraint",
]
