"""``loratool verify``: every spec rule plus the integrity hash; exit 0 only when all hold.

Files in the other formats loratool reads (PEFT, kohya, diffusers) get the checks their readers
can make: structure, config against tensors, finite values (and kohya's own hash).
"""

from __future__ import annotations

import click

from ..console import emit_json, info


@click.command("verify")
@click.argument("path")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the report as one JSON document on stdout."
)
def command(path: str, as_json: bool) -> None:
    """Check PATH against spec rules 1–22 (spec §6) and its SHA-256 integrity hash.

    PEFT folders, kohya and diffusers files are checked as far as their format allows.
    """
    from ..format import verify

    report = verify(path)
    fmt = None
    if report.error is not None and report.error.code in ("not-loratool", "not-a-file"):
        from ..convert.check import verify_source

        other, fmt = verify_source(path)
        # A file no other reader recognises keeps its spec verdict (rule 10, `not-loratool`).
        if (
            other.error is None
            or other.error.code != "unknown-format"
            or report.error.code != "not-loratool"
        ):
            report = other
    if as_json:
        doc = {
            "path": report.path,
            "ok": report.ok,
            "checks": [{"rule": c.rule, "ok": c.ok, "detail": c.detail} for c in report.checks],
            "error": None
            if report.error is None
            else {"code": report.error.code, "message": report.error.message},
        }
        if fmt is not None:
            doc = {
                "path": doc["path"],
                "format": fmt,
                **{k: v for k, v in doc.items() if k != "path"},
            }
        emit_json(doc)
    else:
        if fmt is not None:
            info(f"{report.path}: {fmt} (not a loratool file; checked what its format allows)")
        for c in report.checks:
            info(f"  ok  {c.rule}: {c.detail}")
    if report.error is not None:
        raise report.error
