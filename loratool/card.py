"""The model card (README.md) that ``push`` uploads: Hub YAML front matter, target table, usage.

The front matter follows what PEFT writes and what the Hub reads (shared/notes/hub.md §4):
``base_model`` is a Hub id — never a local path, which the Hub rejects at commit time —,
``base_model_relation: adapter`` puts the repo in the base's model tree, ``library_name``
chooses the Hub's library integration and ``tags`` carry ``base_model:adapter:<id>`` as PEFT
does. Everything in the card derives from the adapter and the push options only (no dates, no
host names), so pushing the same adapter twice renders the same bytes and makes no commit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import constants as C
from .adapter import Adapter, Target

# PEFT task types -> the Hub pipeline tag and the transformers class that loads the base.
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
TASK_TYPES = tuple(PIPELINE_TAGS)

# huggingface_hub's repo-id rule (validate_repo_id): an optional namespace and a name, each of
# [\w.-] without "--" or "..", not starting or ending with "-" or ".", at most 96 characters.
_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID_RE = re.compile(rf"^(?:{_PART}/)?{_PART}$")
_MAX_TRAINING_ROWS = 60
_MAX_CELL = 200


def is_hub_id(value: str | None) -> bool:
    """Whether ``value`` can name a model on the Hub (and so is not a filesystem path)."""
    return (
        isinstance(value, str)
        and bool(_HUB_ID_RE.match(value))
        and ".." not in value
        and "--" not in value
    )


def guess_task_type(adapter: Adapter) -> str | None:
    """The PEFT task type recorded in the provenance, else one inferred from the module names.

    Inference covers the layouts loratool's fixtures and most Hub adapters use: decoder blocks
    (``model.layers.N`` as in Llama/Mistral/Qwen, ``transformer.h.N`` as in GPT-2) are causal
    LMs; BERT-style ``encoder.layer.N`` sentence encoders are feature extractors. Anything else
    stays unknown rather than guessed.
    """
    prov = adapter.provenance
    for section in ("training", "source", "peft"):
        value = prov.get(section)
        if isinstance(value, Mapping):
            task = value.get("task_type")
            if isinstance(task, str) and task in PIPELINE_TAGS:
                return task
    names = list(adapter.targets)
    if names and all(re.match(r"^(model\.)?layers\.\d+\.", n) for n in names):
        return "CAUSAL_LM"
    if names and all(re.match(r"^transformer\.h\.\d+\.", n) for n in names):
        return "CAUSAL_LM"
    if names and all(
        re.match(r"^(\d+\.auto_model\.|bert\.)?encoder\.layer\.\d+\.", n) for n in names
    ):
        return "FEATURE_EXTRACTION"
    return None


@dataclass
class CardFiles:
    """The files a push puts beside the card, for the card's Files section."""

    adapter: str  # our format
    peft_config: str | None = None
    peft_weights: str | None = None


def front_matter(
    *, base_model: str | None, library_name: str, task_type: str | None, peft: bool
) -> dict[str, Any]:
    """The YAML metadata block as an ordered dict (keys in the order the Hub's own cards use)."""
    if base_model is not None and not is_hub_id(base_model):
        raise ValueError(f"base_model must be a Hub id, got {base_model!r}")
    meta: dict[str, Any] = {}
    if base_model is not None:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "adapter"
    meta["library_name"] = library_name
    if task_type in PIPELINE_TAGS:
        meta["pipeline_tag"] = PIPELINE_TAGS[task_type]
    tags = ["lora", "loratool"]
    if peft:
        tags.append("peft")
    if base_model is not None:
        tags.append(f"base_model:adapter:{base_model}")
    meta["tags"] = tags
    return meta


