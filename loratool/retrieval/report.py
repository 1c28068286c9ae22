"""``eval-retrieval``'s library: the base encoder's metrics and the adapted one's, side by side."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from .adapt import apply_adapter
from .encoder import Progress, load_encoder
from .metrics import RetrievalMetrics, evaluate
from .pairs import read_pairs
from .sentence import SentenceConfig


@dataclass
class RetrievalReport:
    """``eval-retrieval``'s result: the base encoder's metrics and, with an adapter, the adapted."""

    model: str
    data: str
    config: SentenceConfig
    base: RetrievalMetrics | None
    adapted: RetrievalMetrics | None = None
    adapter: str | None = None
    adapter_format: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        any_metrics = self.base or self.adapted
        assert any_metrics is not None
        doc: dict[str, Any] = {
            "model": self.model,
            "data": self.data,
            "queries": any_metrics.queries,
            "corpus": any_metrics.corpus,
            "sentence_config": self.config.to_json(),
            "base": _metrics_doc(self.base),
            "adapter": None,
        }
        if self.adapted is not None:
            doc["adapter"] = {
                "path": self.adapter,
                "format": self.adapter_format,
                **_metrics_doc(self.adapted),
            }
            if self.base is not None:
                doc["delta"] = {
                    k: self.adapted.to_json()[k] - v for k, v in _metrics_doc(self.base).items()
                }
        return doc


def _metrics_doc(m: RetrievalMetrics | None) -> dict[str, Any]:
    if m is None:
        return {}
    return {k: v for k, v in m.to_json().items() if k not in ("queries", "corpus")}


def evaluate_retrieval(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    adapter: str | os.PathLike[str] | None = None,
    include_base: bool = True,
    batch_size: int = 64,
    device: str | None = None,
    revision: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> RetrievalReport:
    """Recall@1/5/10 and MRR of ``model`` on the pairs in ``data``, then with ``adapter`` applied.

    The adapter (any format ``loratool convert`` reads) is injected in memory with its factors
    loaded, so the numbers are those of base + adapter exactly, without writing a merged copy.
    ``progress`` receives (phase, done, total) with phase "base" or "adapter".
    """
    import torch

    from ..sources import open_adapter

    pairs = read_pairs(data)
    opened = open_adapter(adapter) if adapter is not None else None
    if opened is None and not include_base:
        raise UsageError("nothing to evaluate: no adapter and the base skipped", code="bad-value")
    targets = opened.adapter.targets if opened else {}
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = load_encoder(
        model,
        device=device,
        revision=revision,
        with_pooler=any(name.startswith("pooler.") for name in targets),
    )
    report = RetrievalReport(os.fspath(model), os.fspath(data), encoder.config, None)

    def phase(name: str) -> Progress | None:
        if progress is None:
            return None
        return lambda done, total: progress(name, done, total)

    if include_base:
        report.base = evaluate(encoder, pairs, batch_size=batch_size, progress=phase("base"))
    if opened is not None:
        from ..lora import hub_id_for

        bound = opened.adapter.base.hub_id if opened.adapter.base else None
        here = hub_id_for(model)
        if bound and here and bound != here:
            report.warnings.append(
                f"the adapter was trained on {bound}, not {here}; its shapes fit, applying it"
            )
        apply_adapter(encoder.model, opened.adapter)
        encoder.model.to(device)
        report.adapter, report.adapter_format = opened.path, opened.format
        report.adapted = evaluate(encoder, pairs, batch_size=batch_size, progress=phase("adapter"))
    return report
