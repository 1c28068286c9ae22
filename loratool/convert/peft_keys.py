"""PEFT-style state dicts: sort the keys into factors, refuse extras, build the Targets.

Shared by every reader of PEFT-named tensors (PEFT folders, diffusers files) and, for the
factor loader and module-name check, by kohya. The config, when there is one, gives each
module's rank and alpha with PEFT's exact semantics (``rank_pattern``/``alpha_pattern``,
α/√r with ``use_rslora``, Conv1D with ``fan_in_fan_out``, ``lora_embedding_A/B`` for
embeddings).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import constants as C
from .. import kinds
from ..adapter import Target
from ..errors import FormatError
from . import naming
from ._st import StFile
from .peft_config import KEY_PREFIX

_MODULE_NAME = re.compile(r"^[^.\s]+(\.[^.\s]+)*$")
MAX_NAME_CHARS = 1024

# (key suffix, factor, whether the suffix names a lookup kind): from the kinds' PEFT names.
_SUFFIXES = tuple(
    dict.fromkeys(
        (f".{name}", factor, not kind.dense)
        for kind in kinds.REGISTRY.values()
        for name, factor in zip(kind.peft_names, "AB", strict=True)
    )
)


@dataclass
class KeyGroups:
    """A PEFT-style state dict's keys, sorted into factors and everything else."""

    factors: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> {"A", "B"}
    embedding: set[str] = field(default_factory=set)
    alphas: dict[str, str] = field(default_factory=dict)  # module -> "<module>.alpha" key
    dora: list[str] = field(default_factory=list)
    lora_bias: list[str] = field(default_factory=list)
    base_copies: dict[str, str] = field(default_factory=dict)  # module -> base_layer.weight key
    bias: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)


def group_keys(keys: Iterable[str], *, prefix: str = KEY_PREFIX) -> KeyGroups:
    g = KeyGroups()
    rest: list[tuple[str, str]] = []
    for key in sorted(keys):
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        for suffix, part, is_emb in _SUFFIXES:
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                g.factors.setdefault(module, {})[part] = key
                if is_emb:
                    g.embedding.add(module)
                break
        else:
            rest.append((key, name))
    for key, name in rest:
        if ".lora_magnitude_vector" in name:
            g.dora.append(key)
        elif name.endswith((".lora_B.bias", ".lora_embedding_B.bias")):
            g.lora_bias.append(key)
        elif (
            name.endswith(".base_layer.weight") and name[: -len(".base_layer.weight")] in g.factors
        ):
            g.base_copies[name[: -len(".base_layer.weight")]] = key
        elif "trainable_tokens" in name or ".token_adapter." in name:
            g.tokens.append(key)
        elif name.endswith(".alpha") and name[: -len(".alpha")] in g.factors:
            g.alphas[name[: -len(".alpha")]] = key
        elif name.endswith(".bias"):
            g.bias.append(key)
        else:
            g.other.append(key)
    return g


def refuse_extras(g: KeyGroups, cfg: Mapping[str, Any] | None, where: str) -> None:
    """Raise for tensors a LoRA file cannot carry, naming the feature and the way out."""
    if g.dora:
        raise FormatError(
            f"the adapter has DoRA magnitude vectors ({len(g.dora)}, e.g. '{g.dora[0]}'): "
            "a plain LoRA file cannot express them",
            code="dora",
            where=where,
            hint="merge it with PEFT (merge_and_unload) and run `loratool extract` on the result",
        )
    if g.lora_bias:
        raise FormatError(
            f"the adapter has LoRA biases ('{g.lora_bias[0]}'), which a LoRA file cannot carry",
            code="lora-bias",
            where=where,
            hint="merge it with PEFT (merge_and_unload)",
        )
    if g.tokens:
        raise FormatError(
            f"the adapter trains token embeddings ('{g.tokens[0]}'), which a LoRA file cannot carry",
            code="trainable-tokens",
            where=where,
            hint="merge it with PEFT (merge_and_unload)",
        )
    saved = (cfg or {}).get("modules_to_save") or []
    if g.other and saved:
        raise FormatError(
            f"the adapter saves whole modules (modules_to_save: {', '.join(saved)}; "
            f"{len(g.other)} tensors, e.g. '{g.other[0]}'): full weights a LoRA file cannot carry",
            code="modules-to-save",
            where=where,
            hint="merge them into the base with PEFT (merge_and_unload), or train without "
            "modules_to_save",
        )
    if g.bias:
        bias = (cfg or {}).get("bias", "none")
        raise FormatError(
            f"the adapter trains biases (bias={bias!r}; {len(g.bias)} tensors, e.g. "
            f"'{g.bias[0]}'), which a LoRA file cannot carry",
            code="lora-bias",
            where=where,
            hint="merge it with PEFT (merge_and_unload), or train with bias='none'",
        )
    if g.other:
        raise FormatError(
            f"unexpected tensor '{g.other[0]}' ({len(g.other)} tensors are neither lora_A "
            "nor lora_B)",
            code="unexpected-tensor",
            where=where,
        )


def _target_dtype(a: str, b: str) -> str:
    """The loratool dtype for factors stored as ``a`` and ``b`` (mixed or f64 → f32)."""
    return a if a == b and a in C.DTYPE_SIZES else "F32"


def factor_loader(st: StFile, key_a: str, key_b: str, dtype: str) -> Callable[[str], Any]:
    """A Target loader reading ``key_a``/``key_b`` from ``st`` (the target may be renamed)."""

    def load(name: str) -> Any:
        from ..format import torch_dtype

        x = st.read(key_a if name.endswith(C.LORA_A_SUFFIX) else key_b)
        want = torch_dtype(dtype)
        return x if x.dtype == want else x.to(want)

    return load


