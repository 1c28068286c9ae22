"""Merging an adapter trained on a quantised base: onto the original weights, or onto deq(W₄).

A QLoRA adapter learned its update against ``deq(q(W))``, not ``W``. ``merge`` by default adds it
to the original base (what people deploy) and measures how far the base it trained on was from
that one: per target, the relative weight-space error ``‖deq(q(W)) − W‖_F / ‖W‖_F``. With
``onto_quantized`` it first writes a copy of the base whose quantised layers hold ``deq(q(W))`` —
the exact weights of training, since quantising the same values is deterministic (``codec``) —
and merges onto that, so the merged model computes what the training-time model computed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UsageError
from . import codec

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..checkpoint import Checkpoint
    from ..merging import MergeReport

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def quantization_of(adapter: Adapter) -> dict[str, Any] | None:
    """The ``provenance["training"]["quantization"]`` record of an adapter, or None."""
    training = adapter.provenance.get("training") if isinstance(adapter.provenance, dict) else None
    q = training.get("quantization") if isinstance(training, dict) else None
    if not isinstance(q, dict) or q.get("scheme") not in codec.SCHEMES:
        return None
    return q


def _requantized(W: torch.Tensor, q: Mapping[str, Any]) -> torch.Tensor:
    """``deq(q(W))`` as training saw it: cast to the source dtype, quantised, dequantised, in W's dtype."""
    src = DTYPES.get(str(q.get("source_dtype")), torch.float32)
    return codec.dequantize(codec.quantize(W.to(src), str(q["scheme"])), W.dtype)


def weight_errors(ckpt: Checkpoint, adapter: Adapter, q: Mapping[str, Any]) -> dict[str, float]:
    """Per target that the quantisation covered: ``‖deq(q(W)) − W‖_F / ‖W‖_F`` (fp32)."""
    quantized = set(q.get("modules") or [])
    out: dict[str, float] = {}
    for name in adapter.targets:
        key = ckpt.resolve(name)
        if key is None or (quantized and name not in quantized):
            continue
        W = ckpt.read(key)
        diff = (_requantized(W, q).float() - W.float()).norm()
        out[name] = float(diff / W.float().norm().clamp_min(1e-30))
    return out


def write_dequantized(base: str | os.PathLike[str], q: Mapping[str, Any], dest: Path) -> None:
    """Copy the checkpoint ``base`` into the directory ``dest`` with every quantised layer's
    weight replaced by ``deq(q(W))``, one tensor at a time; the other files are copied as they are."""
    from ..checkpoint import Checkpoint
    from ..stream import SafetensorsWriter, TensorSpec, aligned_order

    ckpt = Checkpoint(base)
    keys = {k for m in q.get("modules") or [] if (k := ckpt.resolve(m)) is not None}
    dest.mkdir(parents=True, exist_ok=True)
    for shard in ckpt.shards:
        names = ckpt.shard_tensors[shard]
        specs = [TensorSpec(n, ckpt.dtype(n), ckpt.shape(n)) for n in names]
        with SafetensorsWriter(
            dest / shard.name, aligned_order(specs), ckpt.shard_metadata[shard]
        ) as w:
            for n in names:
                t = ckpt.read(n)
                w.write(n, _requantized(t, q).contiguous() if n in keys else t)
    for f in ckpt.other_files():  # config, tokenizer, ... (none for a single file)
        target = dest / f.relative_to(ckpt.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    if ckpt.index is not None:
        shutil.copy2(ckpt.path / ckpt.index_name, dest / ckpt.index_name)


def merge(
    base: str | os.PathLike[str],
    adapters: Sequence[str],
    out: str | os.PathLike[str],
    *,
    onto_quantized: bool = False,
    **options: Any,
) -> MergeReport:
    """``loratool.merging.merge`` for adapters that may have been trained on a quantised base.

    Default: merge onto ``base`` and add, to the report's warnings, how far the quantised base the
    adapter trained on was from it. ``onto_quantized``: merge onto ``deq(q(base))`` instead (a
    temporary copy beside ``out``, removed afterwards).
    """
    from ..checkpoint import Checkpoint
    from ..merging import merge as plain_merge
    from ..sources import open_adapter

    found = [(a, quantization_of(open_adapter(a).adapter)) for a in adapters]
    quantized = [(a, q) for a, q in found if q is not None]
    if not onto_quantized:
        report = plain_merge(base, list(adapters), out, **options)
        for a, q in quantized:
            adapter = open_adapter(a).adapter
            errors = weight_errors(Checkpoint(base), adapter, q)
            if errors:
                report.warnings.append(_mismatch_line(Path(a).name, q, errors))
        return report
    if not quantized:
        raise UsageError(
            "--onto-quantized: no ADAPTER was trained on a quantised base",
            code="not-quantized",
            hint="its provenance has no training.quantization record; merge without the flag",
        )
    schemes = {
        repr(sorted((k, str(v)) for k, v in q.items() if k != "bytes")) for _, q in quantized
    }
    if len(schemes) > 1:
        raise UsageError(
            "--onto-quantized: the adapters were trained on differently quantised bases",
            code="quantization-mismatch",
            hint="merge them one at a time",
        )
    q = quantized[0][1]
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.dequantized-", dir=out_path.parent))
    try:
        src = Path(base)
        staged = tmp / ("base" if src.is_dir() else src.name)
        if src.is_dir():
            write_dequantized(base, q, staged)
        else:
            write_dequantized(base, q, tmp)
        report = plain_merge(staged, list(adapters), out, **options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.base = str(base)
    report.warnings.append(
        f"merged onto dequantise({q['scheme']}) of the base: the weights the adapter trained "
        "against, not the original ones"
    )
    return report


def _mismatch_line(name: str, q: Mapping[str, Any], errors: dict[str, float]) -> str:
    worst = max(errors, key=errors.__getitem__)
    mean = sum(errors.values()) / len(errors)
    return (
        f"{name} was trained on a {q['scheme']} base: merged onto the original weights, which "
        f"differ from the quantised ones it saw by {mean:.2%} on average over {len(errors)} "
        f"targets (relative Frobenius; worst {worst} {errors[worst]:.2%}); --onto-quantized "
        "merges onto dequantise(W4) instead"
    )
