"""Sentence embeddings and retrieval scores: pairs data, pooling per the encoder's config, recall@k, MRR.

An encoder is a transformers model plus the sentence-transformers files beside it
(``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``,
``config_sentence_transformers.json``). ``SentenceConfig`` reads them and computes what
sentence-transformers computes — the same pooling (cls / max / mean / mean_sqrt_len / lasttoken,
concatenated in its order when several are set), the same L2 ``Normalize``, the same
``max_seq_length`` truncation and similarity function — without depending on that package. A
model without ``modules.json`` gets mean pooling and normalisation, the common choice.

Retrieval evaluation follows sentence-transformers' ``InformationRetrievalEvaluator`` on a pairs
file: the corpus is every distinct positive, a query's one relevant passage is its own positive.
Ranks are pessimistic on ties (a passage scoring exactly as the relevant one counts as ranked
above it), so an encoder that maps everything to one vector scores badly, not randomly well.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CompatibilityError, HubError, TrainingError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .adapter import Adapter

# sentence-transformers' pooling keys, in the order its Pooling module concatenates them.
POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
SUPPORTED_POOLING = ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")
SIMILARITIES = ("cosine", "dot")
KS = (1, 5, 10)
PAIRS_HINT = (
    'each line must be {"query": str, "positive": str} with an optional "negative" (a string '
    "or a list of strings); fix or remove the lines listed"
)

Progress = Callable[[int, int], None]  # (done, total) sentences encoded


# -- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One jsonl row: a query, its relevant passage and any hard negatives, with its line number."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    line: int = 0


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key in ("query", "positive"):
        if key not in row:
            return f"missing '{key}'"
        if not isinstance(row[key], str) or not row[key].strip():
            return f"'{key}' must be a non-empty string"
    if "negative" in row and "negatives" in row:
        return "give 'negative' or 'negatives', not both"
    neg = row.get("negative", row.get("negatives"))
    if neg is not None:
        items = neg if isinstance(neg, list) else [neg]
        if not items or not all(isinstance(n, str) and n.strip() for n in items):
            return "'negative' must be a non-empty string or a list of them"
    return None


def read_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Every row of a ``{"query", "positive"[, "negative"]}`` jsonl file, or an error naming them.

    ``negative`` (or ``negatives``) is one hard negative or a list of them; other keys, such as
    ``id``, are ignored, as ``loratool train`` does for causal-LM data. Blank lines are allowed;
    every other bad line (not JSON, not an object, a missing or empty field) is reported with its
    line number in one ``BadDataError`` and nothing is returned: no row is skipped silently.
    """
    from .training.data import BadDataError, jsonl_rows

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"data file '{p}' does not exist", code="no-data", hint="check the path")
    pairs: list[Pair] = []
    problems: list[tuple[int, str]] = []
    with p.open("rb") as f:
        for number, row in jsonl_rows(f, problems):
            problem = _row_problem(row)
            if problem:
                problems.append((number, problem))
                continue
            neg = row.get("negative", row.get("negatives"))
            negatives = tuple(neg) if isinstance(neg, list) else (neg,) if neg is not None else ()
            pairs.append(Pair(row["query"], row["positive"], negatives, number))
    if problems:
        error = BadDataError(str(p), problems)
        error.hint = PAIRS_HINT
        raise error
    if not pairs:
        raise TrainingError(
            "the data file holds no pairs", code="bad-data", where=str(p), hint=PAIRS_HINT
        )
    return pairs


# -- the encoder's sentence-transformers configuration -------------------------------------------


@dataclass(frozen=True)
class SentenceConfig:
    """How token states become one sentence vector, and how vectors are compared."""

    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = True
    max_seq_length: int | None = None
    similarity: str = "cosine"
    source: str = "default (no modules.json)"

    def to_json(self) -> dict[str, Any]:
        return {
            "pooling": list(self.pooling),
            "normalize": self.normalize,
            "max_seq_length": self.max_seq_length,
            "similarity": self.similarity,
            "source": self.source,
        }


def _model_file(
    model: str | os.PathLike[str], name: str, revision: str | None = None
) -> Path | None:
    """``name`` inside a local model dir, or from the Hub cache for a Hub id; None when absent."""
    local = Path(model)
    if local.is_dir():
        path = local / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(model), name, revision=revision))
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        return None  # offline and never fetched: the model itself will fail to load if missing
    except Exception as e:  # network, auth, missing repo
        raise HubError(f"cannot read {name} of '{model}': {e}", where=str(model)) from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path.name}: {e}", code="bad-model", where=str(path)) from e


