"""kohya sd-scripts LoRA files: ``lora_down``/``lora_up``/``alpha`` per module, ``ss_*`` metadata.

kohya applies ``up @ down`` at ``alpha / rank`` per module, where rank is ``lora_down``'s first
dimension and a missing or zero ``alpha`` means alpha = rank (``networks/lora.py``). On writing,
each module's alpha is the one that keeps its exact scale: ``scale · rank``. For an rsLoRA
target (scale α/√r) that is α·√r, folded into alpha rather than into the factors. The
"alpha = rank" export (diffusers, several GUIs) silently changes strength whenever alpha ≠ rank;
we never write it. alpha is stored as an f32 0-d tensor whatever the factor dtype, as kohya
reads it (``alpha.float()``), so an f16 adapter keeps an exact f32 alpha.

Module names are ``<prefix><module path with '.' → '_'>``. Reading keeps the kohya name as the
module name unless the file carries loratool's verified name map; ``convert --base`` maps kohya
names back to the base's module paths (naming.resolve_kohya).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import constants as C
from .. import kinds
from ..adapter import Adapter, Target
from ..errors import FormatError, UsageError
from . import lycoris, naming
from ._st import StFile, open_st
from .peft_keys import check_module_name, factor_loader

if TYPE_CHECKING:
    import torch

    from ..sources import Opened

FORMAT = "kohya"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
NETWORK_MODULE = "networks.lora"
NAMES_KEY = "loratool.modules"  # {kohya name: module path}, written by write_kohya
BASE_KEY = C.BASE_KEY  # the loratool binding (hub id, revision), JSON

# Suffixes of LyCORIS and other non-LoRA kohya-family networks, with what they are.
# (LoCon convs, lora_mid, LoHa, LoKr and dora_scale are read: convert/lycoris.py.)
_NOT_LORA = {
    ".oft_blocks": "OFT",
    ".oft_diag": "OFT",
    ".diff": "a full weight difference",
    ".diff_b": "a full bias difference",
    ".w_norm": "a norm-layer update",
    ".b_norm": "a norm-layer update",
    ".lora_up.bias": "a LoRA bias",
}
# ss_* fields copied into provenance and back out (descriptive; the network fields are recomputed).
KEEP_METADATA = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_v2",
    "ss_output_name",
    "ss_training_comment",
    "sshs_model_hash",
    "modelspec.architecture",
    "modelspec.title",
)
_RESTORE = (
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_v2",
    "ss_output_name",
    "ss_training_comment",
)


_LYCORIS = tuple("." + p for p in lycoris.PARTS if p not in ("lora_down.weight", "lora_up.weight"))


def looks_like_kohya(st: StFile) -> bool:
    return any(k.endswith((DOWN, UP, *_LYCORIS, *_NOT_LORA)) for k in st.tensors)


def _name_map(st: StFile, names: set[str]) -> dict[str, str]:
    """loratool's own kohya → module map, kept only where each entry is consistent."""
    from ..format import strict_loads

    raw = st.metadata.get(NAMES_KEY)
    if raw is None:
        return {}
    doc = strict_loads(raw, code="bad-metadata", what=f"'{NAMES_KEY}'", where=st.path)
    if not isinstance(doc, dict):
        return {}
    out = {}
    for k, v in doc.items():
        if k in names and isinstance(v, str) and naming.kohya_consistent(k, v):
            out[k] = v
    # Only a complete, collision-free map is used: half-renamed adapters would be confusing.
    if set(out) != names or len(set(out.values())) != len(out):
        return {}
    return out


_LYCORIS_PARTS = tuple((s, s[1:]) for s in _LYCORIS)


