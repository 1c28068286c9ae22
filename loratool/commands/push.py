"""``loratool push``: upload an adapter, its PEFT twin and a model card to the Hub in one commit."""

from __future__ import annotations

import os
import sys

import click

from ..card import TASK_TYPES
from ..console import emit_json, info, warn


@click.command("push")
@click.argument("adapter")
@click.argument("repo_id", metavar="REPO_ID")
@click.option(
    "--private", is_flag=True, help="Create the repo private (refused if it exists public)."
)
@click.option(
    "--revision", metavar="BRANCH", help="Branch to commit to (created from main if missing)."
)
@click.option("-m", "--message", help="Commit message.")
@click.option(
    "--no-peft", is_flag=True, help="Skip adapter_config.json + adapter_model.safetensors."
)
@click.option(
    "--token",
    metavar="TOKEN",
    help="Hub token (default: $HF_TOKEN or the saved login). Never printed; prefer HF_TOKEN, "
    "command lines are visible to other users.",
)
@click.option(
    "--base-model",
    metavar="HUB_ID",
    help="The base model's Hub id; sets or overrides the one the adapter records.",
)
@click.option(
    "--task-type",
    type=click.Choice(TASK_TYPES),
    help="PEFT task type for adapter_config.json and the card (default: from the adapter).",
)
@click.option(
    "--endpoint", metavar="URL", help="Hub URL (default: $HF_ENDPOINT or huggingface.co)."
)
@click.option(
    "--base",
    type=click.Path(exists=True),
    help="A local base model, for a PEFT twin of trained biases (PEFT stores their values).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def command(
    adapter: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    message: str | None,
    no_peft: bool,
    token: str | None,
    base_model: str | None,
    task_type: str | None,
    endpoint: str | None,
    base: str | None,
    as_json: bool,
) -> None:
    """Upload ADAPTER (a loratool file or anything `convert` reads) to REPO_ID.

    One commit holds adapter.safetensors (loratool's format), the PEFT files and a README
    model card; pushing an unchanged adapter makes no commit.
    """
    if endpoint:
        # Before huggingface_hub is imported: its import-time constants (the endpoint for
        # redirects and its own side requests) then agree with the endpoint we pass.
        os.environ["HF_ENDPOINT"] = endpoint
    from ..hub import push

    report = push(
        adapter,
        repo_id,
        private=private,
        revision=revision,
        message=message,
        peft=not no_peft,
        token=token,
        base_model=base_model,
        task_type=task_type,
        endpoint=endpoint,
        progress=sys.stderr.isatty() and not as_json,
        base=base,
    )
    for w in report.warnings:
        warn(w)
    if as_json:
        emit_json(report.to_dict())
        return
    where = f"{report.repo_id}@{report.revision}"
    if report.created_repo:
        info(f"created {'private ' if report.private else ''}repo {report.repo_id}")
    if report.created_branch:
        info(f"created branch {report.revision}")
    if report.committed:
        changed = ", ".join(report.changed + [f"-{d}" for d in report.deleted]) or "no file"
        info(f"pushed {where}: commit {report.commit[:10]} ({changed})")
        info(report.commit_url)
    else:
        info(f"{where} already has this adapter (commit {report.commit[:10]}): nothing to commit")
