"""Shared test setup: Triton's CPU interpreter, one torch thread, the slow marker."""

import os

import torch  # does not import triton (checked): the env var below is still in time

# Triton reads TRITON_INTERPRET once, when a kernel module is imported: set it before any test
# module imports one. Without a GPU the kernels run on the CPU interpreter; with one, on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The tests' models are tiny: one intra-op thread is as fast, and it cannot collapse the way
# two spinning OpenMP threads do on a loaded 2-core machine (seen: 10x slower training).
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (or set SPARSE_LTH_SLOW=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("SPARSE_LTH_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or SPARSE_LTH_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
