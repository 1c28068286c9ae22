"""Open the adapters a run uses (a path or ``hf://``) and check each against the loaded model.

``resolve`` reads any format ``convert`` reads (through ``sources.open_adapter``), and Hub ids
through the Hugging Face cache (``hub.pull`` without an output: downloaded once, verified).
``check_fits`` is the in-memory twin of ``Checkpoint.check_fits``: every target must name a module
of the model of the same kind and weight shape, and the adapter's recorded base fingerprint
(spec §4.3) must equal the one computed from the model's shapes, before anything is changed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, fingerprint
from ..errors import CompatibilityError, UsageError

if TYPE_CHECKING:
    from torch import nn

HF = "hf://"


def resolve(spec: str | os.PathLike[str]) -> Adapter:
    """The adapter at a path (any format ``convert`` reads) or ``hf://REPO[@REV][/FILE]``."""
    text = os.fspath(spec)
    if text.startswith(HF):
        from ..hub import parse_hf_uri, pull

        if text[len(HF) :].count("/") == 1:  # hf://OWNER/NAME[@REV]: the repo's files pick
            return pull(text[len(HF) :], out=None).adapter
        repo_id, revision, filename = parse_hf_uri(text)  # hf://OWNER/NAME[@REV]/FILE
        return pull(repo_id, revision=revision, out=None, filename=filename).adapter
    from ..sources import open_adapter

    if not os.path.exists(text):
        raise UsageError(
            f"no adapter at '{text}'",
            code="not-a-file",
            hint="a loratool, PEFT, kohya or GGUF adapter, or hf://OWNER/NAME",
        )
    return open_adapter(text).adapter


def parse_weighted(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> (path, weight); a trailing ``:number`` is the weight (default 1)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass  # a ':' inside the path (hf://), not a weight
    return spec, 1.0


def parse_named(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path); a bare path is named after its file stem."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        stem = os.path.basename(path.rstrip("/"))
        name = stem.split(".", 1)[0] or stem
    check_name(name)
    return name, path


def check_name(name: str) -> None:
    """Adapter names are what clients send as ``model``: short, printable, no spaces."""
    if not name or len(name) > 128 or not all(c.isalnum() or c in "-_.:/@" for c in name):
        raise UsageError(
            f"'{name}' is not a usable adapter name",
            code="bad-adapter-name",
            hint="letters, digits and - _ . : / @ only, at most 128 characters",
        )


def _weight_shape(module: Any) -> tuple[int, ...] | None:
    w = getattr(module, "weight", None)
    shape = getattr(w, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def check_fits(model: nn.Module, adapter: Adapter, *, where: str | None = None) -> None:
    """Raise ``CompatibilityError`` unless every target fits ``model`` and the fingerprints match."""
    from ..lora import LoraLayer, kind_of

    pairs: list[tuple[str, tuple[int, ...]]] = []
    for t in sorted(adapter.targets.values(), key=lambda t: t.name):
        try:
            module = model.get_submodule(t.name)
        except AttributeError:
            raise CompatibilityError(
                f"target '{t.name}' has no module in the base model",
                code="missing-module",
                where=where,
                hint="is this the base model the adapter was trained on?",
            ) from None
        inner = getattr(module, "base", None)  # a LoraLayer or a MultiLora wrapper
        if isinstance(module, LoraLayer) or hasattr(module, "lora_slots"):
            assert inner is not None
            module = inner
        shape = _weight_shape(module)
        if kind_of(module) != t.kind or shape != tuple(t.weight_shape):
            raise CompatibilityError(
                f"target '{t.name}' expects a {t.kind} of weight shape {list(t.weight_shape)} "
                f"but the base has a {type(module).__name__} of shape {list(shape or ())}",
                code="shape-mismatch",
                where=where,
                hint="the adapter was made for a different base model",
            )
        pairs.append((t.weight_name, shape))
    recorded = adapter.base.fingerprint if adapter.base is not None else None
    if recorded is not None and recorded != fingerprint(pairs):
        raise CompatibilityError(
            "the base's fingerprint differs from the adapter's binding",
            code="fingerprint-mismatch",
            where=where,
            hint="the adapter was made for a different base model",
        )
