"""PEFT LoRA directories: read them with PEFT's exact semantics, and write ones PEFT loads.

Reading honours what ``peft.PeftModel.from_pretrained`` computes for each module: the rank and
alpha from ``r``/``lora_alpha`` overridden by ``rank_pattern``/``alpha_pattern`` (PEFT's
``get_pattern_key`` matching), α/√r with ``use_rslora``, Conv1D weights with ``fan_in_fan_out``,
``lora_embedding_A/B`` for embeddings. Features a LoRA file cannot carry (DoRA magnitudes,
``modules_to_save`` weights, trained biases, trainable tokens, LoRA variants, inits that rewrite
the base) are refused with the feature named, never dropped.

Writing emits only config fields PEFT has accepted since 0.7, so older PEFT versions load the
directory too (new fields break them: peft #1979, #2275), and a model card whose ``base_model``
is a Hub id or absent, never a local path.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import constants as C
from ..adapter import Adapter, Target
from ..errors import FormatError
from . import naming
from ._st import StFile, json_text, open_st, read_json

if TYPE_CHECKING:
    from ..sources import Opened

FORMAT = "peft"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

_MODULE_NAME = re.compile(r"^[^.\s]+(\.[^.\s]+)*$")
MAX_NAME_CHARS = 1024

# Inits that rewrite the base weights: the saved adapter only works on that rewritten base.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# LoRA variants that change how PEFT applies the factors (each a config field, None when off).
_VARIANT_FIELDS = {
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


# -- locating a PEFT adapter ---------------------------------------------------------------------


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


# -- config --------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_rank(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= C.MAX_RANK


def check_config(cfg: Any, where: str) -> dict[str, Any]:
    """Validate a LoRA config dict (PEFT's or diffusers'), refusing what loratool cannot carry.

    Returns the config with PEFT's defaults filled in for the fields loratool uses.
    """

    def bad(message: str, code: str = "bad-config", hint: str | None = None) -> FormatError:
        return FormatError(message, code=code, where=where, hint=hint)

    if not isinstance(cfg, dict):
        raise bad("the adapter config is not a JSON object")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise bad(
            f'peft_type is {peft_type!r}; loratool reads LoRA adapters (peft_type "LORA") only',
            code="peft-type",
            hint="AdaLoRA, IA3, prompt tuning and other PEFT methods have no LoRA equivalent",
        )
    out = dict(cfg)
    out.setdefault("r", 8)
    out.setdefault("lora_alpha", 8)
    if not _is_rank(out["r"]):
        raise bad(f"r must be an integer in 1..{C.MAX_RANK}, got {out['r']!r}")
    if not _is_number(out["lora_alpha"]):
        raise bad(f"lora_alpha must be a finite number, got {out['lora_alpha']!r}")
    for key, check, what in (
        ("rank_pattern", _is_rank, "an integer rank"),
        ("alpha_pattern", _is_number, "a finite number"),
    ):
        pats = out.get(key) or {}
        if not isinstance(pats, dict):
            raise bad(f"{key} must be an object, got {type(pats).__name__}")
        for k, v in pats.items():
            naming.check_pattern(k, what=key, where=where)
            if not check(v):
                raise bad(f"{key}[{k!r}] must be {what}, got {v!r}")
        out[key] = pats
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "use_qalora"):
        if not isinstance(out.get(key, False), bool):
            raise bad(f"{key} must be true or false, got {out[key]!r}")

    targets = out.get("target_modules")
    if isinstance(targets, str):
        if targets.lower() != naming.ALL_LINEAR:
            naming.check_pattern(targets, what="target_modules", where=where)
    elif targets is not None and (
        not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
    ):
        raise bad("target_modules must be a list of names or a regex string")
    excl = out.get("exclude_modules")
    if isinstance(excl, str):
        naming.check_pattern(excl, what="exclude_modules", where=where)
    elif excl is not None and not (
        isinstance(excl, list) and all(isinstance(e, str) for e in excl)
    ):
        raise bad("exclude_modules must be a list of names or a regex string")
    for key in ("modules_to_save", "layers_pattern"):
        value = out.get(key)
        values = [value] if isinstance(value, str) else value or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise bad(f"{key} must be a list of names")
        for v in values:
            naming.check_pattern(v, what=key, where=where)
    layers = out.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
    ):
        raise bad("layers_to_transform must be an integer or a list of integers")

    if out.get("use_dora"):
        raise bad(
            "the adapter uses DoRA (use_dora): its magnitude vectors rescale each weight "
            "column, which a plain LoRA file cannot express",
            code="dora",
            hint="merge it with PEFT (merge_and_unload) and run `loratool extract` on the result, "
            "or train without use_dora",
        )
    if out.get("lora_bias"):
        raise bad(
            "the adapter trains a bias on lora_B (lora_bias), which a LoRA file cannot carry",
            code="lora-bias",
            hint="merge it with PEFT (merge_and_unload), or train with lora_bias=False",
        )
    if out.get("trainable_token_indices"):
        raise bad(
            "the adapter trains token embeddings (trainable_token_indices), which a LoRA file "
            "cannot carry",
            code="trainable-tokens",
            hint="merge it with PEFT (merge_and_unload)",
        )
    if out.get("use_qalora"):
        raise bad(
            "the adapter is a QA-LoRA adapter (use_qalora): it pools inputs before lora_A",
            code="peft-variant",
        )
    for key, what in _VARIANT_FIELDS.items():
        if out.get(key):
            raise bad(
                f"the adapter uses {what}, which changes how PEFT applies it; loratool "
                "reads plain LoRA only",
                code="peft-variant",
            )
    init = out.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise bad(
            f"the adapter was initialised with {init!r}, which rewrites the base weights: "
            "it only works on that rewritten base",
            code="peft-variant",
            hint="save it with PEFT's save_pretrained(..., path_initial_model_for_weight_"
            "conversion=...) to get a plain LoRA of the original base",
        )
    return out


# -- tensors -------------------------------------------------------------------------------------

_SUFFIXES = (
    (".lora_A.weight", "A", False),
    (".lora_B.weight", "B", False),
    (".lora_embedding_A", "A", True),
    (".lora_embedding_B", "B", True),
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
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise FormatError(
                f"module '{module}' has {len(a.shape)}-d factors: convolution LoRA is not "
                "supported (loratool format 1.0 holds linear, Conv1D and embedding layers)",
                code="unsupported-layer",
                where=where,
            )
        rank, in_features = a.shape
        out_features, rank_b = b.shape
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
        )
    if f64:
        notes.append(f"{f64} modules stored in f64: factors rounded to f32")
    ignored = [m for m in g.alphas if config_for(m)[0] is not None]
    if ignored:
        notes.append(f"ignored {len(ignored)} '.alpha' tensors: the config sets alpha, as in PEFT")
    return targets


# -- reading -------------------------------------------------------------------------------------


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
    cfg = check_config(raw, str(config_path))
    weights = _weights_path(folder)
    st = open_st(weights)
    g = group_keys(st.tensors)
    refuse_extras(g, cfg, str(weights))
    notes: list[str] = []
    targets = build_targets(
        st, g, config_for=lambda module: (cfg, module), where=str(weights), notes=notes
    )
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


# -- writing -------------------------------------------------------------------------------------


def _most_common(values: Iterable[Any]) -> Any:
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return min(counts, key=lambda v: (-counts[v], v))


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

    ts = list(adapter.targets.values())
    n_rs = sum(t.scale_rule == C.SCALE_RSLORA for t in ts)
    rule = C.SCALE_RSLORA if n_rs * 2 > len(ts) else C.SCALE_STANDARD
    alphas = {
        t.name: t.alpha if t.scale_rule == rule else alpha_for(t.scale, t.rank, rule) for t in ts
    }
    ranks = {t.name: t.rank for t in ts}
    r = _most_common(ranks.values())
    lora_alpha = _most_common(alphas.values())
    kinds = {t.kind for t in ts}
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "revision": adapter.binding().revision,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _plain(lora_alpha),
        "target_modules": sorted(adapter.targets),
        "rank_pattern": naming.suffix_patterns(ranks, r),
        "alpha_pattern": {
            k: _plain(v) for k, v in naming.suffix_patterns(alphas, lora_alpha).items()
        },
        "lora_dropout": 0.0,
        "fan_in_fan_out": C.KIND_CONV1D in kinds,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    if rule == C.SCALE_RSLORA:
        cfg["use_rslora"] = True  # written only when set: PEFT < 0.7 has no such field
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
        if t.kind == C.KIND_EMBEDDING:
            tensors[f"{KEY_PREFIX}{t.name}.lora_embedding_A"] = t.lora_A
            tensors[f"{KEY_PREFIX}{t.name}.lora_embedding_B"] = t.lora_B
        else:
            tensors[f"{KEY_PREFIX}{t.name}.lora_A.weight"] = t.lora_A
            tensors[f"{KEY_PREFIX}{t.name}.lora_B.weight"] = t.lora_B
    blob = st_bytes(tensors, {"format": "pt"})
    with atomic_dir(out_dir, force=force) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(blob)
        (tmp / CONFIG_NAME).write_text(json_text(cfg), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(adapter, cfg), encoding="utf-8")
    return Path(out_dir)
