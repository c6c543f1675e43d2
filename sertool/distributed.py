"""torch.distributed helpers for the train stage (``torchrun --nproc_per_node=N -m sertool train ...``).

sertool has no cluster layer of its own: torchrun (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) starts the processes and
:func:`setup` joins them into a process group: gloo on CPU, NCCL on CUDA (each process on
``cuda:LOCAL_RANK``).  Without those variables (a plain ``sertool train``) everything here is a
no-op for a world of one, so the single-process code path is unchanged.

How the train stage uses it (sertool/train.py):

* every rank builds the same *global* batches from ``(seed, epoch)`` (fixed size or the frame
  budget) and takes its share of each (:func:`sertool.data.shard_batch`); the loss of a share is
  scaled so that DDP's gradient average equals the gradient of the global batch's mean loss, so
  ``train.batch_size`` is the global batch and the result does not depend on N (up to float
  summation order and per-rank dropout / BatchNorm statistics);
* dev and test predictions are computed on a strided share per rank and all-gathered in order,
  so every rank computes the same metrics and takes the same early-stopping decisions;
* rank 0 alone writes EXP (config, folds, statistics, checkpoints, logs, metrics, predictor);
  the others wait on a barrier and read what it wrote (EXP must be on a filesystem every node
  sees, as usual on a cluster).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "World",
    "setup",
    "world",
    "barrier",
    "broadcast_object",
    "all_gather_object",
    "all_sum",
    "broadcast_module",
    "launched_by_torchrun",
]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_SINGLE = World()


def launched_by_torchrun() -> bool:
    """True when the environment names a world of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def world() -> World:
    """The current process group (a world of one when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return _SINGLE
    return World(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0), dist.get_backend()
    )


def setup(device: str = "auto", timeout_s: float | None = None) -> tuple[World, str]:
    """Join the process group named by the environment; returns (world, device name).

    ``device`` is ``run.device``: with ``auto`` or ``cuda`` each process takes ``cuda:LOCAL_RANK``
    and NCCL when CUDA is available, else the CPU and gloo.  ``SERTOOL_DIST_BACKEND`` overrides
    the backend (e.g. gloo on GPUs for debugging)."""
    if not launched_by_torchrun():
        return _SINGLE, device
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if cuda:
        if device in ("auto", "cuda"):
            device = f"cuda:{local}"
        torch.cuda.set_device(torch.device(device))
    backend = os.environ.get("SERTOOL_DIST_BACKEND") or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        timeout = _dt.timedelta(seconds=float(timeout_s or os.environ.get("SERTOOL_DIST_TIMEOUT", 1800)))
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if backend == "nccl":
            kwargs["device_id"] = torch.device(device)
        dist.init_process_group(**kwargs)
    if not cuda and device == "auto":
        device = "cpu"
    return world(), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    w = world()
    if not w.distributed:
        return [obj]
    out: list = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of floats over the ranks (float64)."""
    if not world().distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy the parameters and buffers of rank ``src`` to every rank."""
    if not world().distributed:
        return
    with torch.no_grad():
        for t in list(module.state_dict().values()):
            if isinstance(t, torch.Tensor):
                dist.broadcast(t, src=src)
