"""Dependencies point one way: the core imports no torch, click or rich; inspect stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GOLDEN = str(Path(__file__).resolve().parents[1] / "fixtures" / "valid" / "golden.safetensors")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_core_imports_no_heavy_or_cli_modules() -> None:
    mods = _modules_after(
        "import loratool, loratool.format, loratool.adapter, loratool.checkpoint, loratool.sources,"
        " loratool.inspect, loratool.lowrank, loratool._io; loratool.load(" + repr(GOLDEN) + ")"
    )
    for heavy in ("torch", "click", "rich", "transformers", "huggingface_hub", "peft", "numpy"):
        assert heavy not in mods, f"the core imported {heavy}"


def test_inspect_command_does_not_import_torch() -> None:
    mods = _modules_after(
        "import contextlib, io\n"
        "from loratool.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main(['inspect', {GOLDEN!r}])\n"
        f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main(['inspect', {GOLDEN!r}, '--json'])\n"
    )
    assert "torch" not in mods and "transformers" not in mods and "numpy" not in mods
