"""Data-parallel search on torch.distributed: the one room that knows about ranks.

Launched by ``torchrun`` (``torchrun --standalone --nproc_per_node 2 -m sparse_lth search ...``),
each process is a rank; without torchrun there is one, and every function here is then a no-op
or the identity, so a single process runs exactly the code it always ran.

The protocol does not change with the world size:

* every rank draws the same global batch (the single process's order) and takes its own
  contiguous shard of it (:func:`shard`); DistributedDataParallel averages the shards'
  gradients, which is the global batch's mean gradient, up to summation order;
* evaluation is sharded and summed across ranks (:func:`all_sum`);
* only rank 0 writes run files (the writer lock, atomically as always); every rank reads them
  after a barrier;
* a step that may fail on some ranks and not on others (a missing dataset on one node, a
  broken run file, configs that disagree) runs under :func:`together`: every rank learns that
  one failed and raises the same error, naming the rank, instead of waiting forever for the
  others in the next collective call.

gloo serves the CPU, nccl CUDA. The built-in search trains on the CPU, so it joins with gloo,
on a GPU machine too; nccl is there for a loop whose tensors live on CUDA (``init("nccl")``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init", "shutdown", "rank", "world", "is_main", "barrier", "broadcast", "all_sum", "shard", "wrap", "together",
           "agree", "RankError"]


class RankError(ValueError):
    """A step failed on some rank; raised on every rank with the first failure's message."""


def init(backend: str = "gloo") -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); True when distributed.

    Idempotent. ``backend``: ``"gloo"`` for a loop whose tensors live on the CPU (the built-in
    search's), ``"nccl"`` for one on CUDA (each rank then on ``LOCAL_RANK``'s GPU).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Leave the process group (the end of a torchrun command); a no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Rank 0: the one that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable object; tensors come back on the CPU)."""
    if not _active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (in float64, so counts stay exact)."""
    if not _active():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global batch (of indices); the whole batch alone.

    The batch size must divide by the world size (checked at start: :func:`agree`), so every
    share is the same size and the mean of the shards' mean gradients is the global mean.
    """
    n = world()
    if n == 1:
        return batch
    per = len(batch) // n
    return batch[rank() * per:(rank() + 1) * per]


def bounds(length: int) -> tuple[int, int]:
    """This rank's [start, stop) of ``length`` items (evaluation shards; they may differ by one)."""
    n, r = world(), rank()
    return length * r // n, length * (r + 1) // n


def wrap(model: nn.Module) -> nn.Module:
    """``model`` inside DistributedDataParallel when there are several ranks, else itself."""
    if not _active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if dist.get_backend() == "nccl" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Run a block that may fail on some ranks only; if it fails anywhere, fail everywhere.

    Every rank reports success or its error after the block; if any failed, each raises
    :class:`RankError` with the lowest failing rank's message (rank 0's own error is re-raised
    as it was), so no rank waits for another in a collective call that will never come.
    """
    if not _active():
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - reported to every rank, re-raised below
        error = e
    reports: list[Any] = [None] * world()
    dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if not failed:
        return
    if error is not None and failed[0][0] == rank():
        raise error
    first, message = failed[0]
    raise RankError(f"{what} failed on rank {first} of {world()}: {message}")


def agree(value: Any, what: str) -> None:
    """Raise :class:`RankError` on every rank unless all ranks hold an equal ``value``."""
    if not _active():
        return
    values: list[Any] = [None] * world()
    dist.all_gather_object(values, value)
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if differing:
        raise RankError(f"the ranks disagree on {what}: rank 0 has {values[0]!r}, rank {differing[0]} has "
                        f"{values[differing[0]]!r}; launch every rank with the same command and files")
