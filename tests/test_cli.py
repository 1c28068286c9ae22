"""CLI contract: exit codes, one-line errors on stderr, one JSON document on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from loratool.cli import COMMANDS, cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
GOLDEN = str(FIXTURES / "valid" / "golden.safetensors")
MIXED = str(FIXTURES / "valid" / "mixed.safetensors")


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args))


def test_inspect_prints_summary_and_table() -> None:
    r = run("inspect", MIXED)
    assert r.exit_code == 0, r.output
    for text in (
        "loratool v1.0",
        "model.layers.0.self_attn.q_proj",
        "(rs)",
        "conv1d",
        "embedding",
        "sha256",
    ):
        assert text in r.stdout
    assert r.stderr == ""


def test_inspect_json_is_one_document_on_stdout() -> None:
    r = run("inspect", MIXED, "--json")
    assert r.exit_code == 0 and r.stderr == ""
    doc = json.loads(r.stdout)
    for key in ("format_version", "total_params", "file_bytes", "base_model", "targets"):
        assert key in doc
    assert doc["format_version"] == "1.0"
    assert doc["file_bytes"] == Path(MIXED).stat().st_size
    assert doc["total_params"] == sum(
        t["rank"] * (t["in_features"] + t["out_features"]) for t in doc["targets"]
    )
    row = {t["name"]: t for t in doc["targets"]}["model.layers.0.mlp.up_proj"]
    assert row["scale_rule"] == "rslora" and row["dtype"] == "bf16"
    assert row["scale"] == pytest.approx(12.0 / 6**0.5)
    for t in doc["targets"]:
        assert set(t) >= {"name", "rank", "alpha", "scale", "in_features", "out_features", "dtype"}


def test_inspect_stats_are_exact() -> None:
    import loratool

    r = run("inspect", GOLDEN, "--json", "--stats")
    assert r.exit_code == 0
    (row,) = json.loads(r.stdout)["targets"]
    t = loratool.load(GOLDEN).targets[row["name"]]
    dense = t.delta().double()
    assert row["delta_norm"] == pytest.approx(float(dense.norm()), rel=1e-6)
    import torch

    sv = torch.linalg.svdvals(dense)
    assert row["singular_values"] == pytest.approx(
        [float(x) for x in sv[: t.rank]], rel=1e-6, abs=1e-9
    )
    assert row["numerical_rank"] == 2 and 1.0 <= row["effective_rank"] <= 2.0


@pytest.mark.parametrize("name", sorted(MANIFEST["invalid"]))
def test_verify_exit_code_and_one_line_error(name: str) -> None:
    r = run("verify", str(FIXTURES / "invalid" / name))
    code = MANIFEST["invalid"][name]["code"]
    assert r.exit_code == 3
    lines = r.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error[")]
    assert len(errors) == 1 and errors[0].startswith(f"error[{code}]: ") and name in errors[0]
    assert all(line.startswith(("  ok  ", "error[", "hint: ")) for line in lines), lines
    assert r.stdout == ""


@pytest.mark.parametrize("name", MANIFEST["valid"])
def test_verify_valid_exits_zero(name: str) -> None:
    r = run("verify", str(FIXTURES / "valid" / name), "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and {c["rule"] for c in doc["checks"]} >= {
        "header",
        "integrity",
        "canonical",
    }


def test_inspect_errors_have_hint_and_code() -> None:
    r = run("inspect", str(FIXTURES / "invalid" / "01-pickle.safetensors"))
    assert r.exit_code == 3
    assert r.stderr.splitlines()[0].startswith("error[pickle]:")
    assert r.stderr.splitlines()[1].startswith("hint: ")
    r = run("inspect", "/nonexistent/adapter.safetensors")
    assert r.exit_code == 3 and "no such file" in r.stderr


def test_usage_errors_exit_2() -> None:
    assert run("inspect").exit_code == 2
    assert run("inspect", GOLDEN, "--no-such-flag").exit_code == 2
    assert run("no-such-command").exit_code == 2


def test_help_lists_commands_and_exit_codes() -> None:
    r = run("--help")
    assert r.exit_code == 0
    assert "inspect" in r.stdout and "verify" in r.stdout and "130 interrupted" in r.stdout


def test_every_registered_command_imports() -> None:
    import importlib
    import importlib.util

    for name, (module, _help) in COMMANDS.items():
        if importlib.util.find_spec(f"loratool.commands.{module}") is None:
            continue  # not built yet: the group hides it
        command = importlib.import_module(f"loratool.commands.{module}").command
        assert command.name == name
        assert run(name, "--help").exit_code == 0


def test_readme_command_table_matches_the_cli() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in cli.list_commands(None):  # type: ignore[arg-type]
        assert f"`loratool {name}" in readme, f"README does not document `loratool {name}`"


def test_python_dash_m_works() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loratool", "inspect", GOLDEN, "--json"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and json.loads(out.stdout)["num_targets"] == 1


def test_inspect_stats_checks_integrity() -> None:
    bad = run(
        "inspect", str(FIXTURES / "invalid" / "21-integrity.safetensors"), "--stats", "--json"
    )
    good = run("inspect", GOLDEN, "--stats", "--json")
    assert json.loads(bad.stdout)["integrity"] == {
        "sha256": json.loads(bad.stdout)["integrity"]["sha256"],
        "checked": True,
        "ok": False,
    }
    assert json.loads(good.stdout)["integrity"]["ok"] is True
    assert json.loads(run("inspect", GOLDEN, "--json").stdout)["integrity"]["checked"] is False


def test_inspect_table_is_in_natural_order_and_cut_unless_all(tmp_path: Path) -> None:
    import torch

    import loratool

    names = [f"model.layers.{i}.mlp.down_proj" for i in (10, 2, 1, 30, 0, *range(3, 10))]
    names += [f"model.layers.{i}.mlp.down_proj" for i in range(11, 30)]
    targets = [loratool.Target.from_factors(n, torch.ones(2, 4), torch.ones(3, 2)) for n in names]
    path = tmp_path / "many.safetensors"
    loratool.Adapter.from_targets(targets).save(path)

    def listed(output: str) -> list[int]:
        return [int(line.split(".")[2]) for line in output.splitlines() if "down_proj" in line]

    r = run("inspect", str(path))
    assert r.exit_code == 0, r.output
    assert listed(r.stdout) == list(range(24))  # layers.2 before layers.10, first 24 rows
    assert "… 7 more targets (linear; rank 2); --all to see every row" in r.stdout
    r = run("inspect", str(path), "--all")
    assert listed(r.stdout) == list(range(31)) and "more targets" not in r.stdout
    doc = json.loads(run("inspect", str(path), "--json").stdout)
    assert len(doc["targets"]) == 31  # --json always has every target


@pytest.mark.parametrize("preset", [None, "2"])
def test_main_tunes_the_collector_and_openblas_for_one_command(preset: str | None) -> None:
    """main(): one OpenBLAS thread unless the user set one; a larger collector threshold while
    the command runs, restored after; everything frozen before the interpreter's exit walk."""
    probe = (
        "import atexit, gc, os\n"
        "from loratool import cli\n"
        "before = gc.get_threshold()\n"
        "seen = []\n"
        "cli.cli.callback = lambda: seen.append(gc.get_threshold()[0])\n"
        "def report():\n"
        "    print(os.environ['OPENBLAS_NUM_THREADS'], seen[0], gc.get_threshold() == before,\n"
        "          gc.get_freeze_count() > 1000)\n"
        "atexit.register(report)\n"
        "cli.main(['inspect', '--help'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()
    assert out[-1].split() == [preset or "1", "50000", "True", "True"]