def render_card(
    adapter: Adapter,
    *,
    repo_id: str,
    base_model: str | None,
    library_name: str,
    task_type: str | None,
    files: CardFiles,
    revision: str | None = None,
    sha256: str | None = None,
    loratool_version: str | None = None,
) -> str:
    """The whole README.md: front matter, summary, targets, training, files and usage."""
    import yaml

    peft = files.peft_config is not None
    meta = front_matter(
        base_model=base_model, library_name=library_name, task_type=task_type, peft=peft
    )
    yaml_text = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    name = repo_id.split("/")[-1]
    binding = adapter.binding()
    targets = [adapter.targets[k] for k in sorted(adapter.targets)]
    ranks = sorted({t.rank for t in targets})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"

    out: list[str] = ["---", yaml_text.rstrip("\n"), "---", "", f"# {name}", ""]
    base_link = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else None
    out.append(
        f"A LoRA adapter{' for ' + base_link if base_link else ''}: {len(targets)} target modules, "
        f"rank {rank_text}, {adapter.total_params:,} parameters "
        f"({', '.join(C.DTYPE_NAMES.get(d, d) for d in adapter.dtypes)})."
    )
    out.append("")
    if base_model is None:
        out += [
            "> **Base model not named.** This adapter's file does not record the Hub id of its base",
            "> model, so this card does not link one. It binds to its base by fingerprint "
            f"`{binding.fingerprint}`",
            "> (the names and shapes of the weights it changes): `loratool merge` refuses a base",
            "> that does not match. To link the base on the Hub, push again with "
            "`--base-model ORG/NAME`.",
            "",
        ]

    out += ["## Adapter", "", "| | |", "|---|---|"]
    if base_model:
        rev = f" @ `{binding.revision}`" if binding.revision else ""
        out.append(f"| base model | `{base_model}`{rev} |")
    out.append(f"| base fingerprint | `{binding.fingerprint}` |")
    if task_type:
        out.append(f"| task | `{task_type}` |")
    out.append(f"| targets | {len(targets)} |")
    out.append(f"| parameters | {adapter.total_params:,} |")
    rules = sorted({t.scale_rule for t in targets})
    out.append(
        "| scaling | "
        + ", ".join("α/√r (rsLoRA)" if r == C.SCALE_RSLORA else "α/r" for r in rules)
        + " |"
    )
    if sha256:
        out.append(f"| tensor data sha256 | `{sha256}` |")
    out.append("")

    out += ["## Targets", ""]
    out.append(
        "Every target module with its rank and alpha (ΔW = scale · B·A); modules that differ"
        " only in a layer index share a row."
    )
    out += [
        "",
        "| target | kind | rank | alpha | scale | in → out | dtype | params |",
        "|---|---|--:|--:|--:|---|---|--:|",
    ]
    for label, group in _group_targets(targets):
        t = group[0]
        scale = f"{t.scale:.4g}" + (" (rs)" if t.scale_rule == C.SCALE_RSLORA else "")
        out.append(
            f"| `{label}` | {t.kind} | {t.rank} | {t.alpha:g} | {scale} | "
            f"{t.in_features} → {t.out_features} | {C.DTYPE_NAMES.get(t.dtype, t.dtype)} | "
            f"{sum(x.num_params for x in group):,} |"
        )
    out.append("")

    training = adapter.provenance.get("training")
    out += ["## Training", ""]
    if isinstance(training, Mapping) and training:
        rows = _flatten(training)
        out += ["| setting | value |", "|---|---|"]
        for key, value in rows[:_MAX_TRAINING_ROWS]:
            out.append(f"| {_cell(key)} | {_cell(value)} |")
        if len(rows) > _MAX_TRAINING_ROWS:
            out.append(f"| … | {len(rows) - _MAX_TRAINING_ROWS} more settings in the file |")
        out.append("")
        out.append(
            "From the `training` section of the adapter's provenance "
            "(`loratool inspect --json` shows all of it)."
        )
    else:
        source = adapter.provenance.get("source")
        if isinstance(source, Mapping) and source.get("format"):
            out.append(
                f"Converted from a {source['format']} adapter; the file records no training run."
            )
        else:
            out.append("The adapter file records no training run.")
    out.append("")

    out += ["## Files", "", "| file | what |", "|---|---|"]
    out.append(
        f"| `{files.adapter}` | the adapter in loratool's format: one safetensors file with rank, "
        "alpha and the base binding in its header, and an integrity hash |"
    )
    if files.peft_config and files.peft_weights:
        out.append(f"| `{files.peft_weights}` | the same weights for PEFT |")
        out.append(
            f"| `{files.peft_config}` | the PEFT `LoraConfig` (ranks and alphas per module) |"
        )
    out.append("")

    ref = f"@{revision}" if revision and revision != "main" else ""
    out += ["## Usage", "", "### loratool", "", "```bash"]
    out.append(f"loratool pull {repo_id}{ref} -o {name}.safetensors   # download and verify")
    out.append(f"loratool inspect hf://{repo_id}{ref}/{files.adapter}   # header only, no download")
    out += ["```", "", "```python", "import loratool", ""]
    out.append(f'report = loratool.pull("{repo_id}{ref}", out="{name}.safetensors")')
    out += [
        "adapter = report.adapter  # targets with rank, alpha and lazily loaded factors",
        "```",
        "",
    ]
    if files.peft_config:
        auto = AUTO_CLASSES.get(task_type or "", "AutoModelForCausalLM")
        base_arg = (
            f'"{base_model}"'
            if base_model
            else '"BASE_MODEL"  # the base model this adapter was trained on'
        )
        rev_arg = f', revision="{revision}"' if revision and revision != "main" else ""
        out += [
            "### PEFT",
            "",
            "```python",
            f"from transformers import {auto}",
            "from peft import PeftModel",
            "",
        ]
        out.append(f"base = {auto}.from_pretrained({base_arg})")
        out.append(f'model = PeftModel.from_pretrained(base, "{repo_id}"{rev_arg})')
        out += ["```", ""]
    if loratool_version:
        out += ["## Framework versions", "", f"- loratool {loratool_version}", ""]
    return "\n".join(out)


