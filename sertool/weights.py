"""Reading tensors that others may have written: safetensors only, never pickle.

`load_tensors` turns every way a file can be wrong (a pickle renamed to .safetensors, a
truncated download, a missing file) into one `WeightsError` naming the file, instead of a
library traceback; nothing in a weights file is ever executed.
"""

from __future__ import annotations

import os

import torch


class WeightsError(ValueError):
    """A weights or statistics file that cannot be read as safetensors."""


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: file does not exist")
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(
            f"{path}: not a readable safetensors file, it may be truncated, corrupt or not "
            f"safetensors at all ({' '.join(str(e).split())[:200]})"
        ) from None