def read_kohya_file(st: StFile) -> Adapter:
    where = st.path
    modules: dict[str, dict[str, str]] = {}
    for key in sorted(st.tensors):
        for suffix, part in ((DOWN, "down"), (UP, "up"), (ALPHA, "alpha"), *_LYCORIS_PARTS):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[part] = key
                break
        else:
            kind = next((v for s, v in _NOT_LORA.items() if key.endswith(s)), None)
            if kind is not None:
                raise FormatError(
                    f"tensor '{key}' is {kind}, not LoRA: loratool reads plain LoRA "
                    "(lora_down/lora_up/alpha) only",
                    code="not-lora",
                    where=where,
                    hint="merge it into the base with its own tool and `loratool extract` a LoRA",
                )
            raise FormatError(
                f"unexpected tensor '{key}' (kohya LoRA files hold lora_down, lora_up and alpha)",
                code="unexpected-tensor",
                where=where,
            )
    if not modules:
        raise FormatError(
            "the file has no lora_down/lora_up tensors", code="no-targets", where=where
        )
    if len(modules) > C.MAX_TARGETS:
        raise FormatError(
            f"{len(modules)} modules (limit {C.MAX_TARGETS})", code="bad-target", where=where
        )
    targets: list[Target] = []
    zero_alpha = missing_alpha = 0
    names = {m for m, parts in modules.items() if set(parts) - {"alpha"}}
    rename = _name_map(st, names)
    for module in sorted(modules):
        parts = modules[module]
        if lycoris.is_lycoris(parts, st):
            alpha_key = parts.get("alpha")
            a = None if alpha_key is None else st.scalar(alpha_key)
            if a is not None and not math.isfinite(a):
                raise FormatError(
                    f"module '{module}' has alpha {a}", code="bad-target", where=where
                )
            zero_alpha += a == 0.0
            missing_alpha += a is None
            name = rename.get(module, module)
            check_module_name(name, where)
            keys = {
                lycoris.DOWN if p == "down" else lycoris.UP if p == "up" else p: k
                for p, k in parts.items()
                if p != "alpha"
            }
            targets.append(lycoris.read_module(st, name, module, keys, a, where))
            continue
        if "down" not in parts or "up" not in parts:
            have = ", ".join(sorted(parts))
            raise FormatError(
                f"module '{module}' has only {have}: kohya LoRA needs lora_down and lora_up",
                code="missing-tensor",
                where=where,
            )
        down, up = st.tensors[parts["down"]], st.tensors[parts["up"]]
        if len(up.shape) != 2:
            raise FormatError(
                f"module '{module}': lora_up {list(up.shape)} does not match lora_down "
                f"{list(down.shape)}",
                code="shape-mismatch",
                where=where,
            )
        rank, in_features = down.shape
        out_features, rank_up = up.shape
        if rank_up != rank or not (1 <= rank <= C.MAX_RANK):
            raise FormatError(
                f"module '{module}': lora_up {list(up.shape)} does not match lora_down "
                f"{list(down.shape)}",
                code="shape-mismatch",
                where=where,
            )
        if "alpha" in parts:
            alpha = st.scalar(parts["alpha"])
            if not math.isfinite(alpha):
                raise FormatError(
                    f"module '{module}' has alpha {alpha}", code="bad-target", where=where
                )
            if alpha == 0.0:  # kohya: `if alpha is None or alpha == 0: alpha = lora_dim`
                alpha, zero_alpha = float(rank), zero_alpha + 1
        else:
            alpha, missing_alpha = float(rank), missing_alpha + 1
        name = rename.get(module, module)
        check_module_name(name, where)
        dtype = down.dtype if down.dtype == up.dtype and down.dtype in C.DTYPE_SIZES else "F32"
        targets.append(
            Target(
                name,
                rank=rank,
                alpha=alpha,
                in_features=in_features,
                out_features=out_features,
                dtype=dtype,
                loader=factor_loader(st, parts["down"], parts["up"], dtype),
            )
        )
    source: dict[str, Any] = {"format": FORMAT}
    source.update({k: st.metadata[k] for k in KEEP_METADATA if k in st.metadata})
    notes = []
    if missing_alpha or zero_alpha:
        notes.append(
            f"alpha = rank for {missing_alpha + zero_alpha} modules "
            f"({missing_alpha} without alpha, {zero_alpha} with alpha 0), as kohya reads them"
        )
    if rename:
        notes.append(f"module names from the file's '{NAMES_KEY}' map")
    if notes:
        source["notes"] = notes
    hub_id = revision = None
    if BASE_KEY in st.metadata:
        try:
            base = json.loads(st.metadata[BASE_KEY])
        except ValueError:
            base = None
        if isinstance(base, dict):
            hub_id = base.get("hub_id") if naming.is_hub_id(base.get("hub_id")) else None
            revision = base.get("revision") if isinstance(base.get("revision"), str) else None
    adapter = Adapter.from_targets(
        targets, hub_id=hub_id, revision=revision, provenance={"source": source}
    )
    adapter.path = where
    return adapter


def read_kohya(path: str | os.PathLike[str]) -> Adapter:
    """A kohya LoRA file as an Adapter (module names stay kohya names; see module docstring)."""
    st = open_st(path)
    if not looks_like_kohya(st):
        raise FormatError(
            "no lora_down/lora_up tensors: not a kohya LoRA file",
            code="not-kohya",
            where=os.fspath(path),
        )
    return read_kohya_file(st)


def open_kohya(path: str) -> Opened | None:
    """``sources.READERS`` entry: a single safetensors file with kohya keys."""
    from ..sources import Opened

    if not Path(path).is_file():
        return None
    st = open_st(path)
    if not looks_like_kohya(st):
        return None
    return Opened(read_kohya_file(st), FORMAT, path, st.file_bytes)


