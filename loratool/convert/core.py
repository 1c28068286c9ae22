"""``convert``: open any adapter loratool reads, optionally bind it to a base, write a format.

The source is opened the way every command opens an ADAPTER (``sources.open_adapter``), so what
``convert`` reads, ``inspect`` and ``verify`` read too. With a base checkpoint, the adapter is
checked against it (``Checkpoint.check_fits``: every module present, every shape right) before
anything is written, kohya names are mapped back to the base's module paths, Linear/Conv1D is
decided from the stored weight shapes, and the binding records the base's fingerprint and Hub id.
Every output goes through ``loratool._io`` (temp sibling + rename), so a failure leaves nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import constants as C
from .. import kinds
from ..adapter import Adapter, BaseBinding, Target
from ..errors import CompatibilityError, UsageError
from . import naming
from .detect import open_source
from .pipeline import kohya_resolver, split_flux

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

TARGET_FORMATS = ("loratool", "peft", "kohya", "gguf", "diffusers")
DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
SOURCE_FILE = "loratool_source.json"  # written beside the weights by fixtures/models.py


# -- binding to a base ---------------------------------------------------------------------------


def base_identity(base: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """(hub id, revision) of a base folder, from loratool_source.json or config.json."""
    from ._st import read_json

    p = Path(base)
    if not p.is_dir():
        return None, None
    hub_id = revision = None
    src = p / SOURCE_FILE
    if src.is_file():
        doc = read_json(src, what=SOURCE_FILE)
        if isinstance(doc, dict):
            hub_id = doc.get("hub_id") if naming.is_hub_id(doc.get("hub_id")) else None
            revision = doc.get("revision") if isinstance(doc.get("revision"), str) else None
    config = p / "config.json"
    if hub_id is None and config.is_file():
        doc = read_json(config, what="config.json")
        named = doc.get("_name_or_path") if isinstance(doc, dict) else None
        if naming.is_hub_id(named):
            hub_id = named
    return hub_id, revision


def _map_kohya_names(adapter: Adapter, ckpt: Checkpoint, notes: list[str]) -> Adapter:
    # kohya names, and LyCORIS' on a bare model (create_lycoris: "lycoris_<path>")
    kohya = [n for n in adapter.targets if naming.is_kohya_name(n) or n.startswith("lycoris_")]
    if not kohya:
        return adapter
    resolve = kohya_resolver(ckpt)
    renamed: dict[str, Target] = {}
    for name, t in adapter.targets.items():
        new = resolve(name) if name in kohya else name
        if new in renamed:
            raise CompatibilityError(
                f"kohya modules '{renamed[new].name}' and '{name}' both map to '{new}'",
                code="ambiguous-module",
                where=str(ckpt.path),
            )
        renamed[new] = t.replace(name=new)
    notes.append(f"mapped {len(kohya)} kohya names to the base's module paths")
    return Adapter(
        targets={n: t for n, t in sorted(renamed.items())},
        base=adapter.base,
        provenance=adapter.provenance,
        metadata=adapter.metadata,
        path=adapter.path,
    )


def _fix_kinds(adapter: Adapter, ckpt: Checkpoint, notes: list[str]) -> None:
    """Linear vs Conv1D from the stored weight shape, as PEFT decides it from the layer type.

    PEFT overrides ``fan_in_fan_out`` per layer (Conv1D → True, Linear → False), so the config
    flag can be wrong for some modules; a non-square weight settles it. Square weights keep the
    source's kind.
    """
    switched = 0
    for name, t in list(adapter.targets.items()):
        if not kinds.get(t.kind).dense:
            continue
        key = ckpt.resolve(name)
        if key is None:
            continue
        shape = tuple(ckpt.shape(key))
        fits = [
            k
            for k in kinds.linear_like()
            if kinds.get(k).weight_shape(t.in_features, t.out_features) == shape
        ]
        kind = fits[0] if len(fits) == 1 else t.kind  # a square weight keeps the source's kind
        if kind != t.kind:
            adapter.targets[name] = t.replace(kind=kind)
            switched += 1
    if switched:
        notes.append(f"{switched} modules' layer kind (Linear/Conv1D) taken from the base's shapes")


def _check_embedding_copies(adapter: Adapter, ckpt: Checkpoint, notes: list[str]) -> None:
    """PEFT saves the whole base embedding with embedding targets; it must equal the base's."""
    import torch

    from ._st import open_st
    from .peft_config import WEIGHTS_NAME

    source = adapter.provenance.get("source")
    copies = source.get("embedding_copies") if isinstance(source, dict) else None
    if not copies or adapter.path is None:
        return
    p = Path(adapter.path)
    st = open_st(p / WEIGHTS_NAME if p.is_dir() else p)
    for module, key in copies.items():
        base_key = ckpt.resolve(module)
        if key not in st.tensors or base_key is None:
            continue
        ours, theirs = st.read(key), ckpt.read(base_key)
        same = ours.shape == theirs.shape and bool(
            torch.equal(ours.to(torch.float64), theirs.to(torch.float64))
        )
        if not same:
            raise CompatibilityError(
                f"the adapter's copy of '{module}' (the embedding PEFT saves with embedding "
                "targets) differs from the base's: trained or resized embeddings cannot be "
                "carried in a LoRA file",
                code="embedding-differs",
                where=str(ckpt.path),
                hint="merge the adapter with PEFT (merge_and_unload) instead",
            )
    if isinstance(source, dict):
        source["embedding_copies_checked"] = True
    notes.append("the dropped embedding copy equals the base's embedding")


