"""Small helpers every stage shares: atomic file writes and the choice of a torch device.

Every file a stage writes goes through :func:`atomic_write` (or a typed wrapper): the content is
written to a temporary file beside the target (unique per process and thread) and moved over it with
``os.replace``, so a reader, or a run killed mid-write, sees the old file or the new one, never
half of one.  ``tempfile``'s helpers do not rename into place, hence these few lines.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import numpy as np

__all__ = [
    "DeviceError",
    "atomic_open",
    "atomic_path",
    "atomic_write",
    "write_text",
    "write_json",
    "write_jsonl",
    "append_jsonl",
    "write_csv",
    "write_tsv",
    "stale_pid",
    "save_tensors",
    "json_default",
    "pick_device",
]


def _tmp_path(path: Path) -> Path:
    """``NAME.tmpPID.THREAD`` (``stale_pid`` reads the PID back)."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")


def stale_pid(tmp: Path, path: Path) -> int | None:
    """The PID in a temporary name of ``path`` made here (None for another name)."""
    pid = tmp.name[len(path.name) + 4 :].split(".")[0] if tmp.name.startswith(path.name + ".tmp") else ""
    return int(pid) if pid.isdigit() else None


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = False, **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` on a temporary file that replaces ``path`` when the block ends without
    an error (and is removed when it raises)."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name (h5py, ONNX export,
    another library); it replaces ``path`` when the block ends without an error.  ``fsync``: the
    file reaches the disk before the rename (a power cut leaves the old file or the new one)."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8, newlines as given) to ``path`` atomically."""
    mode = "wb" if isinstance(data, (bytes, bytearray)) else "w"
    with atomic_open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": ""})) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, text)


def json_default(o: Any):
    """``json.dumps(default=...)`` for numpy scalars and arrays (and paths)."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write(path, json.dumps(obj, indent=indent, default=json_default, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, default=json_default, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """One line appended and flushed (logs that grow epoch by epoch; a torn last line is ignored
    by readers that resume)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=json_default, ensure_ascii=False) + "\n")
        f.flush()


def write_csv(path: str | os.PathLike, rows: list[dict], float_format: str = "{:.6f}") -> None:
    """Rows (dicts with the same keys, in order) as CSV with a header; floats formatted."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else [])
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (float_format.format(v) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(path, buf.getvalue())


def write_tsv(path: str | os.PathLike, header: list[str], rows: Iterable[Iterable]) -> None:
    """A header line and rows, tab-separated, ``\n`` line ends."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file written atomically; metadata values that are not strings are stored as JSON."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
            str(tmp),
            metadata={
                k: (v if isinstance(v, str) else json.dumps(v, default=json_default))
                for k, v in (metadata or {}).items()
            },
        )


class DeviceError(ValueError):
    """A device that does not exist here (CUDA asked for on a machine without it, a typo)."""


def pick_device(name: str | None = "auto"):
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> ``torch.device``;
    anything else, or CUDA where there is none, raises :class:`DeviceError` naming the value."""
    import torch

    name = str(name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        index = name[len("cuda") :]
        if index and not (index.startswith(":") and index[1:].isdigit()):
            raise DeviceError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}); use cpu")
        if index and int(index[1:]) >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("device 'mps': not available here; use cpu")
        return torch.device("mps")
    raise DeviceError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")


def show_bar(progress: bool) -> bool:
    """Whether to draw a progress bar: asked for, and stderr is a terminal (a bar redirected to a
    file writes a line per refresh: megabytes of log). SERTOOL_PROGRESS=1 forces bars, 0 hides them."""
    forced = os.environ.get("SERTOOL_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return progress and forced == "1"
    try:
        return progress and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