def _group_targets(targets: list[Target]) -> list[tuple[str, list[Target]]]:
    """Rows of the target table: targets equal but for one layer index collapse to one row."""
    groups: dict[tuple[Any, ...], list[tuple[int | None, Target]]] = {}
    order: list[tuple[Any, ...]] = []
    for t in targets:
        parts = t.name.split(".")
        numeric = [i for i, p in enumerate(parts) if p.isdigit()]
        if len(numeric) == 1:
            i = numeric[0]
            pattern = ".".join([*parts[:i], "{}", *parts[i + 1 :]])
            index: int | None = int(parts[i])
        else:
            pattern, index = t.name, None
        key = (
            pattern,
            t.kind,
            t.rank,
            t.alpha,
            t.scale_rule,
            t.in_features,
            t.out_features,
            t.dtype,
        )
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append((index, t))
    rows: list[tuple[str, list[Target]]] = []
    for key in order:
        members = groups[key]
        ts = [t for _, t in members]
        if len(members) == 1 or members[0][0] is None:
            rows.extend((t.name, [t]) for t in ts)
            continue
        indices = sorted(i for i, _ in members if i is not None)
        rows.append((str(key[0]).replace("{}", "{" + _ranges(indices) + "}"), ts))
    rows.sort(key=lambda row: _natural(row[0]))
    return rows


def _ranges(values: list[int]) -> str:
    spans: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(spans)


def _natural(name: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key in doc:
        value = doc[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not prefix:
            rows.extend(_flatten(value, name + "."))
        elif isinstance(value, str):
            rows.append((name, value))
        else:
            rows.append((name, json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)))
    return rows


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell: one line, pipes escaped, bounded length."""
    one = " ".join(str(text).split()).replace("|", "\\|")
    return one if len(one) <= _MAX_CELL else one[: _MAX_CELL - 1] + "…"
