"""PEFT's extras as spec 1.1 features, both ways: DoRA, LoRA biases, modules_to_save, tokens.

PEFT 0.21 saves, beside ``lora_A``/``lora_B`` (keys after ``base_model.model.``):

* ``M.lora_magnitude_vector`` ``[out]`` with ``use_dora`` → feature ``dora`` (``M.magnitude``);
* ``M.lora_B.bias`` ``[out]`` with ``lora_bias`` → feature ``lora_bias``;
* ``M.weight``/``M.bias`` of each ``modules_to_save`` module → a ``full`` target (the trained
  copy replaces the module, exactly PEFT's ``ModulesToSaveWrapper``);
* ``M.token_adapter.trainable_tokens_delta`` ``[n, dim]`` with ``trainable_token_indices`` → a
  ``tokens`` target (the rows' new values; PEFT ``index_copy``s them). The vocabulary is not in
  the file: the target stays pending until ``complete`` binds it to a base (convert --base).

* trained base biases (``bias="lora_only"``/``"all"``): PEFT saves their values, ``M.base_layer.bias``
  for a LoRA module (feature ``bias``) and ``M.bias`` for any other (kind ``bias``). The spec
  stores the difference from the base's bias (§3.5), so these too stay pending until ``complete``
  subtracts the base's; writing them back adds it again (``BASE_BIAS``, kept from the base).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import constants as C
from ..adapter import Target
from ..errors import FormatError
from .peft_config import KEY_PREFIX
from .peft_keys import KeyGroups

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter
    from ..checkpoint import Checkpoint
    from ._st import StFile

PEFT_MAGNITUDE = ".lora_magnitude_vector"
PEFT_LORA_BIAS = ".lora_B.bias"
PEFT_TOKENS = ".token_adapter.trainable_tokens_delta"
PENDING = "pending"  # Target.fields key: why the target cannot be written yet (needs a base)
BIAS_VALUES = "bias_values"  # Target.fields key: the bias_delta part holds PEFT's values
BASE_BIAS = "base_bias"  # Target.fields key: the base's bias, for writing PEFT's values
PEFT_BASE_BIAS = ".base_layer.bias"
BIAS_PENDING = "PEFT stores trained bias values, the spec their difference from the base's: convert with --base"


@dataclass
class Extras:
    dora: dict[str, str] = field(default_factory=dict)  # module -> key
    lora_bias: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    saved: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> part -> key
    biases: dict[str, str] = field(default_factory=dict)  # module -> key of its trained bias


def _module(key: str, suffix: str) -> str:
    name = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
    return name[: -len(suffix)]


def _matches(module: str, names: Any) -> bool:
    """PEFT's rule for modules_to_save (utils/other.py ``_set_trainable``): a plain suffix match
    on the module path, so ``norm`` also selects ``input_layernorm``."""
    if isinstance(names, str):
        names = [names]
    return isinstance(names, list) and any(isinstance(n, str) and module.endswith(n) for n in names)


def take_extras(g: KeyGroups, cfg: Mapping[str, Any] | None) -> Extras:
    """Move the keys loratool 1.1 carries out of ``g`` (what stays is refused as before)."""
    ex = Extras()
    for key in list(g.dora):
        if key.endswith(PEFT_MAGNITUDE):
            ex.dora[_module(key, PEFT_MAGNITUDE)] = key
            g.dora.remove(key)
    for key in list(g.lora_bias):
        if key.endswith(PEFT_LORA_BIAS):
            ex.lora_bias[_module(key, PEFT_LORA_BIAS)] = key
            g.lora_bias.remove(key)
    for key in list(g.tokens):
        if key.endswith(PEFT_TOKENS):
            ex.tokens[_module(key, PEFT_TOKENS)] = key
            g.tokens.remove(key)
    saved = (cfg or {}).get("modules_to_save") or []
    for bucket in (g.other, g.bias):
        for key in list(bucket):
            for part in (C.PART_WEIGHT, C.PART_BIAS):
                if key.endswith("." + part) and _matches(_module(key, "." + part), saved):
                    ex.saved.setdefault(_module(key, "." + part), {})[part] = key
                    bucket.remove(key)
    if (cfg or {}).get("bias") in ("all", "lora_only"):
        for key in list(g.bias):
            cut = PEFT_BASE_BIAS if key.endswith(PEFT_BASE_BIAS) else ".bias"
            ex.biases[_module(key, cut)] = key
            g.bias.remove(key)
    return ex


def _indices(cfg: Mapping[str, Any] | None, module: str, where: str) -> list[int]:
    spec = (cfg or {}).get("trainable_token_indices")
    if isinstance(spec, dict):
        found = [v for k, v in spec.items() if module == k or module.endswith("." + k)]
        spec = found[0] if len(found) == 1 else None
    if not isinstance(spec, list) or not all(isinstance(i, int) for i in spec):
        raise FormatError(
            f"trainable tokens of '{module}' have no trainable_token_indices in the config",
            code="config-mismatch",
            where=where,
        )
    return list(spec)


def attach(
    st: StFile, ex: Extras, targets: dict[str, Target], cfg: Mapping[str, Any] | None, where: str
) -> dict[str, Target]:
    """The targets with their features, plus ``full`` and ``tokens`` targets (tensors read now:
    the PEFT factor loader knows only A and B)."""
    out = dict(targets)
    if cfg is not None:  # the flags and the tensors must agree, or PEFT computes something else
        for flag, found, what in (
            ("use_dora", ex.dora, "magnitude"),
            ("lora_bias", ex.lora_bias, "bias"),
        ):
            on = bool(cfg.get(flag))
            for module in sorted(targets):
                if on and module not in found:
                    raise FormatError(
                        f"{flag} is set but '{module}' has no LoRA {what} tensor",
                        code="missing-tensor",
                        where=where,
                    )
            if found and not on:
                raise FormatError(
                    f"'{next(iter(found))}' has a LoRA {what} tensor but the config does not set "
                    f"{flag}: PEFT would ignore it",
                    code="config-mismatch",
                    where=where,
                    hint="the config and the weights come from different adapters",
                )
    for module in sorted(set(ex.dora) | set(ex.lora_bias)):
        t = out.get(module)
        if t is None:
            raise FormatError(
                f"'{module}' has a DoRA magnitude or LoRA bias but no lora_A/lora_B",
                code="missing-tensor",
                where=where,
            )
        parts: dict[str, torch.Tensor] = {}
        if module in ex.dora:
            m = _read(st, ex.dora[module], t.dtype)
            # PEFT's Conv2d DoRA keeps the magnitude as [1, out, 1, 1] (DoraConv2dLayer)
            parts[C.PART_MAGNITUDE] = m.reshape(-1) if t.kind == C.KIND_CONV2D else m
        if module in ex.lora_bias:
            parts[C.PART_LORA_BIAS] = _read(st, ex.lora_bias[module], t.dtype)
        out[module] = t.replace(features=[*t.features, *_features(parts)], tensors=parts)
    for module, key in sorted(ex.biases.items()):
        values = st.read(key)
        t = out.get(module)
        if t is not None and t.lowrank:
            if values.shape != (t.out_features,):
                raise FormatError(
                    f"'{key}' has shape {list(values.shape)}, not [{t.out_features}]",
                    code="shape-mismatch",
                    where=where,
                )
            t = t.replace(
                features=[*t.features, C.FEATURE_BIAS],
                tensors={C.PART_BIAS_DELTA: values.to(t.part(C.PART_A).dtype)},
            )
        else:
            if values.dim() != 1:
                raise FormatError(
                    f"'{key}' is not a bias vector", code="shape-mismatch", where=where
                )
            t = Target.whole(module, C.KIND_BIAS, {C.PART_BIAS_DELTA: values})
        t.fields.update({PENDING: BIAS_PENDING, BIAS_VALUES: True})
        out[module] = t
    for module, keys in sorted(ex.saved.items()):
        tensors = {p: st.read(k) for p, k in keys.items()}
        _one_dtype(tensors)
        out[module] = Target.whole(module, C.KIND_FULL, tensors)
    for module, key in sorted(ex.tokens.items()):
        values = st.read(key)
        idx = _indices(cfg, module, where)
        if values.dim() != 2 or values.shape[0] != len(idx):
            raise FormatError(
                f"'{key}' has shape {list(values.shape)} for {len(idx)} token indices",
                code="shape-mismatch",
                where=where,
            )
        t = Target.whole(
            module,
            C.KIND_TOKENS,
            {C.PART_TOKEN_VALUES: values},
            indices=sorted(idx),
            base_rows=max(idx) + 1,
        )
        if sorted(idx) != idx:  # PEFT row i belongs to idx[i]; we store them ascending
            order = sorted(range(len(idx)), key=idx.__getitem__)
            t._parts[C.PART_TOKEN_VALUES] = values[order]
        t.fields[PENDING] = "its vocabulary size is not in a PEFT file: convert with --base"
        out[module] = t
    return out


def _features(parts: Mapping[str, Any]) -> list[str]:
    by_part = {C.PART_MAGNITUDE: C.FEATURE_DORA, C.PART_LORA_BIAS: C.FEATURE_LORA_BIAS}
    return [by_part[p] for p in parts]


def _read(st: StFile, key: str, dtype: str) -> torch.Tensor:
    from ..format import torch_dtype

    x = st.read(key)
    return x if x.dtype == torch_dtype(dtype) else x.to(torch_dtype(dtype))


def _one_dtype(tensors: dict[str, torch.Tensor]) -> None:
    first = next(iter(tensors.values()))
    for p, x in tensors.items():
        if x.dtype != first.dtype:
            tensors[p] = x.to(first.dtype)


def complete(adapter: Adapter, ckpt: Checkpoint) -> list[str]:
    """Fill in what only the base knows (a tokens target's vocabulary); notes for the report."""
    from .gguf_read import complete_gguf

    notes = complete_gguf(adapter, ckpt)  # llama.cpp names and Q/K order (convert --base)
    for t in adapter.targets.values():
        grown = _grown_rows(t, ckpt)
        if grown is not None:  # a resized vocabulary (PEFT saves the resized copy)
            t.fields["base_rows"] = grown
            notes.append(
                f"'{t.name}': {t.fields['shapes']['weight'][0]} rows, the base has {grown}: "
                "a grown vocabulary (base_rows)"
            )
    biased = [t for t in adapter.targets.values() if C.PART_BIAS_DELTA in t.parts()]
    for t in biased:
        _bind_bias(t, ckpt)
    if any(t.fields.pop(BIAS_VALUES, False) for t in biased):
        notes.append("trained bias values turned into differences from the base's biases")
    for t in adapter.targets.values():
        if t.kind != C.KIND_TOKENS or PENDING not in t.fields:
            continue
        key = ckpt.resolve(t.name)
        if key is None or len(ckpt.shape(key)) != 2 or ckpt.shape(key)[1] != t.out_features:
            raise FormatError(
                f"tokens target '{t.name}' has no [vocab, {t.out_features}] embedding in the base",
                code="missing-module",
                where=str(ckpt.path),
            )
        t.in_features = ckpt.shape(key)[0]
        del t.fields[PENDING]
        notes.append(f"'{t.name}': vocabulary {t.in_features} taken from the base")
    return notes


def _grown_rows(t: Target, ckpt: Checkpoint) -> int | None:
    """The base's row count when a ``full`` weight has more rows than the base's, else None."""
    if t.kind != C.KIND_FULL or t.fields.get("base_rows") is not None:
        return None
    shape = t.fields["shapes"].get(C.PART_WEIGHT)
    key = ckpt.resolve(t.name)
    if shape is None or key is None or len(shape) != 2:
        return None
    rows, cols = ckpt.shape(key)[0], ckpt.shape(key)[-1]
    return int(rows) if len(ckpt.shape(key)) == 2 and cols == shape[1] and rows < shape[0] else None


def _bind_bias(t: Target, ckpt: Checkpoint) -> None:
    """Keep the base's bias on the target; PEFT values become the spec's differences."""
    import torch

    key = ckpt.resolve(t.name, ".bias")
    if key is None or ckpt.shape(key) != (t.out_features,):
        raise FormatError(
            f"'{t.name}' trains a bias but the base has no [{t.out_features}] '{t.name}.bias'",
            code="missing-module",
            where=str(ckpt.path),
        )
    base = ckpt.read(key).to(torch.float64)
    t.fields[BASE_BIAS] = base
    if t.fields.get(BIAS_VALUES):
        values = t.part(C.PART_BIAS_DELTA)
        t._parts[C.PART_BIAS_DELTA] = (values.to(torch.float64) - base).to(values.dtype)
        t.fields.pop(PENDING, None)


# -- writing ------------------------------------------------------------------------------------


def config_extras(adapter: Adapter, cfg: dict[str, Any]) -> None:
    """Set ``use_dora``, ``lora_bias``, ``modules_to_save``, ``trainable_token_indices``."""
    ts = list(adapter.targets.values())
    lowrank = [t for t in ts if t.lowrank]
    dora = {C.FEATURE_DORA in t.features for t in lowrank}
    lbias = {C.FEATURE_LORA_BIAS in t.features for t in lowrank}
    for flag, values in (("use_dora", dora), ("lora_bias", lbias)):
        if len(values) > 1:
            raise FormatError(
                f"PEFT sets {flag} for the whole adapter; some targets have it, some not",
                code="unsupported-feature",
                hint="split the adapter, or convert to loratool (per-target features)",
            )
        if True in values:
            cfg[flag] = True
    for t in ts:
        why = _peft_refusal(t)
        if why:
            raise FormatError(f"target '{t.name}': {why}", code="unsupported-feature")
    if any(t.kind == C.KIND_BIAS for t in ts):
        cfg["bias"] = "all"
    elif any(C.FEATURE_BIAS in t.features for t in ts):
        cfg["bias"] = "lora_only"
    saved = sorted(t.name for t in ts if t.kind == C.KIND_FULL)
    if saved:
        cfg["modules_to_save"] = saved
    tokens = {t.name: list(t.fields["indices"]) for t in ts if t.kind == C.KIND_TOKENS}
    if tokens:
        cfg["trainable_token_indices"] = tokens


def _peft_refusal(t: Target) -> str | None:
    if C.PART_BIAS_DELTA in t.parts() and not ({BASE_BIAS, BIAS_VALUES} & set(t.fields)):
        return (
            "PEFT stores trained bias values, the base's bias plus the delta: convert with --base"
        )
    return None


def _bias_values(t: Target) -> torch.Tensor:
    """PEFT's trained bias: the base's plus the delta, summed in fp64, one rounding."""
    import torch

    d = t.part(C.PART_BIAS_DELTA)
    if t.fields.get(BIAS_VALUES):
        return d
    base = t.fields[BASE_BIAS]
    return (base.to(torch.float64) + d.to(torch.float64)).to(d.dtype)


def peft_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """PEFT's keys for every part beyond the factors (which ``write_peft`` writes itself)."""
    out: dict[str, torch.Tensor] = {}
    for t in adapter.targets.values():
        p = KEY_PREFIX + t.name
        if C.FEATURE_DORA in t.features:
            m = t.part(C.PART_MAGNITUDE)
            out[p + PEFT_MAGNITUDE] = m.reshape(1, -1, 1, 1) if t.kind == C.KIND_CONV2D else m
        if C.FEATURE_LORA_BIAS in t.features:
            out[p + PEFT_LORA_BIAS] = t.part(C.PART_LORA_BIAS)
        if C.PART_BIAS_DELTA in t.parts():
            out[p + (PEFT_BASE_BIAS if t.lowrank else ".bias")] = _bias_values(t)
        if t.kind == C.KIND_FULL:
            for part in t.parts():
                out[f"{p}.{part}"] = t.part(part)
        if t.kind == C.KIND_TOKENS:
            out[p + PEFT_TOKENS] = t.part(C.PART_TOKEN_VALUES)
    return out