def sentence_config(model: str | os.PathLike[str], revision: str | None = None) -> SentenceConfig:
    """The encoder's pooling, normalisation, length and similarity from its sentence-transformers files.

    Refuses a ``modules.json`` with modules loratool cannot reproduce (e.g. a ``Dense``
    projection), rather than silently computing other embeddings than sentence-transformers does.
    """
    modules_path = _model_file(model, "modules.json", revision)
    max_len = None
    bert_cfg = _model_file(model, "sentence_bert_config.json", revision)
    if bert_cfg is not None:
        raw = _read_json(bert_cfg).get("max_seq_length")
        max_len = int(raw) if isinstance(raw, int) and raw > 0 else None
    similarity = "cosine"
    st_cfg = _model_file(model, "config_sentence_transformers.json", revision)
    if st_cfg is not None:
        similarity = _read_json(st_cfg).get("similarity_fn_name") or "cosine"
        if similarity not in SIMILARITIES:
            raise UsageError(
                f"similarity function '{similarity}' is not supported",
                code="unsupported-encoder",
                where=str(model),
                hint=f"supported: {', '.join(SIMILARITIES)}",
            )
    if modules_path is None:
        return SentenceConfig(max_seq_length=max_len, similarity=similarity)

    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise UsageError("modules.json is not a list", code="bad-model", where=str(modules_path))
    pooling: tuple[str, ...] = ()
    normalize = False
    for entry in modules:
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1] if isinstance(entry, dict) else ""
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            sub = str(entry.get("path") or "")
            cfg_path = _model_file(model, f"{sub}/config.json" if sub else "config.json", revision)
            if cfg_path is None:
                raise UsageError(
                    f"pooling config '{sub}/config.json' is missing",
                    code="bad-model",
                    where=str(model),
                )
            pooling = _pooling_modes(_read_json(cfg_path), where=str(cfg_path))
        else:
            raise UsageError(
                f"sentence-transformers module '{entry.get('type') if isinstance(entry, dict) else entry}'"
                " is not supported",
                code="unsupported-encoder",
                where=str(modules_path),
                hint="loratool computes Transformer + Pooling (+ Normalize) encoders",
            )
    if not pooling:
        raise UsageError(
            "modules.json has no Pooling module",
            code="unsupported-encoder",
            where=str(modules_path),
        )
    return SentenceConfig(pooling, normalize, max_len, similarity, source="modules.json")


def _pooling_modes(cfg: Any, *, where: str) -> tuple[str, ...]:
    if not isinstance(cfg, dict):
        raise UsageError("pooling config is not an object", code="bad-model", where=where)
    modes = tuple(mode for mode, key in POOLING_KEYS.items() if cfg.get(key))
    if not modes and isinstance(cfg.get("pooling_mode"), str):
        modes = (cfg["pooling_mode"].removesuffix("_tokens"),)
    bad = [m for m in modes if m not in SUPPORTED_POOLING]
    if bad or not modes:
        raise UsageError(
            f"pooling mode {', '.join(bad) or '(none)'} is not supported",
            code="unsupported-encoder",
            where=where,
            hint=f"supported: {', '.join(SUPPORTED_POOLING)}",
        )
    return modes


