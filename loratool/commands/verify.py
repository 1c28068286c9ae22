"""``loratool verify``: every spec rule plus the integrity hash; exit 0 only when all hold."""

from __future__ import annotations

import click

from ..console import emit_json, info


@click.command("verify")
@click.argument("path")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the report as one JSON document on stdout."
)
def command(path: str, as_json: bool) -> None:
    """Check PATH against spec rules 1–22 (spec §6) and its SHA-256 integrity hash."""
    from ..format import verify

    report = verify(path)
    if as_json:
        doc = {
            "path": report.path,
            "ok": report.ok,
            "checks": [{"rule": c.rule, "ok": c.ok, "detail": c.detail} for c in report.checks],
            "error": None
            if report.error is None
            else {"code": report.error.code, "message": report.error.message},
        }
        emit_json(doc)
    else:
        for c in report.checks:
            info(f"  ok  {c.rule}: {c.detail}")
    if report.error is not None:
        raise report.error
