"""``--allow-pickle``: stage old pickled weights as safetensors, so every reader stays pickle-free.

A PEFT folder with only ``adapter_model.bin`` (or ``.pt``/``.pth``), or a kohya ``.pt``/
``.ckpt``/``.bin`` file, is unpickled once by ``loratool.unpickle`` (tensors, storages and plain
containers only) into a private temporary folder as ``adapter_model.safetensors`` (beside a copy
of the config) or ``NAME.safetensors``; the ordinary readers then open that, and ``convert``
writes its safetensors output from it. Nothing is staged for a path that holds no pickle.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..format import is_pickle
from .peft_config import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME

if TYPE_CHECKING:
    import torch


def _save(tensors: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    # clone: a pickle may tie tensors to one storage, which safetensors refuses to write
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, out)


def holds_pickle(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    if p.is_dir():
        return not (p / WEIGHTS_NAME).exists() and any((p / n).is_file() for n in PICKLE_NAMES)
    return p.is_file() and is_pickle(p)


@contextlib.contextmanager
def staged(path: str | os.PathLike[str]) -> Iterator[str]:
    """``path`` itself, or (for pickled weights) a temporary safetensors twin of it."""
    from ..unpickle import load_pickled_tensors

    p = Path(path)
    if not holds_pickle(p):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="loratool-unpickled-") as d:
        tmp = Path(d)
        if p.is_dir():
            weights = next(p / n for n in PICKLE_NAMES if (p / n).is_file())
            if (p / CONFIG_NAME).is_file():
                shutil.copyfile(p / CONFIG_NAME, tmp / CONFIG_NAME)
            _save(load_pickled_tensors(weights), tmp / WEIGHTS_NAME)
            yield d
        else:
            out = tmp / (p.stem + ".safetensors")
            _save(load_pickled_tensors(p), out)
            yield os.fspath(out)
