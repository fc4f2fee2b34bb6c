"""Every file name of a search run, atomic writes, checked reads, and the one-writer lock.

A run directory looks like::

    <out_dir>/<model>-<dataset>-<config hash>/
        run.lock                     held (flock) by the one process writing this run
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

Every reader raises ``ValueError`` naming the file at fault and what to do about it (delete
the round folder to recompute it, or the run directory to start over) when a file is missing,
truncated or unreadable. Every writer writes a temporary file and renames it into place, so a
file is never half-written and never written through a symbolic link planted at its name
(a rename replaces the link; it does not follow it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
import math
from collections.abc import Callable, Mapping, Sequence
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
LOCK_FILE = "run.lock"  # no leading dot: a run leaves no dot-files behind
CONTROLS_DIR = "controls"
# The accuracy a round is judged by: test accuracy at the early-stop iteration (the evaluation
# with the lowest validation loss), a fraction in [0, 1], as the built-in loop records it.
ACCURACY_KEY = "early_stop_test_accuracy"
_ROUND_RE = re.compile(r"^round_(\d{2,})$")
# Prefixes of the temporaries the atomic writers make (".<name>.<random>.tmp", ".round_NN.<random>").
_TEMP_PREFIXES = (".round_", *(f".{name}." for name in (MASK_FILE, TRAINED_FILE, RECORD_FILE, SUMMARY_FILE,
                                                         INIT_FILE, REWIND_FILE, CONFIG_FILE, PLOT_FILE)))


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


# -- writing ------------------------------------------------------------------------------------
def _file_mode() -> int:
    """What open() would give a new file: mkstemp's 0600 would hide run files from other users."""
    try:  # Linux says it without touching it; os.umask can only be read by setting it
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()
_DIR_MODE = _FILE_MODE | ((_FILE_MODE & 0o444) >> 2)  # x wherever r: what mkdir would give


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary file beside ``path``, then rename it to ``path``.

    Never leaves half a file, and replaces (never follows) a symbolic link at ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file through a temporary file and a rename: never half a file.

    Tensors that share storage (tied weights: GPT-2's output layer is its embedding) are
    written as separate copies: safetensors refuses shared storage, and loading gives each
    name its own equal tensor, which ``load_state_dict`` copies into the tied parameter.
    """
    from safetensors.torch import save_file

    contiguous: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().contiguous().cpu()
        key = (t.untyped_storage().data_ptr(), str(t.device))
        if t.numel() and key in seen:
            t = t.clone()
        elif t.numel():
            seen.add(key)
        contiguous[name] = t
    atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def atomic_write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON through a temporary file and a rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    atomic_write(path, write)


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
        os.chmod(tmp, _DIR_MODE)  # mkdtemp's 0700 would hide the round from other users
        _remove_without_following(final)  # a rerun of a round that already landed: keep the newer one
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_without_following(path: Path) -> None:
    """Remove a folder, file or symbolic link at ``path``; a link goes, its target stays."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete what a killed run left half-written (temporary files and round folders).

    Call it only while holding the run's lock: a live writer's temporaries look the same.
    """
    for tmp in Path(run_dir).rglob(".*"):
        if not tmp.name.startswith(_TEMP_PREFIXES):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


# -- reading ------------------------------------------------------------------------------------
def _redo_round(path: Path) -> str:
    return f"delete the folder {path.parent} to recompute that round"


def _redo_run(run_dir: Path) -> str:
    return f"delete the run directory {run_dir} to start that search over"


def _read_safetensors(path: Path, remedy: str, tensors: bool = True) -> dict[str, torch.Tensor]:
    """The file's tensors, or with ``tensors=False`` only its header read (safetensors checks
    that the header is whole and covers the file exactly: a cheap test for truncation);
    ValueError naming the file and ``remedy`` when it is missing or broken."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"{path} is missing; {remedy}")
    try:
        if tensors:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            f.keys()
        return {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is truncated or unreadable ({e}); {remedy}") from None


def _load_json_object(path: Path, remedy: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path} is missing; {remedy}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is truncated or not valid JSON ({e}); {remedy}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; {remedy}")
    return data


def _existing_round(base: str | Path, round_index: int) -> Path:
    folder = round_dir(base, round_index)
    if not folder.is_dir():
        raise FileNotFoundError(f"no completed round {round_index} under {base}")
    return folder


def read_record(base: str | Path, round_index: int) -> dict:
    """The record of one completed round, without loading its tensors."""
    path = _existing_round(base, round_index) / RECORD_FILE
    return _load_json_object(path, _redo_round(path))


def read_mask(base: str | Path, round_index: int) -> dict[str, torch.Tensor]:
    """The mask tensors of one completed round."""
    path = _existing_round(base, round_index) / MASK_FILE
    return _read_safetensors(path, _redo_round(path))


def read_round(base: str | Path, round_index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(mask tensors, trained state dict, record) of one completed round."""
    path = _existing_round(base, round_index) / TRAINED_FILE
    trained = _read_safetensors(path, _redo_round(path))
    return read_mask(base, round_index), trained, read_record(base, round_index)


def read_init(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """theta_0, the dense initialization of a run."""
    return _read_safetensors(Path(run_dir) / INIT_FILE, _redo_run(Path(run_dir)))


def read_rewind(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """theta_k, the weights a late-rewinding run resets survivors to."""
    return _read_safetensors(Path(run_dir) / REWIND_FILE, _redo_run(Path(run_dir)))


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The config a run was made with, as a dict; ``ValueError`` naming the file if it is broken."""
    path = Path(run_dir) / CONFIG_FILE
    return _load_json_object(path, f"fix it, or {_redo_run(Path(run_dir))}")


def check_run_files(run_dir: str | Path) -> None:
    """Check that every file a resume reads is whole, before any training starts.

    Safetensors files are checked by their headers (safetensors verifies the header covers the
    file exactly, so a truncated file is caught without reading the tensors); JSON is parsed.
    Raises ``ValueError`` naming the first bad file and what to delete.
    """
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).exists():
        read_config(run_dir)
    for name in (INIT_FILE, REWIND_FILE):
        if (run_dir / name).exists():
            _read_safetensors(run_dir / name, _redo_run(run_dir), tensors=False)
    controls = run_dir / CONTROLS_DIR
    bases = [run_dir, *(sorted(p for p in controls.iterdir() if p.is_dir()) if controls.is_dir() else [])]
    for base in bases:
        for r in completed_rounds(base):
            folder = round_dir(base, r)
            for name in (MASK_FILE, TRAINED_FILE):
                _read_safetensors(folder / name, _redo_round(folder / name), tensors=False)
            _load_json_object(folder / RECORD_FILE, _redo_round(folder / RECORD_FILE))


def last_ticket(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """The newest completed round of a run: (mask tensors, trained state dict, record).

    This is what ``convert`` deploys: the trained weights of the sparsest ticket found so far.
    """
    rounds = completed_rounds(run_dir)
    if not rounds:
        raise FileNotFoundError(f"{run_dir} holds no completed round yet")
    return read_round(run_dir, rounds[-1])


def read_records(base: str | Path) -> list[dict]:
    """The records of every completed round under ``base`` (a run or a control), in round order."""
    return [read_record(base, r) for r in completed_rounds(base)]


def _round_list(rounds: Sequence[int]) -> str:
    if not rounds:
        return "none"
    if list(rounds) == list(range(rounds[0], rounds[-1] + 1)) and len(rounds) > 2:
        return f"{rounds[0]}-{rounds[-1]}"
    return ", ".join(map(str, rounds))


def pick_round(records: Sequence[Mapping[str, Any]], round: int | None = None,
               max_drop: float | None = None) -> int:
    """Which round of a run to deploy, from its rounds' records (:func:`read_records`).

    * ``round``: that round, which must be among the records;
    * ``max_drop``: the sparsest round (fewest ``weights_remaining``; the later round on a tie)
      whose test accuracy at the early-stop iteration (``early_stop_test_accuracy``) is at most
      ``max_drop`` percentage points below round 0's, the dense network's (so round 0 itself
      when no pruned round is close enough);
    * neither: the last round, the sparsest ticket found (what ``convert`` deploys by default).

    Raises ``ValueError`` for both given, a round that is not there, a negative or non-finite
    ``max_drop``, and records that hold no ``early_stop_test_accuracy`` (a run of your own
    ``train_fn`` records its own metrics: pick its round by number).

    >>> records = [{"round": 0, "weights_remaining": 1.0, "early_stop_test_accuracy": 0.950},
    ...            {"round": 1, "weights_remaining": 0.8, "early_stop_test_accuracy": 0.955},
    ...            {"round": 2, "weights_remaining": 0.64, "early_stop_test_accuracy": 0.942},
    ...            {"round": 3, "weights_remaining": 0.51, "early_stop_test_accuracy": 0.900}]
    >>> pick_round(records), pick_round(records, round=1), pick_round(records, max_drop=1.0)
    (3, 1, 2)
    >>> pick_round(records, max_drop=0), pick_round(records, max_drop=5)
    (1, 3)
    >>> pick_round(records, round=7)
    Traceback (most recent call last):
    ...
    ValueError: there is no round 7 (completed rounds: 0-3)
    """
    if round is not None and max_drop is not None:
        raise ValueError("give a round (--round) or a largest accuracy drop (--max-drop), not both")
    rounds = [int(r["round"]) for r in records]
    if not rounds:
        raise ValueError("the run holds no completed round yet")
    if round is not None:
        if isinstance(round, bool) or not isinstance(round, int) or round not in rounds:
            raise ValueError(f"there is no round {round} (completed rounds: {_round_list(rounds)})")
        return round
    if max_drop is None:
        return rounds[-1]
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < math.inf:
        raise ValueError(f"the largest accuracy drop (--max-drop) must be a non-negative number of "
                         f"percentage points, got {max_drop!r}")
    by_round = {int(r["round"]): r for r in records}
    if 0 not in by_round:
        raise ValueError("round 0 (the dense network) has no record, and --max-drop compares with it; "
                         "pick a round by number (--round)")
    for r in records:
        if not isinstance(r.get(ACCURACY_KEY), (int, float)):
            raise ValueError(f"round {r['round']}'s record holds no {ACCURACY_KEY} (a run of your own "
                             "train_fn records its own metrics); pick a round by number (--round)")
    dense = 100 * by_round[0][ACCURACY_KEY]
    if not math.isfinite(dense):
        raise ValueError(f"round 0's {ACCURACY_KEY} is {by_round[0][ACCURACY_KEY]}, nothing to compare with; "
                         "pick a round by number (--round)")
    # 1e-9: a drop of exactly max_drop points must count as within it despite float rounding.
    close = [r for r in records if dense - 100 * r[ACCURACY_KEY] <= max_drop + 1e-9]
    best = min(close, key=lambda r: (r.get("weights_remaining", 1.0), -int(r["round"])))
    return int(best["round"])


# -- one writer per run directory ---------------------------------------------------------------
class RunDirBusy(BlockingIOError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive ``flock`` on ``run_dir/run.lock``, held until :meth:`release` or process exit.

    The kernel drops the lock when its holder dies (SIGKILL included), so a lock left behind is
    stale by construction and the next search takes it. The file records who holds it (pid,
    host, start time) for the message a second writer gets. It is never unlinked: unlinking a
    lock file races with a process that has just opened it.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        try:
            # O_NOFOLLOW: a symbolic link planted at run.lock is refused, never written through.
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"{self.path} is a symbolic link; sparse-lth writes only real files in a run "
                                 "directory: remove the link") from None
            raise
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            raise RunDirBusy(f"{self.run_dir} is being written by {holder}; wait for it to finish "
                             "(or stop that process) and run again") from None
        except BaseException:
            os.close(self._fd)
            raise
        self._write_holder()

    def _holder(self) -> str:
        try:
            info = json.loads(os.pread(self._fd, 4096, 0).decode())
            return f"pid {info['pid']} on host {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"  # it has the lock but has not written its name yet

    def _write_holder(self) -> None:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (closing the file drops the flock); the file stays."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_dir(run_dir: str | Path) -> RunLock:
    """Take the run directory's writer lock or raise :class:`RunDirBusy` naming its holder."""
    return RunLock(run_dir)


def make_run_dir(out_dir: str | Path, name: str) -> Path:
    """Create ``out_dir/name`` (and ``out_dir``) or raise ``ValueError`` saying what is wrong."""
    out, run_dir = Path(out_dir), Path(out_dir) / name
    for path in (out, run_dir):
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory; choose another output folder (--out)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the run directory {run_dir} ({e.strerror}); choose a writable "
                         "output folder (--out)") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ValueError(f"{run_dir} is not writable; choose a writable output folder (--out)")
    return run_dir


def refuse_symlinks(run_dir: str | Path) -> None:
    """Raise ``ValueError`` naming the first symbolic link found below ``run_dir``.

    A run writes only real files and folders; a link planted inside (``controls`` -> elsewhere)
    would make it write or delete outside the run. The walk itself never follows links.
    """
    for root, dirs, files in os.walk(run_dir, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(root) / name
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}); a run directory must hold "
                                 "only real files and folders: remove the link and run again")
