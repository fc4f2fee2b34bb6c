"""Who may import whom (docs/DESIGN.md), checked by walking every import with ast."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)
KERNEL_THIRD_PARTY = {"torch", "triton", "numpy", "scipy", "numba", "llvmlite"}  # llvmlite: numba's IR, for intrinsics

# module -> sparse_lth modules it must never import (directly)
FORBIDDEN = {
    "masks": {"training", "lottery", "kernels", "nn", "backends", "pruning", "cli"},
    "formats": {"training", "lottery", "kernels", "nn", "backends", "pruning", "cli"},
    "checkpoint": {"training", "lottery", "kernels", "nn", "backends", "cli"},
    "pruning": {"training", "lottery", "kernels", "nn", "backends", "cli"},
    "training": {"lottery", "kernels", "backends", "cli"},  # training may use nn (trainable layers)
    "lottery": {"kernels", "nn", "backends", "cli"},
    "distributed": {"masks", "formats", "checkpoint", "pruning", "training", "lottery", "data", "models", "kernels",
                    "nn", "backends", "cli", "run_files", "user_loop"},
    "user_loop": {"training", "lottery", "kernels", "nn", "backends", "cli", "checkpoint"},
    "data": {"training", "lottery", "kernels", "nn", "backends", "cli"},
    "models": {"training", "lottery", "kernels", "nn", "backends", "cli"},
    "optim": {"masks", "formats", "checkpoint", "pruning", "training", "lottery", "data", "models", "kernels",
              "nn", "backends", "cli", "run_files", "user_loop", "distributed"},
    "heap": {"masks", "formats", "checkpoint", "pruning", "training", "lottery", "data", "models", "kernels",
             "nn", "backends", "cli", "run_files", "user_loop", "distributed", "optim"},
    # deploy side, on top of checkpoints: measures a finished run, never searches or trains
    "run_report": {"training", "lottery", "user_loop", "distributed", "pruning", "data", "kernels", "cli"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the same package
                names.add("." + (node.module or ""))
            else:
                names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_only_torch_triton_numpy_scipy(path):
    for name in _imports(path):
        top = name.split(".")[0]
        if name.startswith(".") or top in STDLIB or top in KERNEL_THIRD_PARTY or top == "__future__":
            continue
        if name.startswith("sparse_lth.kernels"):
            continue
        pytest.fail(f"kernels/{path.name} imports {name}: kernels know nothing of models or masks")


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_library_layers(module):
    for name in _imports(ROOT / "sparse_lth" / f"{module}.py"):
        parts = name.split(".")
        if parts[0] == "sparse_lth" and len(parts) > 1 and parts[1] in FORBIDDEN[module]:
            pytest.fail(f"sparse_lth/{module}.py imports {name}: an arrow against the layering")


@pytest.mark.parametrize("path", sorted((ROOT / "sparse_lth" / "nn").glob("*.py")), ids=lambda p: p.name)
def test_nn_never_imports_the_layers_above_it(path):
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "sparse_lth" and len(parts) > 1:
            assert parts[1] not in {"training", "lottery", "cli", "user_loop", "checkpoint", "run_files",
                                    "run_report", "distributed", "eval_paths", "pruning"}, \
                f"sparse_lth/nn/{path.name} imports {name}: an arrow against the layering"


def test_kernels_never_imported_as_top_level_name():
    for path in [*ROOT.glob("sparse_lth/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]:
        for name in _imports(path):
            assert name.split(".")[0] != "kernels", f"{path.name} imports '{name}': use sparse_lth.kernels"
