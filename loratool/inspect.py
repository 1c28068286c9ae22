"""What ``loratool inspect`` reports about an adapter, as plain data (no printing, no torch)."""

from __future__ import annotations

import os
from typing import Any

from . import constants as C
from .format import iter_targets
from .sources import Opened, open_adapter


def _integrity(opened: Opened, *, checked: bool) -> dict[str, Any]:
    """The recorded hash; with ``checked`` (``--stats`` reads the data anyway) also whether it holds."""
    doc: dict[str, Any] = {"sha256": opened.adapter.sha256, "checked": False}
    if checked and opened.header is not None:
        from .format import data_sha256

        doc.update(checked=True, ok=data_sha256(opened.header) == opened.adapter.sha256)
    return doc


def describe(path: str | os.PathLike[str], *, stats: bool = False) -> dict[str, Any]:
    """The inspect document: one JSON-ready dict (see README "inspect --json").

    Spec 1.1 fields: ``requires`` (the file's ``loratool.requires``), per target ``features``
    (always, [] for plain LoRA), and for any 1.1 target ``parts`` (tensor part → shape), a
    ``tokens`` target's ``indices`` and a grown ``full`` target's ``base_rows``.

    Reads only the header unless ``stats`` is set; with ``stats``, adds per target the exact
    ‖ΔW‖_F and effective ranks from the QR-core spectrum (never a dense B·A).
    """
    opened = open_adapter(path)
    adapter = opened.adapter
    binding = adapter.binding()
    targets: list[dict[str, Any]] = []
    for t in iter_targets(adapter):
        row: dict[str, Any] = {
            "name": t.name,
            "kind": t.kind,
            "rank": t.rank,
            "alpha": t.alpha,
            "scale_rule": t.scale_rule,
            "scale": t.scale,
            "in_features": t.in_features,
            "out_features": t.out_features,
            "dtype": C.DTYPE_NAMES.get(t.dtype, t.dtype),
            "params": t.num_params,
            "features": list(t.features),  # spec 1.1 §3.5: dora, lora_bias, bias
        }
        if not t.plain:  # spec 1.1: every stored tensor, and what the kind records
            row["parts"] = {p: list(shape) for p, shape in t.parts().items()}
            if t.kind == C.KIND_TOKENS:
                row["indices"] = list(t.fields["indices"])
            if t.fields.get("base_rows") is not None:
                row["base_rows"] = t.fields["base_rows"]
        # ‖ΔW‖ of the low-rank part; conv2d via its flattened factors, LoHa/LoKr their dense ΔW
        if stats and (t.kind in C.KINDS_10 or t.kind in C.KINDS_IMAGE):
            from .lowrank import spectrum

            sp = spectrum(t)
            row.update(
                delta_norm=sp.frobenius,
                numerical_rank=sp.numerical_rank,
                effective_rank=sp.effective_rank,
                singular_values=sp.singular_values,
            )
        targets.append(row)
    doc: dict[str, Any] = {
        "path": opened.path,
        "source_format": opened.format,
        "format_version": adapter.version if opened.format == "loratool" else None,
        "file_bytes": opened.file_bytes,
        "total_params": adapter.total_params,
        "dtypes": [C.DTYPE_NAMES.get(d, d) for d in adapter.dtypes],
        "base_model": {
            "hub_id": binding.hub_id,
            "revision": binding.revision,
            "fingerprint": binding.fingerprint,
        },
        "integrity": _integrity(opened, checked=stats),
        "provenance": adapter.provenance,
        "metadata": adapter.metadata,
        "requires": adapter.requires,  # spec 1.1 §4.1: the features and kinds a reader must know
        "num_targets": len(targets),
        "targets": targets,
    }
    return doc
