"""What extract reads from the checkpoints: the modules to difference, their kind, the hub id."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import constants as C
from .. import kinds
from ..errors import CompatibilityError, UsageError

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

_EMBEDDING_NAMES = ("wte", "wpe", "shared", "relative_attention_bias")
_OUTPUT_NAMES = ("lm_head", "embed_out")  # output projections: excluded by all-linear
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
_CONV1D_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")  # transformers' Conv1D layers there


def _is_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last not in _OUTPUT_NAMES and ("embed" in last or last in _EMBEDDING_NAMES)


def _is_output(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in _OUTPUT_NAMES


def _conv1d_model(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint's config says its 2-D c_attn/c_proj/c_fc weights are Conv1D [in, out]."""
    config = ckpt.path / "config.json" if ckpt.is_dir else ckpt.path.parent / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type in _CONV1D_MODEL_TYPES


def hub_of(ckpt: Checkpoint) -> tuple[str | None, str | None]:
    """Hub id and revision recorded beside a base checkpoint (``loratool_source.json``), if any."""
    folder = ckpt.path if ckpt.is_dir else ckpt.path.parent
    try:
        doc = json.loads((folder / "loratool_source.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(doc, dict):
        return None, None
    hub, rev = doc.get("hub_id"), doc.get("revision")
    return (hub if isinstance(hub, str) else None), (rev if isinstance(rev, str) else None)


@dataclass
class Module:
    name: str
    base_key: str
    ft_key: str
    kind: str
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()  # conv2d: (kh, kw)


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def select_modules(
    base: Checkpoint, ft: Checkpoint, targets: str | Sequence[str] | None, warnings: list[str]
) -> list[Module]:
    """The modules to extract, in the base's storage order (so reads sweep each shard once)."""
    candidates = [
        key[: -len(".weight")]
        for key in base.entries
        if key.endswith(".weight") and len(base.shape(key)) in (2, 4)
    ]
    convs = {m for m in candidates if len(base.shape(m + ".weight")) == 4}
    if targets is None:
        wanted = ["all-linear", "all-conv"] if convs else ["all-linear"]
    elif isinstance(targets, str):
        wanted = [s.strip() for s in targets.split(",") if s.strip()]
    else:
        wanted = [s.strip() for s in targets if s.strip()]
    if not wanted:
        raise UsageError(
            "--targets is empty", code="no-targets", hint="e.g. --targets q_proj,v_proj"
        )
    chosen: set[str] = set()
    for suffix in wanted:
        if suffix == "all-linear":
            chosen.update(
                m
                for m in candidates
                if m not in convs and not _is_embedding(m) and not _is_output(m)
            )
            continue
        if suffix == "all-conv":  # every Conv2d weight [out, in, kh, kw] (image models)
            chosen.update(convs)
            continue
        hits = [m for m in candidates if m == suffix or m.endswith("." + suffix)]
        if not hits:
            raise UsageError(
                f"--targets '{suffix}' matches no 2-D weight in the base",
                code="no-match",
                where=str(base.path),
                hint="give module-name suffixes such as q_proj,v_proj, or all-linear",
            )
        chosen.update(hits)
    conv1d = _conv1d_model(base)
    order = {shard: i for i, shard in enumerate(base.shards)}

    def storage(m: str) -> tuple[int, int]:
        e = base.entries[m + ".weight"]
        return order[e.shard], e.info.begin

    out: list[Module] = []
    for m in sorted(chosen, key=storage):
        bkey = m + ".weight"
        if base.dtype(bkey) not in _FLOAT_DTYPES:
            warnings.append(f"'{bkey}' is {base.dtype(bkey)}, not a float weight: skipped")
            continue
        fkey = ft.resolve(m)
        if fkey is None:
            warnings.append(f"'{bkey}' is not in the fine-tuned checkpoint: skipped")
            continue
        if tuple(ft.shape(fkey)) != tuple(base.shape(bkey)):
            raise CompatibilityError(
                f"'{bkey}' is {list(base.shape(bkey))} in the base but "
                f"{list(ft.shape(fkey))} in the fine-tuned checkpoint",
                code="shape-mismatch",
                where=str(ft.path),
                hint="extract needs two checkpoints of the same architecture",
            )
        if ft.dtype(fkey) not in _FLOAT_DTYPES:
            warnings.append(f"'{fkey}' is {ft.dtype(fkey)}, not a float weight: skipped")
            continue
        # A checkpoint holds no module types: the kind is read off the name and the model type.
        shape = tuple(base.shape(bkey))
        if len(shape) == 4:
            out.append(Module(m, bkey, fkey, C.KIND_CONV2D, shape[1], shape[0], shape[2:]))
            continue
        if _is_embedding(m):
            kind = C.KIND_EMBEDDING
        elif conv1d and m.rsplit(".", 1)[-1] in _CONV1D_NAMES:
            kind = C.KIND_CONV1D
        else:
            kind = C.KIND_LINEAR
        n_in, n_out = kinds.get(kind).features(tuple(base.shape(bkey)))
        out.append(Module(m, bkey, fkey, kind, n_in, n_out))
    return out