# -- encoding ------------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, mask: torch.Tensor, config: SentenceConfig) -> torch.Tensor:
    """Sentence vectors ``[batch, dim·modes]`` from token states ``[batch, seq, dim]``, in fp32."""
    import torch
    import torch.nn.functional as F

    h = hidden.float()
    m = mask.to(h.dtype).unsqueeze(-1)  # [batch, seq, 1]
    parts = []
    for mode in config.pooling:
        if mode == "cls":
            parts.append(h[:, 0])
        elif mode == "max":
            parts.append(h.masked_fill(m == 0, -1e9).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len"):
            total = (h * m).sum(dim=1)
            count = m.sum(dim=1).clamp(min=1e-9)
            parts.append(total / (count if mode == "mean" else count.sqrt()))
        elif mode == "lasttoken":
            # The last non-padding token of each row, for left or right padding alike.
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (positions * mask.long()).argmax(dim=1)
            parts.append(h[torch.arange(h.shape[0], device=h.device), last])
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return F.normalize(out, p=2, dim=-1) if config.normalize else out


def similarity(a: torch.Tensor, b: torch.Tensor, config: SentenceConfig) -> torch.Tensor:
    """``[len(a), len(b)]`` scores: cosine (sentence-transformers' default) or dot product."""
    import torch.nn.functional as F

    if config.similarity == "cosine" and not config.normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a @ b.T


@dataclass
class Encoder:
    """A loaded sentence encoder: the transformers model, its tokenizer and its sentence config."""

    model: nn.Module
    tokenizer: Any
    config: SentenceConfig
    name: str
    max_length: int

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Any]:
        return dict(
            self.tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=max_length or self.max_length,
                return_tensors="pt",
            )
        )

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        """Sentence vectors of a tokenized batch (with gradients if enabled)."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        out = self.model(**batch)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return pool(hidden, batch["attention_mask"], self.config)


def load_encoder(
    model: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    revision: str | None = None,
    with_pooler: bool = False,
) -> Encoder:
    """A transformers encoder from a local directory or a Hub id, in fp32 and eval mode.

    BERT-style models are loaded without their pooler head: sentence-transformers does not use
    it, so a LoRA target ``dense`` must not adapt it (it would get no gradient). ``with_pooler``
    keeps it, for adapters that target it.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name = os.fspath(model)
    local = Path(name).is_dir()
    if not local and (Path(name).exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)):
        raise UsageError(
            f"model '{name}' is neither a model directory nor a Hub id",
            code="no-model",
            hint="give a directory with config.json and weights, or owner/name",
        )
    config = sentence_config(name, revision)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "weights of the pooler not used" is the point, not news
    hf_logging.disable_progress_bar()  # the command draws its own progress
    try:
        where: dict[str, Any] = {"local_files_only": True} if local else {"revision": revision}
        try:
            net = AutoModel.from_pretrained(
                name, dtype=torch.float32, add_pooling_layer=with_pooler, **where
            )
        except TypeError:  # an architecture without a pooler switch
            net = AutoModel.from_pretrained(name, dtype=torch.float32, **where)
        tokenizer = AutoTokenizer.from_pretrained(name, **where)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not local and isinstance(e, OSError):
            raise HubError(f"cannot load model '{name}': {first}", where=name) from None
        raise UsageError(
            f"cannot load model '{name}': {first}",
            code="bad-model",
            hint="a local Hugging Face model directory, or a Hub id (cached, or reachable)",
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if device:
        net.to(device)
    net.eval()
    limits = [
        n
        for n in (
            config.max_seq_length,
            getattr(tokenizer, "model_max_length", None),
            getattr(net.config, "max_position_embeddings", None),
        )
        if isinstance(n, int) and 0 < n < 1_000_000
    ]
    return Encoder(net, tokenizer, config, name, min(limits) if limits else 512)


def encode(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``[len(texts), dim]`` fp32 sentence vectors on the CPU, in the order of ``texts``.

    Texts are batched longest first, as sentence-transformers does, so padding stays small.
    """
    import torch

    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}", code="bad-batch-size")
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunks: list[torch.Tensor] = []
    was_training = encoder.model.training
    encoder.model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = encoder.tokenize([texts[i] for i in idx], max_length)
                chunks.append(encoder.embed(batch).float().cpu())
                if progress:
                    progress(min(start + batch_size, len(order)), len(order))
    finally:
        encoder.model.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    vectors = torch.cat(chunks)
    out = torch.empty_like(vectors)
    out[torch.tensor(order)] = vectors
    return out


# -- applying an adapter in memory ---------------------------------------------------------------


def _resolve(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The module ``name`` is, tolerating a wrapper prefix on either side (``bert.``, ``0.``)."""
    if name in modules:
        return name
    hits = [m for m in modules if m and (m.endswith("." + name) or name.endswith("." + m))]
    return hits[0] if len(hits) == 1 else None


def apply_adapter(model: nn.Module, adapter: Adapter) -> int:
    """Inject LoRA layers for ``adapter``'s targets and load its factors: base + adapter, exactly.

    Target names may carry or lack a wrapper prefix the model does not (an adapter trained on
    ``BertForSequenceClassification`` names ``bert.encoder...``, ``BertModel`` has
    ``encoder...``); a unique match is used. Targets with different rank, alpha or scale rule are
    injected group by group. Raises ``CompatibilityError`` when a target is not a module of
    ``model`` or its shape differs. Returns the number of adapted modules.
    """
    from .adapter import Adapter as AdapterClass
    from .lora import kind_of, inject, load_factors

    modules = dict(model.named_modules())
    targets = []
    for t in adapter.targets.values():
        name = _resolve(t.name, modules)
        if name is None:
            raise CompatibilityError(
                f"target '{t.name}' is not a module of the model",
                code="missing-module",
                hint="is this the encoder the adapter was trained on?",
            )
        module = modules[name]
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if weight is not None else ()
        if kind_of(module) != t.kind or shape != tuple(t.weight_shape):
            raise CompatibilityError(
                f"target '{t.name}' expects a {t.kind} weight {list(t.weight_shape)} but the "
                f"model has {type(module).__name__} {list(shape)}",
                code="shape-mismatch",
                hint="the adapter was made for a different base model",
            )
        # Renamed targets take their tensors along: a lazy loader would look up the new name.
        targets.append(
            t if name == t.name else t.replace(name=name, lora_A=t.lora_A, lora_B=t.lora_B)
        )
    groups: dict[tuple[int, float, str], list[str]] = {}
    for t in targets:
        groups.setdefault((t.rank, t.alpha, t.scale_rule), []).append(t.name)
    for (rank, alpha, rule), names in groups.items():
        inject(model, targets=names, rank=rank, alpha=alpha, rslora=rule == "rslora")
    load_factors(model, AdapterClass(targets={t.name: t for t in targets}))
    return len(targets)


# -- metrics -------------------------------------------------------------------------------------


@dataclass
class RetrievalMetrics:
    """Recall@k and MRR over ``queries`` queries against a corpus of ``corpus`` passages."""

    recall: dict[int, float]
    mrr: float
    mrr_at_10: float
    queries: int
    corpus: int
    ranks: list[int] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            **{f"recall@{k}": self.recall[k] for k in sorted(self.recall)},
            "mrr": self.mrr,
            "mrr@10": self.mrr_at_10,
            "queries": self.queries,
            "corpus": self.corpus,
        }


def ranks_of(scores: torch.Tensor, relevant: Sequence[int]) -> list[int]:
    """1-based rank of each row's relevant column in ``scores`` [queries, corpus], ties counted above."""
    import torch

    rel = torch.as_tensor(list(relevant), dtype=torch.long)
    target = scores.gather(1, rel.unsqueeze(1))  # [queries, 1]
    # Every other column scoring >= the relevant one ranks above it (pessimistic on ties).
    at_least = (scores >= target).sum(dim=1) - 1
    return [int(r) + 1 for r in at_least]


def metrics_from_ranks(
    ranks: Sequence[int], corpus: int, ks: Sequence[int] = KS
) -> RetrievalMetrics:
    """Recall@k (share of queries whose passage ranks <= k), MRR (mean 1/rank) and MRR@10."""
    n = len(ranks)
    if n == 0:
        raise UsageError("no queries to evaluate", code="bad-data")
    recall = {k: sum(r <= k for r in ranks) / n for k in ks}
    mrr = math.fsum(1.0 / r for r in ranks) / n
    mrr10 = math.fsum(1.0 / r for r in ranks if r <= 10) / n
    return RetrievalMetrics(recall, mrr, mrr10, n, corpus, list(ranks))


def corpus_of(pairs: Sequence[Pair]) -> tuple[list[str], list[int]]:
    """(distinct positives in first-seen order, index of each pair's positive in them)."""
    index: dict[str, int] = {}
    relevant = []
    for p in pairs:
        relevant.append(index.setdefault(p.positive, len(index)))
    return list(index), relevant


def evaluate(
    encoder: Encoder,
    pairs: Sequence[Pair],
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> RetrievalMetrics:
    """Retrieval metrics of ``encoder`` on ``pairs``: corpus = distinct positives."""
    corpus, relevant = corpus_of(pairs)
    queries = [p.query for p in pairs]
    total = len(queries) + len(corpus)

    def step(offset: int) -> Progress | None:
        if progress is None:
            return None
        return lambda done, _n: progress(offset + done, total)

    q = encode(encoder, queries, batch_size=batch_size, progress=step(0))
    c = encode(encoder, corpus, batch_size=batch_size, progress=step(len(queries)))
    return metrics_from_ranks(ranks_of(similarity(q, c, encoder.config), relevant), len(corpus))


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

    from .sources import open_adapter

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
        from .lora import hub_id_for

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
