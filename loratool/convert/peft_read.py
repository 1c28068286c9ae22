"""Read PEFT LoRA directories with PEFT's exact semantics.

Reading honours what ``peft.PeftModel.from_pretrained`` computes for each module (see
``peft_keys``); ``locate`` finds the folder from what the user pointed at (the folder, one of
its files, a Hub cache repo or snapshot, a folder with one adapter sub-folder). Pickled weights
are refused, never opened.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter
from ..errors import FormatError
from . import naming
from ._st import open_st, read_json
from .peft_config import CONFIG_NAME, FORMAT, PICKLE_NAMES, WEIGHTS_NAME, check_config
from .peft_features import attach, take_extras
from .peft_keys import build_targets, group_keys, refuse_extras

if TYPE_CHECKING:
    from ..sources import Opened


def _hub_snapshot(p: Path) -> tuple[Path, dict[str, str]] | None:
    """A Hugging Face cache repo (``models--ns--name``) or its ``snapshots`` folder → one snapshot."""
    info: dict[str, str] = {}
    repo = p
    if p.name == "snapshots":
        repo = p.parent
    if not repo.name.startswith("models--") or not (repo / "snapshots").is_dir():
        return None
    info["repo_id"] = "/".join(repo.name[len("models--") :].split("--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    rev = None
    if ref.is_file():
        with open(ref, "rb") as f:
            text = f.read(100).decode("ascii", errors="replace").strip()
        if re.fullmatch(r"[0-9a-f]{40}", text) and (snapshots / text).is_dir():
            rev = text
    if rev is None:
        found = sorted(d.name for d in snapshots.iterdir() if d.is_dir())
        if len(found) != 1:
            raise FormatError(
                f"Hub cache folder has {len(found)} snapshots and no usable refs/main",
                code="ambiguous-adapter",
                where=str(p),
                hint="pass the snapshot folder itself: .../snapshots/<revision>",
            )
        rev = found[0]
    info["revision"] = rev
    return snapshots / rev, info


def _has_peft_files(d: Path) -> bool:
    return any((d / n).exists() for n in (CONFIG_NAME, WEIGHTS_NAME, *PICKLE_NAMES))


def locate(path: str | os.PathLike[str]) -> tuple[Path, dict[str, str]] | None:
    """The PEFT adapter folder ``path`` points at, and Hub cache info; None if not PEFT-shaped.

    Accepts the folder, its ``adapter_config.json`` or ``adapter_model.safetensors``, a Hub cache
    repo or snapshot, and a folder holding exactly one adapter sub-folder (what
    ``save_pretrained`` writes for a non-default adapter name).
    """
    p = Path(path)
    if p.is_file():
        if p.name in (CONFIG_NAME, WEIGHTS_NAME, *PICKLE_NAMES):
            return p.parent, {}
        return None
    if not p.is_dir():
        return None
    if _has_peft_files(p):
        return p, {}
    snap = _hub_snapshot(p)
    if snap is not None:
        return snap
    subs = sorted(d for d in p.iterdir() if d.is_dir() and (d / CONFIG_NAME).is_file())
    if len(subs) == 1:
        return subs[0], {"subfolder": subs[0].name}
    if len(subs) > 1:
        raise FormatError(
            f"folder holds {len(subs)} PEFT adapters: {', '.join(d.name for d in subs[:6])}",
            code="ambiguous-adapter",
            where=str(p),
            hint="pass the adapter's own folder",
        )
    return None


def _weights_path(folder: Path) -> Path:
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        return weights
    pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
    if pickles:
        raise FormatError(
            f"the adapter weights are a pickle ({pickles[0]}); loratool never unpickles, "
            "since loading a pickle can run code",
            code="pickle",
            where=str(folder / pickles[0]),
            hint="load it once in PEFT and save_pretrained(dir) (safetensors is the default), "
            "then convert that",
        )
    raise FormatError(
        f"no {WEIGHTS_NAME} in the adapter folder",
        code="missing-weights",
        where=str(folder),
    )


def _source_info(cfg: Mapping[str, Any], hub: Mapping[str, str]) -> dict[str, Any]:
    info: dict[str, Any] = {"format": FORMAT}
    for key in (
        "peft_type",
        "peft_version",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "r",
        "lora_alpha",
        "use_rslora",
        "fan_in_fan_out",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "init_lora_weights",
    ):
        value = cfg.get(key)
        if isinstance(value, set):
            value = sorted(value)
        if value not in (None, {}, [], False) or key in ("r", "lora_alpha"):
            info[key] = value
    if hub:
        info["hub"] = dict(hub)
    return info


def read_peft_folder(folder: Path, hub: Mapping[str, str] | None = None) -> tuple[Adapter, int]:
    """The adapter in a PEFT folder, and the bytes its two files take."""
    where = str(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FormatError(
            f"no {CONFIG_NAME} next to the adapter weights",
            code="missing-config",
            where=where,
            hint="a PEFT adapter needs its adapter_config.json (it holds r and lora_alpha, "
            "so the scale is unknown without it)",
        )
    raw = read_json(config_path, what=CONFIG_NAME)
    if isinstance(raw, dict) and raw.get("peft_type") in ("LOHA", "LOKR"):
        from .peft_lycoris import read_peft_lycoris

        return read_peft_lycoris(folder, raw, hub or {})
    cfg = check_config(raw, str(config_path))
    weights = _weights_path(folder)
    st = open_st(weights)
    g = group_keys(st.tensors)
    extras = take_extras(g, cfg)  # spec 1.1: DoRA, LoRA biases, modules_to_save, tokens
    refuse_extras(g, cfg, str(weights))
    notes: list[str] = []
    targets = build_targets(
        st, g, config_for=lambda module: (cfg, module), where=str(weights), notes=notes
    )
    targets = attach(st, extras, targets, cfg, str(weights))
    if g.base_copies:
        notes.append(
            "dropped the copy of the base embedding PEFT saves with embedding targets ("
            + ", ".join(sorted(g.base_copies.values()))
            + ")"
        )
    source = _source_info(cfg, hub or {})
    if g.base_copies:
        source["embedding_copies"] = dict(sorted(g.base_copies.items()))
    if notes:
        source["notes"] = notes
    base_id = cfg.get("base_model_name_or_path")
    revision = cfg.get("revision")
    adapter = Adapter.from_targets(
        targets.values(),
        hub_id=base_id if naming.is_hub_id(base_id) else None,
        revision=revision if isinstance(revision, str) and revision else None,
        provenance={"source": source},
    )
    adapter.path = where
    return adapter, config_path.stat().st_size + st.file_bytes


def read_peft(path: str | os.PathLike[str]) -> Adapter:
    """A PEFT adapter folder (or its config/weights file, or a Hub cache layout) as an Adapter."""
    found = locate(path)
    if found is None:
        raise FormatError(
            f"not a PEFT adapter (no {CONFIG_NAME} or {WEIGHTS_NAME})",
            code="not-peft",
            where=os.fspath(path),
        )
    return read_peft_folder(*found)[0]


def open_peft(path: str) -> Opened | None:
    """``sources.READERS`` entry: a PEFT folder, or None when ``path`` is not PEFT-shaped."""
    from ..sources import Opened

    found = locate(path)
    if found is None:
        return None
    adapter, size = read_peft_folder(*found)
    return Opened(adapter, FORMAT, path, size)
