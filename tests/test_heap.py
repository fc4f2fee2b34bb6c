"""keep_freed_memory: glibc reuses a freed 64 MB block instead of mapping it afresh, counted by
the kernel's page faults. Each case runs in a process of its own (the setting is process-wide)."""

import resource
import subprocess
import sys

import pytest

from sparse_lth import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="a glibc setting")

LOOP = """
import resource, sys, torch
from sparse_lth.heap import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
def step():
    torch.empty(16 << 20).fill_(1.0)  # 64 MB, freed at once
for _ in range(60):  # to the heap's steady state
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_block(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, check=True,
                         timeout=300).stdout.split()
    return out[0], float(out[1])


def test_a_freed_block_is_reused_instead_of_faulted_in_again():
    pages = (64 << 20) // resource.getpagesize()
    _, plain = _faults_per_block("plain")
    if plain < pages / 2:
        pytest.skip(f"glibc's default already reuses the block here ({plain:.0f} faults; huge pages?)")
    kept, faults = _faults_per_block("keep")
    assert kept == "True"
    assert faults < pages / 20, f"{faults:.0f} page faults per 64 MB block with the setting, {plain:.0f} without"


def test_calling_again_changes_nothing():
    code = "from sparse_lth.heap import keep_freed_memory as k; print(k(), k(), k.cache_info().misses)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["True", "True", "1"]
