"""Sparse layers that train: :class:`TrainableSparseLinear` and the custom ops under it.

The inference layers (``SparseLinear``, ``SparseConv1D``) still live in
:mod:`sparse_lth.modules`; docs/DESIGN.md plans their move here.
"""

from sparse_lth.nn.trainable import TrainableSparseLinear

__all__ = ["TrainableSparseLinear"]
