"""Every file name of a search run, and atomic writes.

A run directory looks like::

    <out_dir>/<model>-<dataset>-<config hash>/
        config.json                  the LotteryConfig that made it
        init.safetensors             theta_0 (the dense initialization)
        rewind.safetensors           the weights survivors are reset to (theta_0 or theta_k)
        round_00/                    one folder per round, written whole or not at all
            mask.safetensors         the mask this round trained under
            trained.safetensors      the trained weights (pruned entries exactly zero)
            record.json              accuracy, early-stop iteration, weights remaining
        controls/random_reinit/round_01/ ...   same layout, one per control
        records.json, accuracy.png   summary and plot, rewritten after every round

Only this module knows these names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "config.json"
INIT_FILE = "init.safetensors"
REWIND_FILE = "rewind.safetensors"
MASK_FILE = "mask.safetensors"
TRAINED_FILE = "trained.safetensors"
RECORD_FILE = "record.json"
SUMMARY_FILE = "records.json"
PLOT_FILE = "accuracy.png"
CONTROLS_DIR = "controls"
_ROUND_RE = re.compile(r"^round_(\d{2,})$")


def round_dir(base: str | Path, round_index: int) -> Path:
    return Path(base) / f"round_{round_index:02d}"


def control_dir(run_dir: str | Path, control: str) -> Path:
    return Path(run_dir) / CONTROLS_DIR / control


def completed_rounds(base: str | Path) -> list[int]:
    """Indices of the rounds whose folders exist (a folder appears only when complete)."""
    base = Path(base)
    if not base.is_dir():
        return []
    found = (_ROUND_RE.match(p.name) for p in base.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file through a temporary file and a rename: never half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(data: Any, path: str | Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def write_round(base: str | Path, round_index: int, mask: dict[str, torch.Tensor],
                trained: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:
    """Write a round's folder whole: build it under a temporary name, then rename it."""
    final = round_dir(base, round_index)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        atomic_save_safetensors(dict(mask), tmp / MASK_FILE)
        atomic_save_safetensors(trained, tmp / TRAINED_FILE)
        atomic_write_json(record, tmp / RECORD_FILE)
        if final.exists():  # a rerun of a round that already landed: keep the newer one
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _existing_round(base: str | Path, round_index: int) -> Path:
    folder = round_dir(base, round_index)
    if not folder.is_dir():
        raise FileNotFoundError(f"no completed round {round_index} under {base}")
    return folder


def read_record(base: str | Path, round_index: int) -> dict:
    """The record of one completed round, without loading its tensors."""
    return json.loads((_existing_round(base, round_index) / RECORD_FILE).read_text())


def read_mask(base: str | Path, round_index: int) -> dict[str, torch.Tensor]:
    """The mask tensors of one completed round."""
    from safetensors.torch import load_file

    return load_file(str(_existing_round(base, round_index) / MASK_FILE))


def read_round(base: str | Path, round_index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(mask tensors, trained state dict, record) of one completed round."""
    from safetensors.torch import load_file

    trained = load_file(str(_existing_round(base, round_index) / TRAINED_FILE))
    return read_mask(base, round_index), trained, read_record(base, round_index)


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete what a killed run left half-written (temporary files and round folders)."""
    for tmp in Path(run_dir).rglob(".*"):
        if tmp.name.startswith((".round_", f".{MASK_FILE}", f".{TRAINED_FILE}", f".{RECORD_FILE}",
                                f".{SUMMARY_FILE}", f".{INIT_FILE}", f".{REWIND_FILE}", f".{CONFIG_FILE}")):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_config(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / CONFIG_FILE).read_text())


def last_ticket(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """The newest completed round of a run: (mask tensors, trained state dict, record).

    This is what ``convert`` deploys: the trained weights of the sparsest ticket found so far.
    """
    rounds = completed_rounds(run_dir)
    if not rounds:
        raise FileNotFoundError(f"{run_dir} holds no completed round yet")
    return read_round(run_dir, rounds[-1])
