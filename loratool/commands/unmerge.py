"""``loratool unmerge``: take the adapters of the last merge back out of a checkpoint."""

from __future__ import annotations

import click

from .merge import all_option, device_option, json_option, output_option, run


@click.command("unmerge")
@click.argument("merged", type=click.Path())
@click.argument("adapters", nargs=-1, required=True)
@output_option
@device_option
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT; subtract adapters that the merge record does not list (weight 1).",
)
@json_option
@all_option
def command(
    merged: str,
    adapters: tuple[str, ...],
    out: str,
    device: str,
    force: bool,
    as_json_flag: bool,
    all_rows: bool,
) -> None:
    """Subtract ADAPTERS from the checkpoint MERGED (made by `loratool merge`) into OUT.

    The merge record in MERGED's metadata must list exactly these adapters; their weights and
    the original dtypes come from it. With the merge's reversible sidecar beside the weights the
    base comes back bit for bit, checked against the SHA-256 the merge recorded.
    """
    from ..merging import unmerge

    run(
        "unmerge",
        lambda bar: unmerge(merged, list(adapters), out, device=device, force=force, progress=bar),
        as_json_flag=as_json_flag,
        all_rows=all_rows,
    )
