"""``loratool pull``: download an adapter through the Hugging Face cache, verify it, write it."""

from __future__ import annotations

import os
import sys

import click

from ..console import emit_json, info


@click.command("pull")
@click.argument("repo", metavar="REPO_ID[@REVISION]")
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False),
    help="Where to write the adapter (default: ./NAME.safetensors, NAME from the repo id).",
)
@click.option("--filename", metavar="NAME", help="Which file of the repo to pull.")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
@click.option("--token", metavar="TOKEN", help="Hub token (default: $HF_TOKEN or the saved login).")
@click.option(
    "--endpoint", metavar="URL", help="Hub URL (default: $HF_ENDPOINT or huggingface.co)."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Give up a request after this long without a byte (default: $LORATOOL_HUB_TIMEOUT "
    "or 30); failed downloads are retried a few times first.",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Read pickled weights (adapter_model.bin, kohya .pt/.ckpt) with the restricted "
    "unpickler (tensors and plain containers only); the output is safetensors.",
)
@click.option(
    "--base",
    type=click.Path(exists=True),
    help="A local base model: binds a converted adapter to it, as convert --base (PEFT "
    "trainable tokens and trained biases need it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def command(
    repo: str,
    out: str | None,
    filename: str | None,
    force: bool,
    token: str | None,
    endpoint: str | None,
    timeout: float | None,
    allow_pickle: bool,
    base: str | None,
    as_json: bool,
) -> None:
    """Download REPO_ID's adapter and write it in loratool's format, verified.

    Picks adapter.safetensors, else the PEFT pair, else the repo's only .safetensors file
    (PEFT and kohya files are converted). Works offline from the cache with HF_HUB_OFFLINE=1.
    """
    if endpoint:
        os.environ["HF_ENDPOINT"] = endpoint  # before huggingface_hub's import; see push
    from ..hub import pull, split_ref

    repo_id, _ = split_ref(repo)
    if out is None:
        # Named after the repo (a validated Hub id), never after a file name the repo lists.
        out = f"{repo_id.split('/')[-1]}.safetensors"
    report = pull(
        repo,
        out=out,
        filename=filename,
        token=token,
        endpoint=endpoint,
        force=force,
        progress=sys.stderr.isatty() and not as_json,
        timeout=timeout,
        allow_pickle=allow_pickle,
        base=base,
    )
    if as_json:
        emit_json(report.to_dict())
        return
    how = "verified" if not report.converted else f"converted from {report.source_format}"
    if report.from_pickle:
        how += " (a pickle, read with the restricted unpickler)"
    src = " (from the cache, offline)" if report.offline else ""
    info(
        f"pulled {report.repo_id}@{report.revision} (commit {report.commit[:10]}){src}: "
        f"{report.num_targets} targets, {report.total_params:,} parameters, {how} -> {report.out}"
    )
