"""``verify`` for the formats convert reads: what the file is, and what its reader can check.

A PEFT, kohya or diffusers file has no loratool integrity hash or spec rules; what can be
checked is its structure (the reader's rules: config against tensors, shapes, ranks, the
features refused), that every value is finite, and for kohya files the ``sshs_model_hash``
kohya recorded over the tensor data.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import FormatError
from ..format import Check, VerifyReport


def describe_source(fmt: str, source: dict[str, Any]) -> str:
    """One line saying what the file is, from the reader's provenance record."""
    if fmt == "peft":
        bits = [f"peft {source['peft_version']}" if source.get("peft_version") else "PEFT"]
        bits.append(f"r={source.get('r')}, lora_alpha={source.get('lora_alpha')}")
        if source.get("use_rslora"):
            bits.append("rsLoRA")
        if source.get("rank_pattern") or source.get("alpha_pattern"):
            bits.append(
                f"{len(source.get('rank_pattern') or {})} rank / "
                f"{len(source.get('alpha_pattern') or {})} alpha patterns"
            )
        return "PEFT folder (" + ", ".join(bits) + ")"
    if fmt == "kohya":
        module = source.get("ss_network_module", "no ss_network_module")
        return f"kohya LoRA file ({module}, dim {source.get('ss_network_dim', '?')})"
    if fmt == "diffusers":
        where = "config in header" if source.get("config_in_header") else "no config in header"
        comps = ", ".join(source.get("components", [])) or "one model"
        return f"diffusers LoRA file ({comps}; {where})"
    return fmt


def verify_source(path: str | os.PathLike[str]) -> tuple[VerifyReport, str | None]:
    """A VerifyReport for a non-loratool adapter, and its format (None if unreadable)."""
    import torch

    from .detect import open_source

    p = os.fspath(path)
    checks: list[Check] = []
    fmt = None
    try:
        opened = open_source(p)
        fmt = opened.format
        adapter = opened.adapter
        source = adapter.provenance.get("source")
        source = source if isinstance(source, dict) else {}
        checks.append(
            Check(
                "structure",
                True,
                f"{describe_source(fmt, source)}: {len(adapter.targets)} targets, "
                f"{adapter.total_params:,} parameters, "
                + ("tensors consistent" if fmt == "kohya" else "config and tensors agree"),
            )
        )
        for t in adapter.targets.values():
            for part, x in t.tensors().items():  # every part its kind names (LoHa, LoKr, …)
                if not bool(torch.isfinite(x).all()):
                    raise FormatError(
                        f"module '{t.name}' {part} contains NaN or Inf", code="non-finite", where=p
                    )
        checks.append(Check("non-finite", True, "all values finite"))
        if fmt == "kohya" and "sshs_model_hash" in source:
            from ._st import open_st

            actual = open_st(p).data_sha256()
            same = actual == source["sshs_model_hash"]
            # Advisory: tools that edit metadata or re-save leave kohya's hash stale.
            checks.append(
                Check(
                    "kohya-hash",
                    True,
                    "tensor data matches sshs_model_hash"
                    if same
                    else "tensor data differs from sshs_model_hash (re-saved after kohya hashed it?)",
                )
            )
        for note in source.get("notes", []):
            checks.append(Check("note", True, str(note)))
    except FormatError as e:
        return VerifyReport(p, checks, e), fmt
    return VerifyReport(p, checks), fmt