def bind_to_base(
    adapter: Adapter, base: str | os.PathLike[str], notes: list[str]
) -> tuple[Adapter, dict[str, Any]]:
    """Map names and kinds onto ``base``, refuse a misfit, and bind the adapter to it."""
    from ..checkpoint import Checkpoint
    from .pipeline import PipelineCheckpoint, is_pipeline

    ckpt = PipelineCheckpoint(base) if is_pipeline(base) else Checkpoint(base)
    adapter = split_flux(adapter, ckpt, notes)
    from .peft_features import complete

    notes += complete(adapter, ckpt)  # spec 1.1: what only the base knows (a vocabulary)
    adapter = _map_kohya_names(adapter, ckpt, notes)
    _fix_kinds(adapter, ckpt, notes)
    ckpt.check_fits(adapter)  # every module present with the right shape, before any write
    _check_embedding_copies(adapter, ckpt, notes)
    hub_id, revision = base_identity(base)
    old = adapter.binding()
    if hub_id and old.hub_id and hub_id != old.hub_id:
        notes.append(f"binding's hub id changed from {old.hub_id} to the base's {hub_id}")
    adapter.base = BaseBinding(
        ckpt.fingerprint_for(adapter),
        hub_id or old.hub_id,
        revision or (old.revision if not hub_id or hub_id == old.hub_id else None),
        dict(old.extra),
    )
    info = {"path": os.fspath(base), "hub_id": hub_id, "fingerprint": adapter.base.fingerprint}
    return adapter, info


# -- convert -------------------------------------------------------------------------------------


def _materialize(adapter: Adapter, dtype: str | None) -> Adapter:
    """Load every factor (and cast it: one rounding from the stored values, f32 or wider)."""
    from ..format import torch_dtype

    targets = {}
    for name, t in adapter.targets.items():
        if not t.plain:  # spec 1.1: every part, cast alike
            parts = {
                p: x if dtype is None else x.to(torch_dtype(dtype)) for p, x in t.tensors().items()
            }
            ab = {k: parts.pop(k) for k in ("lora_A", "lora_B") if k in parts}
            targets[name] = t.replace(**ab, tensors=parts, dtype=dtype or t.dtype)
            continue
        a, b = t.lora_A, t.lora_B
        if dtype is not None and dtype != t.dtype:
            want = torch_dtype(dtype)
            a, b = a.to(want), b.to(want)
        targets[name] = t.replace(lora_A=a, lora_B=b, dtype=dtype or t.dtype)
    return Adapter(
        targets=targets,
        base=adapter.base,
        provenance=adapter.provenance,
        metadata=adapter.metadata,
        path=adapter.path,
    )


