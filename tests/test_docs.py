"""The documents a user reads stay true: README links resolve inside the repository, the design
document names every module there is, and the docstring examples of the public API run."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")

# Modules whose docstring examples run here (csr.py / bsr.py run in test_triton_kernels.py,
# sddmm.py in test_sddmm.py, formats / checkpoint in test_checkpoint.py); lottery's and
# run_report's examples run a small search.
DOCTESTED = ["sparse_lth.masks", "sparse_lth.pruning", "sparse_lth.nn.linear", "sparse_lth.nn.hf_conv1d", "sparse_lth.nn.convert",
             "sparse_lth.backends",
             "sparse_lth.user_loop", "sparse_lth.nn.attention", "sparse_lth.training", "sparse_lth.nn.ops", "sparse_lth.nn.calibrate",
             "sparse_lth.nn.trainable", "sparse_lth.models",
             "sparse_lth.lottery", "sparse_lth.bench_report", "sparse_lth.run_files", "sparse_lth.run_report",
             "sparse_lth.kernels.cpu", "sparse_lth.kernels.cuda_rule", "sparse_lth.kernels.compiled",
             "sparse_lth.kernels.invariants", "sparse_lth.kernels.reference", "sparse_lth.kernels.cpu_conv",
             "sparse_lth.kernels.cpu_spmm", "sparse_lth.nn.conv", "sparse_lth.eval_paths",
             "sparse_lth.optim"]


@pytest.mark.parametrize("document", ["README.md", "docs/DESIGN.md", "bench/RESULTS.md"])
def test_relative_links_resolve_inside_the_repository(document):
    text = (ROOT / document).read_text()
    for target in LINK.findall(text):
        if "://" in target:
            continue
        path = (ROOT / document).parent / target
        assert path.exists(), f"{document} links to {target}, which is not in the repository"
        assert ROOT in path.resolve().parents, f"{document} links outside the repository: {target}"


def test_design_document_names_every_module():
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    for folder in ("sparse_lth", "kernels", "sparse_lth/nn"):
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.name != "__init__.py":
                assert path.name in design, f"docs/DESIGN.md does not describe {folder}/{path.name}"
    assert "docs/DESIGN.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", DOCTESTED)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, name
