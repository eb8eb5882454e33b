"""distprop_fast: Lagrangian training of neural networks (ExtraProp, DistProp)."""

__version__ = "0.1.0"
