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


# -- the direction of imports -------------------------------------------------------------------
# cli → commands → operations → format → adapter → constants/errors (STYLE.md, issue 11). Each
# top-level part of the package has a layer; a module may import its own layer or a lower one,
# never a higher one, and the parts of one layer import each other without a circle. Imports under
# ``if TYPE_CHECKING:`` are annotations only and do not count; imports inside functions do.

PACKAGE = Path(__file__).resolve().parents[1] / "loratool"
LAYERS: dict[str, int] = {
    "constants": 0,
    "errors": 0,
    "dtypes": 1,
    "kinds": 1,
    "naturalsort": 1,
    "native": 1,
    "_io": 1,
    "leftovers": 1,
    "limits": 1,
    "unpickle": 1,
    "tied": 1,
    "target": 2,
    "adapter": 2,
    "format": 3,
    "checkpoint": 4,
    "layouts": 4,
    "stream": 4,
    "sources": 4,
    # operations
    "inspect": 5,
    "plot": 5,
    "card": 5,
    "convert": 5,
    "hub": 5,
    "merging": 5,
    "lowrank": 5,
    "lora": 5,
    "training": 5,
    "quant": 5,
    "retrieval": 5,
    "serving": 5,
    # the command line
    "console": 6,
    "commands": 6,
    "cli": 7,
    "__main__": 8,
}


def _part(module: str) -> str | None:
    """``loratool.x.y`` → ``x`` (``loratool`` itself → None: the package façade re-exports)."""
    parts = module.split(".")
    ok = len(parts) > 1 and parts[0] == "loratool" and parts[1] != "__init__"
    return parts[1] if ok else None


def _imports(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    pkg = list(rel.parts[:-1])  # the package a relative import starts from
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("loratool"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
                if node.module is None:  # from . import x, y
                    found.update(f"{mod}.{a.name}" for a in node.names)
                    continue
            else:
                mod = node.module or ""
            if mod.startswith("loratool"):
                found.add(mod)
    return found


def _parts() -> set[str]:
    parts = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.parent.name for p in PACKAGE.glob("*/__init__.py")
    }
    return parts - {"__init__"}


def _graph() -> dict[str, set[str]]:
    parts = _parts()  # a name from the package façade (``from loratool import x``) is no edge
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        src = _part(".".join(rel.parts))
        if src is None:
            continue
        for target in _imports(path):
            dst = _part(target)
            if dst in parts and dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def test_every_part_of_the_package_has_a_layer() -> None:
    assert _parts() - set(LAYERS) == set(), "give the new module a layer in LAYERS"


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})"
        for src, dsts in _graph().items()
        for dst in dsts
        if LAYERS.get(dst, 99) > LAYERS.get(src, -1)
    ]
    assert upward == []


def test_no_import_circle_between_parts() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_private_name_is_imported_from_another_module() -> None:
    """Inside loratool, a name another module needs is internal API with a plain name."""
    import ast

    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0 and not (node.module or "").startswith("loratool"):
                continue  # another library's names are that library's business
            bad += [
                f"{path.relative_to(PACKAGE)}: {a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    assert bad == []


def test_no_module_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert long == {}
