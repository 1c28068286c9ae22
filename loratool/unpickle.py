"""Opt-in reading of old pickled weights (``adapter_model.bin``, kohya ``.pt``/``.ckpt``), restricted.

Loading a pickle can run any code its author chose, so loratool refuses pickles unless the user
passes ``--allow-pickle``; even then nothing but tensors, their storages and plain containers is
accepted. The unpickling itself is PyTorch's ``weights_only=True`` loader, an allowlist unpickler
(``torch._weights_only_unpickler``) that resolves no global outside tensor rebuilding and plain
types: a ``__reduce__`` naming ``os.system``, ``builtins.eval``, ``subprocess.Popen`` or any
other callable is refused before it is called. Around it we add what it does not check:

- only the zip container ``torch.save`` has written since PyTorch 1.6 (2020); the older raw
  stream is refused unread, since its storages are sized by the stream itself;
- the zip is inspected first with ``zipfile``: stored (uncompressed) records only, at most
  ``limits.max_pickle_records()`` of them, summing to no more than the file (no zip bomb), one
  ``data.pkl`` under ``limits.max_json_bytes()`` (the pickle program, not the tensor data);
- the result must be a mapping of names to tensors (optionally under ``state_dict``), at most
  ``limits.max_targets()`` × 8 of them; non-tensor scalars (kohya's ``epoch``) are dropped.

Every failure is a ``FormatError``: ``pickle-refused`` for a forbidden global, ``bad-pickle``
for a broken or unexpected file. ``convert`` then writes safetensors, so a pickle is read once.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import limits
from .errors import FormatError

if TYPE_CHECKING:
    import torch

PICKLE_HINT = "pass --allow-pickle to read it with a restricted unpickler (tensors only), or find a safetensors copy"


def _bad(message: str, where: str, *, code: str = "bad-pickle") -> FormatError:
    return FormatError(
        message,
        code=code,
        where=where,
        hint="re-save it with safetensors (save_file / save_pretrained(safe_serialization=True))",
    )


def _check_zip(path: Path) -> None:
    """Refuse a non-zip or a zip that would expand beyond the file, before any unpickling."""
    where = str(path)
    size = path.stat().st_size
    limits.check_adapter_bytes(size, what="pickled weights", where=where)
    if not zipfile.is_zipfile(path):
        raise _bad("not a torch zip archive (the pre-1.6 raw pickle format is never read)", where)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise _bad(f"unreadable zip archive ({e})", where) from None
    if len(infos) > limits.max_pickle_records():
        raise _bad(f"{len(infos)} records in the archive", where)
    total = 0
    pkl = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED:
            raise _bad(f"record '{i.filename}' is compressed (torch.save never does that)", where)
        total += i.file_size
    if total > size:
        raise _bad(f"records claim {total} bytes in a {size}-byte file", where)
    if len(pkl) != 1:
        raise _bad(f"{len(pkl)} data.pkl records (expected one)", where)
    limits.check_json_bytes(pkl[0].file_size, what="data.pkl", where=where)


def load_pickled_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors by name from a ``torch.save`` file, through the allowlist unpickler only."""
    import torch

    p = Path(path)
    where = str(p)
    _check_zip(p)
    try:
        # mmap: tensor data stays in the file (no copy of a multi-GB archive into memory), and
        # a storage that claims more bytes than its record fails instead of allocating.
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0])
        raise FormatError(
            f"refused to unpickle: {detail.strip()[:300]}",
            code="pickle-refused",
            where=where,
            hint="the file asks to run code that is not tensor rebuilding; do not load it anywhere",
        ) from None
    except Exception as e:  # torch raises RuntimeError, ValueError, EOFError... on a corrupt file
        raise _bad(f"unreadable pickle ({type(e).__name__}: {str(e)[:200]})", where) from None
    return _tensors_of(obj, where)


def _tensors_of(obj: Any, where: str) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise _bad(f"holds a {type(obj).__name__}, not a mapping of names to tensors", where)
    cap = limits.max_targets() * 8
    if len(obj) > cap:
        raise _bad(f"{len(obj)} entries (more than {cap})", where)
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise _bad(f"key {k!r} is not a string", where)
        if isinstance(v, torch.Tensor):
            if v.is_sparse or v.layout != torch.strided:
                raise _bad(f"tensor '{k}' is not a dense tensor", where)
            out[k] = v
        elif isinstance(v, int | float | str | bool) or v is None:
            continue  # training metadata beside the weights (epoch, global_step)
        else:
            raise _bad(f"entry '{k}' is a {type(v).__name__}, not a tensor", where)
    if not out:
        raise _bad("no tensors in the file", where)
    return out