def _task_type(base: str | os.PathLike[str] | None) -> str | None:
    from ._st import read_json

    if base is None or not (Path(base) / "config.json").is_file():
        return None
    doc = read_json(Path(base) / "config.json", what="config.json")
    archs = doc.get("architectures") if isinstance(doc, dict) else None
    if isinstance(archs, list) and archs and str(archs[0]).endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str = "loratool",
    dtype: str | None = None,
    base: str | os.PathLike[str] | None = None,
    force: bool = False,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Convert the adapter at ``src`` to ``to`` at ``dst``; returns a JSON-ready report.

    ``dtype`` ("f32", "f16", "bf16") casts the factors (one rounding from the stored values).
    ``base`` (a checkpoint folder or file) is checked against the adapter before anything is
    written and becomes the binding. Refuses an existing ``dst`` unless ``force``.
    ``allow_pickle`` reads old pickled weights with the restricted unpickler (``pickled``).
    """
    if allow_pickle:
        from .pickled import holds_pickle, staged

        if holds_pickle(src):
            with staged(src) as twin:
                report = convert(twin, dst, to=to, dtype=dtype, base=base, force=force)
            report["source"] = os.fspath(src)
            report["notes"].append(
                "read from a pickle with the restricted unpickler (tensors only); "
                "the output is safetensors, so the pickle need never be read again"
            )
            return report
    from .._io import check_output

    started = time.perf_counter()
    if to not in TARGET_FORMATS:
        raise UsageError(f"unknown output format {to!r}; choose one of {', '.join(TARGET_FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if to != "gguf" and os.fspath(dst).lower().endswith(".gguf"):
        raise UsageError(
            f"output '{os.fspath(dst)}' ends in .gguf but --to is {to}", hint="pass --to gguf"
        )
    check_output(dst, force=force)
    if to == "gguf":  # refuse an unsupported base before reading anything
        from .gguf import base_hparams, check_llama

        if base is None:
            raise UsageError(
                "GGUF export needs the base model",
                code="needs-base",
                hint="pass --base BASE_MODEL_FOLDER (llama.cpp names and permutes tensors by "
                "its architecture and head counts)",
            )
        check_llama(base_hparams(base), None)
    opened = open_source(src)
    adapter = opened.adapter
    source = adapter.provenance.get("source")
    notes: list[str] = []
    if opened.format != "loratool" and isinstance(source, dict):
        notes += [str(n) for n in source.get("notes", [])]
    base_info = None
    if base is None and to in ("peft", "gguf", "diffusers"):
        kohya = [n for n in adapter.targets if naming.is_kohya_name(n)]
        if kohya:
            raise UsageError(
                f"module names like '{kohya[0]}' are kohya names, not module paths",
                code="needs-base",
                hint="pass --base BASE_MODEL_FOLDER to map them to the base's module paths",
            )
    if base is not None:
        adapter, base_info = bind_to_base(adapter, base, notes)
    elif (
        isinstance(source, dict) and source.get("embedding_copies") and opened.format != "loratool"
    ):
        notes.append("the dropped embedding copy was not compared with a base (pass --base)")
    if to in ("kohya", "gguf", "diffusers"):  # spec 1.1 §3.7: refuse, never drop a part
        from .. import kinds

        for t in adapter.targets.values():
            why = kinds.get(t.kind).refusal(to, t)
            if why is not None:
                raise UsageError(f"target '{t.name}': {why}", code="unsupported-feature")
    # GGUF folds scales into lora_b: it casts itself, so each value is rounded once.
    adapter = _materialize(adapter, DTYPES[dtype] if dtype and to != "gguf" else None)

    out = Path(dst)
    if to == "loratool":
        from ..format import save

        save(adapter, out, force=force)
    elif (
        to == "peft"
        and adapter.targets
        and all(t.kind in ("loha", "lokr") for t in adapter.targets.values())
    ):
        from .peft_lycoris import write_peft_lycoris

        write_peft_lycoris(adapter, out, force=force)
    elif to == "peft":
        from .peft_write import write_peft

        write_peft(adapter, out, force=force, task_type=_task_type(base))
    elif to == "diffusers":
        from .diffusers_write import write_diffusers

        write_diffusers(adapter, out, force=force)
    elif to == "kohya":
        from .flux import fuse_bfl
        from .kohya import write_kohya_notes

        adapter = fuse_bfl(adapter, notes)  # Flux: BFL's fused names, as kohya trains them
        notes += write_kohya_notes(adapter, out, force=force)[1]
    else:
        from .gguf import write_gguf_notes

        notes += write_gguf_notes(adapter, out, base=base, dtype=dtype, force=force)[1]

    binding = adapter.binding()
    return {
        "source": opened.path,
        "source_format": opened.format,
        "output": os.fspath(out),
        "to": to,
        "targets": len(adapter.targets),
        "parameters": adapter.total_params,
        "dtypes": [dtype] if dtype else [C.DTYPE_NAMES[d] for d in adapter.dtypes],
        "source_bytes": opened.file_bytes,
        "output_bytes": _size(out),
        "base": base_info,
        "binding": {
            "fingerprint": binding.fingerprint,
            "hub_id": binding.hub_id,
            "revision": binding.revision,
        },
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 4),
    }
