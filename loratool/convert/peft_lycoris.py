"""PEFT LoHa and LoKr adapter folders (``peft_type`` ``LOHA``/``LOKR``), read and written.

The tensors are LyCORIS' (``base_model.model.<module>.hada_w1_a`` …, ``lokr_w1`` …, no
``.weight``), the config PEFT's ``LoHaConfig``/``LoKrConfig``: ``r``, ``alpha``,
``rank_pattern``, ``alpha_pattern`` and ``scaling = alpha / r`` for every module — unlike
LyCORIS, PEFT keeps alpha/r even when both LoKr sides are full matrices, so the rank of such a
target is the config's r. Shapes come from the tensors (convert/lycoris.py builds the targets);
writing gives every module its exact scale through the patterns, and keeps the layout fields
PEFT rebuilds the layers from (``decompose_both``, ``decompose_factor``,
``use_effective_conv2d``) from the source when it was PEFT.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import constants as C
from ..adapter import Adapter, Target
from ..errors import FormatError, UsageError
from . import lycoris, naming
from ._st import json_text, open_st
from .peft_config import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME

PEFT_TYPES = {"LOHA": "loha", "LOKR": "lokr"}
FORMAT = "peft"
_LAYOUT = ("decompose_both", "decompose_factor", "use_effective_conv2d", "rank_dropout_scale")


def _number(cfg: Mapping[str, Any], key: str, where: str) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FormatError(f"config field {key!r} must be a number", code="bad-config", where=where)
    return float(v)


def read_peft_lycoris(
    folder: Path, cfg: Mapping[str, Any], hub: Mapping[str, str]
) -> tuple[Adapter, int]:
    """A PEFT LoHa/LoKr folder as an Adapter (and the bytes its files take)."""
    where = str(folder / CONFIG_NAME)
    kind = PEFT_TYPES[str(cfg["peft_type"])]
    r, alpha = _number(cfg, "r", where), _number(cfg, "alpha", where)
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise FormatError(f"{key} must be an object", code="bad-config", where=where)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FormatError(
            f"no {WEIGHTS_NAME} in the adapter folder", code="missing-weights", where=str(folder)
        )
    st = open_st(weights)
    names = lycoris.HADA if kind == "loha" else lycoris.LOKR
    modules: dict[str, dict[str, str]] = {}
    for key in st.tensors:
        body = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
        module, _, part = body.rpartition(".")
        if part not in names or not module:
            raise FormatError(
                f"unexpected tensor '{key}' in a PEFT {cfg['peft_type']} adapter",
                code="unexpected-tensor",
                where=str(weights),
            )
        modules.setdefault(module, {})[part] = key
    if not modules or len(modules) > C.MAX_TARGETS:
        raise FormatError(f"{len(modules)} modules", code="no-targets", where=str(weights))
    targets: list[Target] = []
    for module in sorted(modules):
        t = lycoris.read_module(st, module, module, modules[module], None, str(weights))
        want_r = int(naming.pattern_value(cfg.get("rank_pattern") or {}, module, r))
        want_a = float(naming.pattern_value(cfg.get("alpha_pattern") or {}, module, alpha))
        full = not any(p.endswith(("_a", "_b")) for p in t.parts())
        if not full and t.rank != want_r:
            raise FormatError(
                f"module '{module}' has rank {t.rank} in the tensors but the config gives r={want_r}",
                code="config-mismatch",
                where=where,
            )
        targets.append(t.replace(rank=want_r, alpha=want_a))
    source: dict[str, Any] = {"format": FORMAT, "peft_type": cfg["peft_type"], "r": cfg["r"]}
    source.update({k: cfg[k] for k in ("alpha", "peft_version", *_LAYOUT) if k in cfg})
    if hub:
        source["hub"] = dict(hub)
    base_id = cfg.get("base_model_name_or_path")
    adapter = Adapter.from_targets(
        targets,
        hub_id=base_id if naming.is_hub_id(base_id) else None,
        provenance={"source": source},
    )
    adapter.path = str(folder)
    return adapter, (folder / CONFIG_NAME).stat().st_size + st.file_bytes


def peft_lycoris_config(adapter: Adapter, *, base_model: str | None) -> dict[str, Any]:
    ts = list(adapter.targets.values())
    kinds_used = {t.kind for t in ts}
    if len(kinds_used) != 1 or next(iter(kinds_used)) not in ("loha", "lokr"):
        raise UsageError(
            f"a PEFT adapter has one type; this one mixes {', '.join(sorted(kinds_used))}",
            code="unsupported-kind",
            hint="convert --to kohya (LyCORIS files mix kinds) or reduce-rank to LoRA first",
        )
    kind = kinds_used.pop()
    bad = [t for t in ts if t.scale_rule != C.SCALE_STANDARD]
    if bad:
        raise UsageError(
            f"PEFT {kind} has no rsLoRA scale (target '{bad[0].name}')", code="unsupported-kind"
        )
    ranks = {t.name: t.rank for t in ts}
    alphas = {t.name: t.alpha for t in ts}
    r = naming.most_common(ranks.values())
    alpha = naming.most_common(alphas.values())
    source = adapter.provenance.get("source")
    cfg: dict[str, Any] = {
        "peft_type": kind.upper(),
        "task_type": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "r": r,
        "alpha": alpha,
        "rank_pattern": naming.suffix_patterns(ranks, r),
        "alpha_pattern": naming.suffix_patterns(alphas, alpha),
        "target_modules": sorted(ranks),
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "init_weights": True,
        "use_effective_conv2d": any(
            t.fields.get("tucker") or t.fields.get("lokr", {}).get("w2") == "tucker" for t in ts
        ),
    }
    if kind == "lokr":
        cfg["decompose_both"] = any(t.fields["lokr"]["w1"] == "factored" for t in ts)
        cfg["decompose_factor"] = -1
    if isinstance(source, dict) and source.get("peft_type") == kind.upper():
        cfg.update({k: source[k] for k in _LAYOUT if k in source})
    return cfg


def write_peft_lycoris(
    adapter: Adapter, out_dir: str | os.PathLike[str], *, force: bool = False
) -> Path:
    """adapter_config.json + adapter_model.safetensors of a PEFT LoHa/LoKr adapter, atomically."""
    from .._io import atomic_dir, check_output
    from ._st import st_bytes

    check_output(out_dir, force=force)
    cfg = peft_lycoris_config(adapter, base_model=adapter.binding().hub_id)
    tensors = {
        f"{KEY_PREFIX}{t.name}.{p}": t.part(p).contiguous()
        for t in adapter.targets.values()
        for p in t.parts()
    }
    with atomic_dir(out_dir, force=force) as tmp:
        (tmp / CONFIG_NAME).write_text(json_text(cfg))
        (tmp / WEIGHTS_NAME).write_bytes(st_bytes(tensors, {"format": "pt"}))
    return Path(out_dir)
