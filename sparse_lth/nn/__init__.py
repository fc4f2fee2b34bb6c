"""Sparse layers that train (:class:`TrainableSparseLinear` and the custom ops under it), and the
per-layer calibrated choice of kernel (:mod:`sparse_lth.nn.calibrate`).

The inference layers (``SparseLinear``, ``SparseConv1D``) still live in
:mod:`sparse_lth.modules`; docs/DESIGN.md plans their move here.
"""

from sparse_lth.nn.calibrate import LayerChoice, calibration_table
from sparse_lth.nn.trainable import TrainableSparseLinear

__all__ = ["TrainableSparseLinear", "LayerChoice", "calibration_table"]
