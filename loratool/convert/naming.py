"""Module names across formats: PEFT's key matching, rank/alpha pattern building, kohya names.

PEFT semantics mirrored here (peft 0.21, ``peft.utils.other`` and ``peft.tuners.tuners_utils``):

- ``get_pattern_key``: the first key of ``rank_pattern``/``alpha_pattern`` (dict order) for which
  ``re.match(rf"(.*\\.)?({key})$", module)`` succeeds; a module no key matches keeps the global
  ``r``/``lora_alpha``.
- ``target_modules``: a string is a regex that must ``re.fullmatch`` the module name (except the
  ``"all-linear"`` shorthand); a list selects a module whose name equals an entry or ends with
  ``"." + entry``, filtered by ``layers_to_transform``/``layers_pattern``; ``exclude_modules`` and
  ``modules_to_save`` win over both.

kohya names are ``<prefix><module path with every '.' turned into '_'>``; the mapping back is not
injective (``self_attn`` has an underscore of its own), so it is resolved against a base
checkpoint's weight names, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import CompatibilityError

V = TypeVar("V", bound=Hashable)

ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND

# A Hub repo id as huggingface_hub validates it: "name" or "namespace/name", word characters,
# '-' and '.', no '--' or '..', at most 96 characters.
_HUB_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")


def is_hub_id(value: object) -> bool:
    """True for strings that are a Hub repo id and not a local path."""
    if not isinstance(value, str) or not value or len(value) > 96:
        return False
    if not _HUB_ID.match(value) or "--" in value or ".." in value:
        return False
    return not value.startswith((".", "-", "/")) and not value.endswith((".", "-"))


def check_pattern(pattern: str, *, what: str, where: str) -> re.Pattern[str]:
    """Compile a regex from an adapter config, refusing ones too long or prone to blow up.

    ``limits.safe_regex`` decides (no repeated group holding a repetition or a choice, few
    unbounded repetitions, no back-references, bounded length); ``what`` names the field.
    """
    from ..limits import safe_regex

    return safe_regex(pattern, what=what, where=where)


def composite_patterns(key: str, value: str) -> list[str]:
    """The regexes PEFT builds around a config string (``value`` inside a larger pattern)."""
    if key in ("rank_pattern", "alpha_pattern"):
        return [rf"(.*\.)?({value})$"]
    if key == "modules_to_save":
        return [rf"(^|.*\.){value}($|\..*)"]
    if key == "layers_pattern":
        return [rf"(?:^|.*?\.){value}\.(?P<idx>\d+)\."]
    return [value]


def get_pattern_key(pattern_keys: Iterable[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern that matches ``module``, or None."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The per-module value PEFT takes from ``rank_pattern``/``alpha_pattern``."""
    key = get_pattern_key(patterns.keys(), module)
    return default if key is None else patterns[key]


