"""Sparse x dense kernels, imported as ``sparse_lth.kernels``.

Kernels take index and value tensors (torch sparse CSR / BSR tensors), never a model or a Mask.
"""

__all__: list[str] = []
