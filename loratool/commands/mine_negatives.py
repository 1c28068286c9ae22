"""``loratool mine-negatives``: add hard negatives, mined by a sentence encoder, to a pairs file."""

from __future__ import annotations

import json

import click

from ..console import emit_json, info, warn


@click.command("mine-negatives")
@click.option("--model", required=True, help="Encoder that mines: a local directory or a Hub id.")
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help='jsonl of {"query", "positive"[, "negative"]}; the corpus is every distinct positive.',
)
@click.option("-o", "--output", required=True, help="jsonl to write: the pairs with negatives.")
@click.option("-k", "k", type=int, default=1, show_default=True, help="Negatives to add a pair.")
@click.option(
    "--skip",
    type=int,
    default=0,
    show_default=True,
    help="Pass over this many of the most similar non-relevant passages first.",
)
@click.option(
    "--margin",
    type=float,
    help="Drop candidates scoring above sim(query, positive) − MARGIN (likely false negatives).",
)
@click.option("--adapter", help="Mine with the model plus this adapter instead of the base.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Texts per forward.")
@click.option("--revision", help="Hub revision of --model.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
def command(
    model: str,
    data: str,
    output: str,
    k: int,
    skip: int,
    margin: float | None,
    adapter: str | None,
    batch_size: int,
    revision: str | None,
    device: str,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Give every pair of --data its K most similar passages that are not its answer.

    The encoder (the base model by default, as the adapter will start from it) ranks every
    distinct positive of the file for each query; the best-ranked passages
    that are not that query's positive (nor another answer to the same query, nor the query
    itself) become its "negative" list, after any it already had. The output holds query,
    positive and negative; other keys of the input are not copied. Feed it to
    `loratool train --task embedding`.

    \b
    loratool mine-negatives --model ./minilm --data train.jsonl -o train-hard.jsonl -k 1
    loratool train --task embedding --model ./minilm --data train-hard.jsonl -o docs.safetensors
    """
    from .._io import atomic_write, check_output
    from ..errors import UsageError
    from ..retrieval import apply_adapter, load_encoder, mine_negatives, read_pairs
    from ..retrieval.mine import check_settings
    from ..sources import open_adapter

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}", code="bad-value")
    check_settings(k=k, skip=skip, margin=margin)
    check_output(output, force=force)  # before the model loads
    pairs = read_pairs(data)
    encoder = load_encoder(model, device=None if device == "auto" else device, revision=revision)
    if adapter is not None:
        apply_adapter(encoder.model, open_adapter(adapter).adapter)
    mined, report = mine_negatives(
        encoder, pairs, k=k, skip=skip, margin=margin, batch_size=batch_size
    )
    lines = []
    for p in mined:
        row: dict[str, object] = {"query": p.query, "positive": p.positive}
        if p.negatives:
            row["negative"] = list(p.negatives)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write(output, ["".join(lines).encode()], force=force)
    if report.short:
        warn(f"{report.short} of {report.pairs} pairs got fewer than {k} negatives")
    if as_json:
        emit_json({"output": output, **report.to_json()})
    elif not quiet:
        info(
            f"{report.added} negatives for {report.pairs} pairs from {report.corpus} passages "
            f"(mean rank {report.mean_rank:.1f}; the miner ranks the positive first for "
            f"{report.positive_top1:.1%} of queries) -> {output}"
        )