# -- writing -------------------------------------------------------------------------------------


def kohya_alpha(t: Target) -> float:
    """The kohya alpha that gives ``t``'s exact scale under kohya's alpha / rank."""
    if t.scale_rule == C.SCALE_RSLORA:
        return t.alpha * math.sqrt(t.rank)  # (α/√r)·r
    return t.alpha


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's ``precalculate_safetensors_hashes``: (sshs_model_hash, sshs_legacy_hash).

    Both are taken over the file ``safetensors.torch.save`` makes with only the ``ss_*``
    metadata: SHA-256 of its data section, and the first 8 hex digits of SHA-256 over its bytes
    0x100000..0x110000 (sd-webui-additional-networks' legacy hash).
    """
    from ._st import st_bytes

    blob = st_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", blob[:8])
    model_hash = hashlib.sha256(memoryview(blob)[8 + n :]).hexdigest()
    legacy = hashlib.sha256(memoryview(blob)[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


def kohya_state(
    adapter: Adapter, *, prefix: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Tensors and metadata of the kohya file for ``adapter`` (and notes on what changed)."""
    import torch

    from ..format import canonical_json

    bad = [t for t in adapter.targets.values() if not kinds.get(t.kind).in_kohya]
    if bad:
        raise UsageError(
            f"kohya LoRA has no {bad[0].kind} layers (target '{bad[0].name}'): kohya applies "
            "up @ down to nn.Linear weights only",
            code="unsupported-kind",
            hint="use --to peft (PEFT handles Conv1D and embedding LoRA)",
        )
    te = {t.name.partition(".")[0] for t in adapter.targets.values()} & {
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    }
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    alphas: list[float] = []
    rounded = 0
    algos: set[str] = set()
    for t in sorted(adapter.targets.values(), key=lambda t: t.name):
        k = naming.kohya_name(t.name, prefix=prefix, te_count=len(te))
        if k in names:
            raise UsageError(
                f"modules '{names[k]}' and '{t.name}' both become kohya name '{k}'",
                code="name-collision",
            )
        names[k] = t.name
        if t.kind == C.KIND_LINEAR and not t.features:
            alpha = kohya_alpha(t)
            tensors[k + DOWN] = t.lora_A
            tensors[k + UP] = t.lora_B
        else:  # LoCon convs, DoRA, LoHa, LoKr: LyCORIS' names
            parts, alpha = lycoris.lycoris_tensors(t, k)
            tensors.update(parts)
            algos.add({"loha": "loha", "lokr": "lokr"}.get(t.kind, "locon"))
        alpha32 = torch.tensor(alpha, dtype=torch.float32)
        rounded += float(alpha32) != alpha
        alphas.append(float(alpha32))
        tensors[k + ALPHA] = alpha32
    ranks = {t.rank for t in adapter.targets.values()}
    meta: dict[str, str] = {}
    source = adapter.provenance.get("source")
    if isinstance(source, dict) and source.get("format") == FORMAT:
        meta.update({k: str(source[k]) for k in _RESTORE if isinstance(source.get(k), str)})
    meta.update(
        {
            "ss_network_module": NETWORK_MODULE if algos <= {"locon"} else "lycoris.kohya",
            "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": repr(alphas[0]) if len(set(alphas)) == 1 else "Dynamic",
            "ss_network_args": "{}"
            if algos <= {"locon"}
            else canonical_json({"algo": "/".join(sorted(algos))}),
        }
    )
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(tensors, meta)
    renamed = {k: v for k, v in names.items() if k != v}
    if renamed:
        meta[NAMES_KEY] = canonical_json(renamed)
    meta[BASE_KEY] = canonical_json(adapter.binding().header())
    notes = []
    if rounded:
        notes.append(f"{rounded} kohya alphas rounded to f32 (relative error below 6e-8)")
    return tensors, meta, notes


def write_kohya(
    adapter: Adapter,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    prefix: str | None = None,
) -> Path:
    """Write a kohya LoRA file atomically; per-module alpha keeps every target's exact scale."""
    return write_kohya_notes(adapter, path, force=force, prefix=prefix)[0]


def write_kohya_notes(
    adapter: Adapter,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    prefix: str | None = None,
) -> tuple[Path, list[str]]:
    """``write_kohya``, also returning notes for the convert report."""
    from .._io import atomic_write, check_output
    from ._st import st_bytes

    check_output(path, force=force)
    tensors, meta, notes = kohya_state(adapter, prefix=prefix)
    return atomic_write(path, [st_bytes(tensors, meta)], force=force), notes
