"""Shared test setup: Triton's CPU interpreter, one torch thread."""

import os

import torch  # does not import triton (checked): the env var below is still in time

# Triton reads TRITON_INTERPRET once, when a kernel module is imported: set it before any test
# module imports one. Without a GPU the kernels run on the CPU interpreter; with one, on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' models are tiny: one intra-op thread is as fast, and it cannot collapse the way
# two spinning OpenMP threads do on a loaded 2-core machine (seen: 10x slower training).
torch.set_num_threads(1)