def check_module_name(name: str, where: str) -> None:
    if len(name) > MAX_NAME_CHARS or not _MODULE_NAME.match(name):
        raise FormatError(
            f"module name {name[:80]!r} is not a dot-separated module path",
            code="bad-target",
            where=where,
        )


def conv_kernel(module: str, a: tuple[int, ...], b: tuple[int, ...], where: str) -> tuple[int, ...]:
    """``(kh, kw)`` of a Conv2d LoRA (A ``[r, in, kh, kw]``, B ``[out, r, 1, 1]``), () for 2-D."""
    if len(a) == 2 and len(b) == 2:
        return ()
    if len(a) == 4 and len(b) == 4 and tuple(b[2:]) == (1, 1):
        return (int(a[2]), int(a[3]))
    raise FormatError(
        f"module '{module}' has factors {list(a)} and {list(b)}: neither a Linear LoRA "
        "([r, in], [out, r]) nor a Conv2d one ([r, in, kh, kw], [out, r, 1, 1])",
        code="unsupported-layer",
        where=where,
    )


def build_targets(
    st: StFile,
    g: KeyGroups,
    *,
    config_for: Callable[[str], tuple[Mapping[str, Any] | None, str]],
    where: str,
    notes: list[str],
) -> dict[str, Target]:
    """Targets from grouped PEFT keys; ``config_for(module)`` gives (config, PEFT's module key).

    A None config means "no config" (diffusers files without metadata): rank from the tensors,
    alpha from a ``<module>.alpha`` tensor or else equal to the rank (scale 1, as diffusers
    assumes).
    """
    if not g.factors:
        raise FormatError(
            "the adapter has no lora_A/lora_B tensors", code="no-targets", where=where
        )
    if len(g.factors) > C.MAX_TARGETS:
        raise FormatError(
            f"{len(g.factors)} modules (limit {C.MAX_TARGETS})", code="bad-target", where=where
        )
    targets: dict[str, Target] = {}
    f64 = 0
    for module in sorted(g.factors):
        check_module_name(module, where)
        parts = g.factors[module]
        for part in ("A", "B"):
            if part not in parts:
                other = "B" if part == "A" else "A"
                raise FormatError(
                    f"module '{module}' has lora_{other} but no lora_{part}",
                    code="missing-tensor",
                    where=where,
                )
        a, b = st.tensors[parts["A"]], st.tensors[parts["B"]]
        kernel = conv_kernel(module, a.shape, b.shape, where)
        rank, in_features = a.shape[:2]
        out_features, rank_b = b.shape[:2]
        if rank_b != rank or rank == 0:
            raise FormatError(
                f"module '{module}': lora_B {list(b.shape)} does not match lora_A {list(a.shape)}",
                code="shape-mismatch",
                where=where,
            )
        if not (1 <= rank <= C.MAX_RANK):
            raise FormatError(
                f"module '{module}' has rank {rank} (limit {C.MAX_RANK})",
                code="bad-target",
                where=where,
            )
        cfg, key = config_for(module)
        if cfg is None:
            if module in g.alphas:
                alpha = st.scalar(g.alphas[module])
                alpha = alpha if alpha != 0.0 else float(rank)
            else:
                alpha = float(rank)
            rule = C.SCALE_STANDARD
            kind = C.KIND_EMBEDDING if module in g.embedding else C.KIND_LINEAR
        else:
            want = naming.pattern_value(cfg["rank_pattern"], key, cfg["r"])
            if want != rank:
                raise FormatError(
                    f"module '{module}' has rank {rank} in the tensors but the config gives "
                    f"r={want}",
                    code="config-mismatch",
                    where=where,
                    hint="the config and the weights come from different adapters",
                )
            if not naming.target_selected(cfg, key):
                raise FormatError(
                    f"module '{module}' has tensors but target_modules does not select it "
                    "(PEFT would ignore them)",
                    code="config-mismatch",
                    where=where,
                    hint="the config and the weights come from different adapters",
                )
            alpha = float(naming.pattern_value(cfg["alpha_pattern"], key, cfg["lora_alpha"]))
            rule = C.SCALE_RSLORA if cfg.get("use_rslora") else C.SCALE_STANDARD
            if module in g.embedding:
                kind = C.KIND_EMBEDDING
            else:
                kind = C.KIND_CONV1D if cfg.get("fan_in_fan_out") else C.KIND_LINEAR
        if kernel:
            kind = C.KIND_CONV2D
        if not math.isfinite(alpha):
            raise FormatError(
                f"module '{module}' has alpha {alpha}", code="bad-target", where=where
            )
        dtype = _target_dtype(a.dtype, b.dtype)
        f64 += "F64" in (a.dtype, b.dtype)
        targets[module] = Target(
            module,
            rank=rank,
            alpha=alpha,
            in_features=in_features,
            out_features=out_features,
            scale_rule=rule,
            kind=kind,
            dtype=dtype,
            loader=factor_loader(st, parts["A"], parts["B"], dtype),
            fields={"kernel": kernel} if kernel else None,
        )
    if f64:
        notes.append(f"{f64} modules stored in f64: factors rounded to f32")
    ignored = [m for m in g.alphas if config_for(m)[0] is not None]
    if ignored:
        notes.append(f"ignored {len(ignored)} '.alpha' tensors: the config sets alpha, as in PEFT")
    return targets
