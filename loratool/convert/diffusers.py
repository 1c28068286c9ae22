"""diffusers LoRA files: PEFT-style keys in one safetensors file, config in the header.

``save_lora_weights`` writes keys ``<component>.<module>.lora_A.weight`` (component ``unet``,
``transformer``, ``text_encoder``...) and, since diffusers 0.34, the LoRA config as JSON under
``__metadata__["lora_adapter_metadata"]``: either one PEFT config (``save_lora_adapter``) or
per-component fields flattened as ``"<component>.<field>"``. Without that key diffusers takes
the rank from the shapes and alpha = rank (scale 1) unless ``<module>.alpha`` tensors say
otherwise; loratool does the same and says so in the provenance notes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter
from ..errors import FormatError
from . import naming
from ._st import StFile, open_st
from .peft_config import KEY_PREFIX, check_config
from .peft_keys import build_targets, group_keys, refuse_extras

if TYPE_CHECKING:
    from ..sources import Opened

FORMAT = "diffusers"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_LEGACY = (".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight")


def _configs(text: str, where: str) -> dict[str, dict[str, Any]]:
    """component ("" for a single unprefixed config) -> checked PEFT config."""
    from ..format import strict_loads

    doc = strict_loads(text, code="bad-config", what=f"'{METADATA_KEY}'", where=where)
    if not isinstance(doc, dict):
        raise FormatError(f"'{METADATA_KEY}' is not a JSON object", code="bad-config", where=where)
    if any(k in doc for k in ("r", "lora_alpha", "peft_type", "target_modules")):
        groups: dict[str, dict[str, Any]] = {"": dict(doc)}
    else:
        groups = {}
        for key, value in doc.items():
            component, dot, fieldname = key.partition(".")
            if not dot:
                raise FormatError(
                    f"'{METADATA_KEY}' key {key!r} is neither a config field nor "
                    "'<component>.<field>'",
                    code="bad-config",
                    where=where,
                )
            groups.setdefault(component, {})[fieldname] = value
    out = {}
    for component, cfg in groups.items():
        cfg.setdefault("peft_type", "LORA")  # the key itself says LoRA; older writers omit it
        out[component] = check_config(
            cfg, f"{where} [{METADATA_KEY}{'.' + component if component else ''}]"
        )
    return out


def read_diffusers_file(st: StFile) -> Adapter:
    where = st.path
    g = group_keys(st.tensors, prefix=KEY_PREFIX)
    text = st.metadata.get(METADATA_KEY)
    configs = _configs(text, where) if text is not None else None
    single = configs.get("") if configs else None
    refuse_extras(g, single, where)
    notes: list[str] = []
    if configs is None and any(k.startswith(KEY_PREFIX) for k in st.tensors):
        raise FormatError(
            "PEFT adapter weights without their adapter_config.json",
            code="missing-config",
            where=where,
            hint="put the file back in its PEFT folder next to adapter_config.json "
            "(it holds r and lora_alpha, so the scale is unknown without it)",
        )

    def config_for(module: str) -> tuple[Mapping[str, Any] | None, str]:
        if configs is None:
            return None, module
        if single is not None:
            return single, module
        component, _, rest = module.partition(".")
        if component not in configs or not rest:
            raise FormatError(
                f"module '{module}' belongs to no component in '{METADATA_KEY}' "
                f"({', '.join(sorted(configs))})",
                code="config-mismatch",
                where=where,
            )
        return configs[component], rest

    targets = build_targets(st, g, config_for=config_for, where=where, notes=notes)
    if configs is None:
        notes.append(
            f"no '{METADATA_KEY}' in the header: alpha = rank (scale 1) for modules without an "
            ".alpha tensor, as diffusers assumes"
        )
    source: dict[str, Any] = {"format": FORMAT, "config_in_header": configs is not None}
    components = sorted({m.partition(".")[0] for m in g.factors if "." in m})
    if configs and single is None:
        source["components"] = sorted(configs)
    elif components:
        source["components"] = components
    hub_id = None
    if configs:
        for cfg in configs.values():
            for key in ("peft_version", "base_model_name_or_path"):
                if cfg.get(key) is not None and key not in source:
                    source[key] = cfg[key]
        named = [c.get("base_model_name_or_path") for c in configs.values()]
        if len(set(named)) == 1 and naming.is_hub_id(named[0]):
            hub_id = named[0]
    if g.base_copies:
        source["embedding_copies"] = dict(sorted(g.base_copies.items()))
        notes.append("dropped the copy of the base embedding saved with embedding targets")
    if notes:
        source["notes"] = notes
    adapter = Adapter.from_targets(targets.values(), hub_id=hub_id, provenance={"source": source})
    adapter.path = where
    return adapter


def looks_like_diffusers(st: StFile) -> bool:
    return any(
        k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"))
        for k in st.tensors
    )


def read_diffusers(path: str) -> Adapter:
    st = open_st(path)
    if not looks_like_diffusers(st):
        raise FormatError(
            "no PEFT-style lora_A/lora_B keys: not a diffusers LoRA file",
            code="not-diffusers",
            where=path,
        )
    return read_diffusers_file(st)


def open_diffusers(path: str) -> Opened | None:
    """``sources.READERS`` entry: a single safetensors file with PEFT-style keys."""
    from ..sources import Opened

    p = Path(path)
    if not p.is_file():
        return None
    st = open_st(p)
    if not looks_like_diffusers(st):
        if any(k.endswith(_LEGACY) for k in st.tensors):
            raise FormatError(
                "this is a diffusers LoRA in the pre-PEFT attention-processor layout "
                "('.lora.down.weight' keys), which loratool does not read",
                code="unsupported-format",
                where=path,
                hint="load it with a current diffusers (load_lora_weights) and save_lora_weights "
                "it again: that writes PEFT-style keys",
            )
        return None
    return Opened(read_diffusers_file(st), FORMAT, path, st.file_bytes)
