"""sparse_lth: find lottery tickets, store them sparse, run them fast.

Public API (re-exports only).
"""

from sparse_lth.masks import Mask, prunable_names

__all__ = ["Mask", "prunable_names"]
