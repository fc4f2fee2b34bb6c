"""Sparse layers, mirroring ``torch.nn``: one module per layer family, the custom ops under them,
and the doors that swap a model's layers (``sparsify`` / ``densify``).

- :mod:`~sparse_lth.nn.linear`: :class:`SparseLinear` (inference)
- :mod:`~sparse_lth.nn.trainable`: :class:`TrainableSparseLinear` (values a Parameter over a fixed pattern)
- :mod:`~sparse_lth.nn.hf_conv1d`: :class:`SparseConv1D` (Hugging Face's GPT-2 ``Conv1D``)
- :mod:`~sparse_lth.nn.conv`: :class:`SparseConv2d`
- :mod:`~sparse_lth.nn.attention`: :class:`SparseMultiheadAttention`
- :mod:`~sparse_lth.nn.ops`: the torch custom ops (forward, transposed product, SDDMM) and their autograd
- :mod:`~sparse_lth.nn.calibrate`: the per-layer calibrated choice of kernel
- :mod:`~sparse_lth.nn.convert`: :func:`sparsify` / :func:`densify`
"""

from sparse_lth.nn.calibrate import LayerChoice, calibration_table
from sparse_lth.nn.trainable import TrainableSparseLinear
from sparse_lth.nn.linear import SparseLinear
from sparse_lth.nn.hf_conv1d import SparseConv1D
from sparse_lth.nn.conv import SparseConv2d
from sparse_lth.nn.attention import SparseMultiheadAttention
from sparse_lth.nn.convert import DEFAULT_MAX_DENSITY, densify, sparsify

__all__ = ["SparseLinear", "TrainableSparseLinear", "SparseConv1D", "SparseConv2d", "SparseMultiheadAttention",
           "sparsify", "densify", "DEFAULT_MAX_DENSITY", "LayerChoice", "calibration_table"]
