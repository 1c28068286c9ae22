"""Merges that change the checkpoint's layout (spec 1.1 §3.6.1): grown vocabularies, untied heads.

PEFT's ``modules_to_save`` copy of an embedding is the trained module alone. Two consequences
for a merged checkpoint, planned here before anything is written:

* a base whose ``lm_head`` is tied to the input embedding (``tie_word_embeddings``, no
  ``lm_head.weight`` stored) keeps, under PEFT, the *original* embedding as its output layer
  when the embedding is replaced (and the original embedding as input when only ``lm_head`` is):
  the merged checkpoint unties them, writing ``lm_head.weight`` (the base's embedding, or the
  adapter's trained copy) and ``tie_word_embeddings: false``;
* a copy with more rows than the base (``base_rows``: PEFT after ``resize_token_embeddings``)
  is written in its own shape, and every vocabulary-sized weight (the embedding and the output
  layer) must be replaced with the same rows — the resized base's other new rows are random and
  in no adapter file; ``config.json``'s ``vocab_size`` follows.

Neither can be undone from the merged checkpoint, so unmerge and ``--reversible`` refuse them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import CompatibilityError
from ..tied import HEAD, embedding_key, read_config, tied_embedding
from .inputs import Input
from .plan import Job


def tied_input(base: Checkpoint) -> str | None:
    """The input embedding's key where the base ties its output head to it, else None."""
    return tied_embedding(Path(base.path), base.entries)


def untie_keys(base: Checkpoint, inp: Input, jobs: dict[str, Job]) -> None:
    """Give a tied base's ``lm_head`` target its own (new) key, read from the embedding."""
    embed = tied_input(base)
    if embed is None:
        return
    for tname, key in inp.keys.items():
        if key == embed and tname.rsplit(".", 1)[-1] == HEAD:
            head = tname + ".weight"
            inp.keys[tname] = head
            _head_job(jobs, embed, head)


def _head_job(jobs: dict[str, Job], embed: str, head: str) -> Job:
    if head not in jobs:
        e = jobs[embed]
        jobs[head] = Job(head, e.in_dtype, e.out_dtype, e.shape, source=embed)
    return jobs[head]


def plan_vocab(base: Checkpoint, jobs: dict[str, Job]) -> None:
    """Untie a tied head whose embedding is replaced, size grown weights, refuse the rest."""
    embed = tied_input(base)
    if embed is not None and _replaced(jobs[embed]):
        _head_job(jobs, embed, HEAD + ".weight")
    grown = {}
    for job in jobs.values():
        for t, _ in job.terms:
            if (
                t.kind == "full"
                and t.fields.get("base_rows") is not None
                and job.key.endswith(".weight")
            ):
                grown[job.key] = (t, tuple(t.fields["shapes"]["weight"]))
    if not grown:
        return
    t, shape = next(iter(grown.values()))
    head = next((k for k, j in jobs.items() if j.source is not None), None)
    if head is None:
        head = base.resolve(HEAD)
    for need in (embed or embedding_key(base.entries), head):
        if need is None:
            continue
        if need not in grown or grown[need][1][0] != shape[0]:
            raise CompatibilityError(
                f"target '{t.name}' grows the vocabulary to {shape[0]} rows but '{need}' "
                "is not replaced with as many",
                code="grown-vocabulary",
                hint="the resized base's new rows are in no adapter file: train with "
                "modules_to_save covering both the embedding and lm_head",
            )
    for k, (_, s) in grown.items():
        jobs[k].new_shape = s


def refuse_shrink(inp: Input) -> None:
    """Unmerge of an adapter that grows the vocabulary: the merged rows cannot go back."""
    for t in inp.adapter.targets.values():
        if t.kind == "full" and t.fields.get("base_rows") is not None:
            raise CompatibilityError(
                f"target '{t.name}' of {inp.name} grew the vocabulary from "
                f"{t.fields['base_rows']} to {t.fields['shapes']['weight'][0]} rows: unmerge "
                "cannot shrink a merged vocabulary back",
                code="grown-vocabulary",
                hint="keep the base checkpoint; a merged grown vocabulary is not reversible",
            )


def _replaced(job: Job) -> bool:
    return any(t.kind == "full" for t, _ in job.terms)


def config_changes(jobs: Mapping[str, Job]) -> dict[str, Any]:
    """What the merged folder's config.json must say of its new layout (empty: nothing)."""
    changes: dict[str, Any] = {}
    if any(j.source is not None for j in jobs.values()):
        changes["tie_word_embeddings"] = False
    rows = {j.new_shape[0] for j in jobs.values() if j.new_shape is not None}
    if rows:
        changes["vocab_size"] = max(rows)
    return changes


def write_config(base: Checkpoint, dest: Path, changes: Mapping[str, Any]) -> bool:
    """The base's config.json with ``changes``, into the output folder; False if there is none
    (the caller copies it as usual then)."""
    config = read_config(Path(base.path))
    if not config or not changes:
        return False
    config.update(changes)
    if isinstance(config.get("text_config"), dict):  # multimodal configs nest the vocabulary
        config["text_config"].update(changes)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return True


def shard_names_of(base: Checkpoint, jobs: dict[str, Job]) -> dict[Path, list[str]]:
    """Each shard's tensors to write: the base's, and a tensor the base lacks (an untied
    ``lm_head``, vocab.py) right after the one it is read from."""
    out: dict[Path, list[str]] = {}
    for shard in base.shards:
        names: list[str] = []
        for name in base.shard_tensors[shard]:
            names.append(name)
            names += [j.key for j in jobs.values() if j.source == name]
        out[shard] = names
    return out
