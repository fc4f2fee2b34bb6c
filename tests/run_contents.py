"""What a run directory holds, as plain data, for comparing two runs (a module of its own:
test files import it by name, like tolerances.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _without(data: Any, field: str) -> Any:
    """``data`` with every ``field`` key removed from the dicts inside it."""
    if isinstance(data, dict):
        return {k: _without(v, field) for k, v in data.items() if k != field}
    if isinstance(data, list):
        return [_without(v, field) for v in data]
    return data


def run_contents(run_dir: Path, ignore_field: str | None = "seconds") -> dict[str, Any]:
    """Every JSON and safetensors file under ``run_dir``, by relative path (tensors as lists).
    ``ignore_field`` drops a JSON field a rerun cannot repeat (by default the rounds' wall time)."""
    from safetensors.torch import load_file

    files: dict[str, Any] = {}
    for path in sorted(Path(run_dir).rglob("*")):
        key = str(path.relative_to(run_dir))
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            files[key] = _without(data, ignore_field) if ignore_field else data
        elif path.suffix == ".safetensors":
            files[key] = {k: v.tolist() for k, v in load_file(str(path)).items()}
    return files