def _layer_index(key: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pat in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def target_selected(config: Mapping[str, Any], key: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a saved config.

    "all-linear" needs the model's layer types, so every key counts as selected there (which
    is as much as can be checked without the model).
    """
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    saved = config.get("modules_to_save") or ()
    for m in [saved] if isinstance(saved, str) else saved:  # a lone string is one name
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return True
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    using_layers = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
    if found and using_layers:
        idx = _layer_index(key, config.get("layers_pattern"))
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in (layers or ())
    return found


def _suffix_matches(suffix: str, name: str) -> bool:
    """How a literal (escaped) pattern key matches under PEFT's ``(.*\\.)?(key)$``."""
    return name == suffix or name.endswith("." + suffix)


def most_common(values: Iterable[V]) -> V:
    """The value seen most often; ties go to the smallest, so the choice is deterministic."""
    counts: dict[V, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return min(counts, key=lambda v: (-counts[v], v))


def suffix_patterns(values: Mapping[str, V], default: V) -> dict[str, V]:
    """Pattern keys for ``rank_pattern``/``alpha_pattern`` that give every name its value.

    For each name whose value differs from ``default``, the shortest dotted suffix whose matches
    (among ``values``' names, which must be exactly the modules that get LoRA) all share that
    value. Keys are escaped regexes, so ``.`` is literal; since every key only matches names of
    one value, PEFT's first-match order cannot change the outcome. Shorter suffixes also keep
    the config readable by PEFT before 0.14, whose rule ``.*\\.{key}$`` needs a leading dot.
    """
    names = sorted(values)
    out: dict[str, V] = {}
    for name in names:
        value = values[name]
        if value == default:
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            if k < len(parts) and parts[-k].isdigit():
                continue  # "layers.0.q_proj", not "0.q_proj": same matches, easier to read
            suffix = ".".join(parts[-k:])
            if all(values[n] == value for n in names if _suffix_matches(suffix, n)):
                out[re.escape(suffix)] = value
                break
    return out


# -- kohya ---------------------------------------------------------------------------------------

# kohya sd-scripts' prefixes (networks/lora*.py): "lora_unet" for the main network of every model
# family it trains (UNet, SD3/Flux/Lumina DiTs), "lora_te"/"lora_te1..3" for text encoders.
KOHYA_PREFIXES = (
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lora_te_",
    "lora_transformer_",
    "lora_",
)
KOHYA_DEFAULT_PREFIX = "lora_unet_"
# diffusers pipeline components -> kohya prefix (diffusers' own kohya conversion uses these).
_COMPONENT_PREFIX = {
    "unet": "lora_unet_",
    "transformer": "lora_unet_",
    "text_encoder": "lora_te_",
    "text_encoder_2": "lora_te2_",
    "text_encoder_3": "lora_te3_",
}
_KOHYA_NAME = re.compile(r"^lora_[A-Za-z0-9_]+$")


def is_kohya_name(name: str) -> bool:
    return bool(_KOHYA_NAME.match(name))


def kohya_name(module: str, *, prefix: str | None = None, te_count: int = 1) -> str:
    """The kohya name of a module path (a kohya name is kept as it is).

    A diffusers component prefix picks kohya's prefix (``unet.`` → ``lora_unet_``,
    ``text_encoder.`` → ``lora_te_``, or ``lora_te1_`` when a second text encoder is present);
    any other module path gets ``prefix`` (default ``lora_unet_``, kohya's prefix for the main
    network of every architecture it supports).
    """
    if is_kohya_name(module):
        return module
    head, _, rest = module.partition(".")
    if prefix is None and rest and head in _COMPONENT_PREFIX:
        p = _COMPONENT_PREFIX[head]
        if head == "text_encoder" and te_count > 1:
            p = "lora_te1_"
        return p + rest.replace(".", "_")
    return (prefix or KOHYA_DEFAULT_PREFIX) + module.replace(".", "_")


def kohya_consistent(kohya: str, module: str) -> bool:
    """Whether ``kohya`` is a kohya name of ``module`` under some known prefix."""
    head, _, rest = module.partition(".")
    unders = [module.replace(".", "_")]
    if head in _COMPONENT_PREFIX and rest:
        unders.append(rest.replace(".", "_"))
    return any(kohya == p + u for p in KOHYA_PREFIXES for u in unders)


def kohya_index(modules: Iterable[str]) -> dict[str, list[str]]:
    """underscored module path -> the module paths that underscore to it."""
    index: dict[str, list[str]] = {}
    for m in modules:
        index.setdefault(m.replace(".", "_"), []).append(m)
    return index


def resolve_kohya(name: str, index: Mapping[str, list[str]], *, where: str) -> str:
    """The base module a kohya name stands for, matched against the base's weight names.

    Tries each known prefix (longest first): an exact underscored match, then a unique base
    module whose underscored path ends with ``_<rest>`` (a base that wraps the model in one more
    prefix). Ambiguity is an error, never a guess.
    """
    tried: list[str] = []
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        tried.append(rest)
        hit = _only_hit(name, sorted(index.get(rest, [])), where=where)
        if hit is not None:
            return hit
    for rest in tried:
        hits = sorted({m for u, ms in index.items() if u.endswith("_" + rest) for m in ms})
        hit = _only_hit(name, hits, where=where, shown=4)
        if hit is not None:
            return hit
    raise CompatibilityError(
        f"kohya module '{name}' matches no weight in the base",
        code="missing-module",
        where=where,
        hint="is this the base model the adapter was trained on?",
    )


def _only_hit(name: str, hits: list[str], *, where: str, shown: int | None = None) -> str | None:
    """The one base module ``hits`` holds, None for none; several is an error (``shown`` named)."""
    if len(hits) > 1:
        raise CompatibilityError(
            f"kohya module '{name}' matches several base modules: {', '.join(hits[:shown])}",
            code="ambiguous-module",
            where=where,
        )
    return hits[0] if hits else None
