"""sparse_lth: find lottery tickets, store them sparse, run them fast.

Public API (re-exports only).
"""

from sparse_lth.masks import Mask, prunable_names
from sparse_lth.models import build_model
from sparse_lth.pruning import prune_by_magnitude, prune_n_m, random_mask_like
from sparse_lth.data import load_dataset
from sparse_lth.lottery import LotteryConfig, Ticket, find_ticket
from sparse_lth.user_loop import TrainContext
from sparse_lth.formats import (SparseWeight, check_format, from_scipy, nbytes, padded_shape, to_bsr, to_csr,
                                to_dense, to_scipy, to_sparse_weight)
from sparse_lth.checkpoint import ConvertReport, TensorReport, convert_checkpoint, load_sparse, save_sparse

__all__ = ["Mask", "prunable_names", "build_model", "prune_by_magnitude", "prune_n_m", "random_mask_like",
           "load_dataset", "LotteryConfig", "Ticket", "find_ticket", "TrainContext",
           "SparseWeight", "check_format", "from_scipy", "nbytes", "padded_shape", "to_bsr", "to_csr", "to_dense",
           "to_scipy", "to_sparse_weight",
           "ConvertReport", "TensorReport", "convert_checkpoint", "load_sparse", "save_sparse"]

# SparseLinear / sparsify / densify and the kernel choice behind them
from sparse_lth.backends import choose_backend, sparse_linear, sparse_matmul  # noqa: E402
from sparse_lth.nn import (SparseConv1D, SparseConv2d, SparseLinear, SparseMultiheadAttention,  # noqa: E402
                           TrainableSparseLinear, calibration_table, densify, sparsify)

__all__ += ["SparseLinear", "SparseConv1D", "SparseConv2d", "SparseMultiheadAttention", "TrainableSparseLinear",
            "sparsify", "densify",
            "calibration_table",
            "choose_backend", "sparse_matmul", "sparse_linear"]
