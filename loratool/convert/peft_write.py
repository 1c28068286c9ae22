"""Write PEFT LoRA directories that PEFT loads, with each target's exact scale.

Writing emits only config fields PEFT has accepted since 0.7, so older PEFT versions load the
directory too (new fields break them: peft #1979, #2275), and a model card whose ``base_model``
is a Hub id or absent, never a local path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import constants as C
from .. import kinds
from ..adapter import Adapter
from . import naming
from ._st import json_text
from .peft_config import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def peft_config(
    adapter: Adapter, *, base_model: str | None = None, task_type: str | None = None
) -> dict[str, Any]:
    """The adapter_config.json that makes PEFT compute each target's exact scale.

    One ``use_rslora`` for the file (the rule most targets use; the others get the alpha that
    gives their scale under it), ``r``/``lora_alpha`` the most common values, and
    ``rank_pattern``/``alpha_pattern`` for the rest (naming.suffix_patterns). ``target_modules``
    lists full module paths, so PEFT adds LoRA to exactly these modules and no others.
    """
    from ..adapter import alpha_for

    ts = [t for t in adapter.targets.values() if t.lowrank]  # 1.1 whole tensors: below
    n_rs = sum(t.scale_rule == C.SCALE_RSLORA for t in ts)
    rule = C.SCALE_RSLORA if n_rs * 2 > len(ts) else C.SCALE_STANDARD
    alphas = {
        t.name: t.alpha if t.scale_rule == rule else alpha_for(t.scale, t.rank, rule) for t in ts
    }
    ranks = {t.name: t.rank for t in ts}
    r = naming.most_common(ranks.values())
    lora_alpha = naming.most_common(alphas.values())
    used = {kinds.get(t.kind) for t in ts}
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "revision": adapter.binding().revision,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _plain(lora_alpha),
        "target_modules": sorted(t.name for t in ts),
        "rank_pattern": naming.suffix_patterns(ranks, r),
        "alpha_pattern": {
            k: _plain(v) for k, v in naming.suffix_patterns(alphas, lora_alpha).items()
        },
        "lora_dropout": 0.0,
        "fan_in_fan_out": any(k.transposed and k.dense for k in used),  # PEFT: Conv1D layers
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    if rule == C.SCALE_RSLORA:
        cfg["use_rslora"] = True  # written only when set: PEFT < 0.7 has no such field
    from .peft_features import config_extras

    config_extras(adapter, cfg)  # spec 1.1 features: use_dora, modules_to_save, ...
    return cfg


def _infer_task_type(adapter: Adapter) -> str | None:
    source = adapter.provenance.get("source")
    if isinstance(source, dict) and isinstance(source.get("task_type"), str):
        return str(source["task_type"])
    return None


def model_card(adapter: Adapter, cfg: Mapping[str, Any]) -> str:
    """A README.md for the folder: YAML front matter PEFT and the Hub read, then usage."""
    from .. import __version__

    binding = adapter.binding()
    named = cfg.get("base_model_name_or_path")
    hub_id = named if naming.is_hub_id(named) else None
    lines = ["---"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    lines.append("library_name: peft")
    if cfg.get("task_type") == "CAUSAL_LM":
        lines.append("pipeline_tag: text-generation")
    lines.append("tags:")
    if hub_id:
        lines.append(f"- base_model:adapter:{hub_id}")
    lines += ["- lora", "- loratool", "---", ""]
    ranks = sorted({t.rank for t in adapter.targets.values()})
    dtypes = ", ".join(C.DTYPE_NAMES[d] for d in adapter.dtypes)
    source = adapter.provenance.get("source")
    origin = source.get("format") if isinstance(source, dict) else None
    lines += [
        "# LoRA adapter",
        "",
        f"Written by loratool {__version__}"
        + (f" from a {origin} adapter" if origin else "")
        + f": {len(adapter.targets)} modules, rank {'/'.join(map(str, ranks))}, "
        f"{adapter.total_params:,} parameters ({dtypes}).",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{hub_id or "<base model>"}")',
        'model = PeftModel.from_pretrained(base, "<this folder or repo>")',
        "```",
        "",
        f"Base fingerprint (loratool spec §4.3): `{binding.fingerprint}`.",
        "",
    ]
    return "\n".join(lines)


def write_peft(
    adapter: Adapter,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    base_model: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write adapter_config.json, adapter_model.safetensors and README.md, atomically.

    ``base_model_name_or_path`` is ``base_model`` when given, else the binding's Hub id; the
    card names a base only when that is a Hub id, never a local path. Factors keep their dtype (cast the adapter first to change it).
    """
    from .._io import atomic_dir, check_output
    from ._st import st_bytes

    check_output(out_dir, force=force)
    base_id = base_model or adapter.binding().hub_id
    cfg = peft_config(adapter, base_model=base_id, task_type=task_type or _infer_task_type(adapter))
    tensors = {}
    for t in adapter.targets.values():
        if not t.lowrank:
            continue
        a_name, b_name = kinds.get(t.kind).peft_names
        tensors[f"{KEY_PREFIX}{t.name}.{a_name}"] = t.lora_A
        tensors[f"{KEY_PREFIX}{t.name}.{b_name}"] = t.lora_B
    from .peft_features import peft_tensors

    tensors.update(peft_tensors(adapter))
    blob = st_bytes(tensors, {"format": "pt"})
    with atomic_dir(out_dir, force=force) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(blob)
        (tmp / CONFIG_NAME).write_text(json_text(cfg), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(adapter, cfg), encoding="utf-8")
    return Path(out_dir)
