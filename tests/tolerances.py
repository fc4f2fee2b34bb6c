"""The per-dtype TOLERANCE table the kernel tests share (a module of its own: test files
import it by name, and every folder's conftest.py is named ``conftest``)."""

import torch

# Three-way rule for low precision: a kernel's error against the fp64 reference may be at most
# `factor` x torch's own error at that dtype (the same product computed by torch in that dtype)
# plus `atol` x the reference's scale (max |ref|). Both kernels and torch round each output to
# the dtype once, so their errors are near-equal; `factor` allows for a different summation
# order, `atol` for a torch error of exactly 0 (an all-zero or tiny problem).
TOLERANCE = {
    torch.float32: {"factor": 2.0, "atol": 1e-6},
    torch.float16: {"factor": 2.0, "atol": 1e-4},
    torch.bfloat16: {"factor": 2.0, "atol": 1e-3},
}
