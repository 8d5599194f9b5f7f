"""The package's shape: every subpackage says what it owns and may import, and the imports keep
to it (read from the source, lazy imports included), with no import circles between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "audio_llm"
SUBPACKAGES = ("audio", "model", "data", "pack", "train", "evaluation", "planning", "demo", "cli")
# What each part may import from the rest of audio_llm (its docstring says the same in words).
ALLOWED = {
    "errors": set(),
    "files": set(),
    "dist": set(),
    "config": {"errors"},
    "audio": {"errors"},
    "model": {"audio", "config", "dist", "errors"},
    "data": {"audio", "config", "dist", "errors", "model"},
    "pack": {"audio", "data", "errors", "files", "model"},
    "evaluation": {"audio", "config", "data", "dist", "errors", "files", "model"},
    "planning": {"audio", "config", "errors", "model"},
    "train": {
        "audio",
        "config",
        "data",
        "dist",
        "errors",
        "evaluation",
        "files",
        "model",
        "planning",
    },
    "demo": {"audio", "config", "dist", "errors", "files", "model", "planning", "pack"},
    "cli": {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()} - {"cli"},
}
# data/ reads the prompt layout and the encoder's identity, never the nn.Module that uses them
DATA_MAY_USE_FROM_MODEL = {
    "audio_llm.model.prompts",
    "audio_llm.model.rows",
    "audio_llm.model.encoder",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """audio_llm modules `name` imports anywhere in its source (top level or inside functions)."""
    path, found = MODULES[name], set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("audio_llm.") and target != name:
                found.add(target)
    return found


def _part(module: str) -> str:
    return module.split(".")[1]


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_every_subpackage_says_what_it_owns_and_may_import(sub):
    doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 20, f"audio_llm/{sub}/__init__.py needs a docstring"
    if sub != "cli":
        assert "import" in doc, f"audio_llm/{sub}'s docstring does not say what it may import"


def test_imports_point_only_where_each_docstring_allows():
    wrong = []
    for name in sorted(MODULES):
        if name == "audio_llm":
            continue
        part = _part(name)
        for target in sorted(_imports(name)):
            other = _part(target)
            if other == part or target == "audio_llm":
                continue
            if other not in ALLOWED[part]:
                wrong.append(f"{name} imports {target}")
            elif part == "data" and other == "model" and target not in DATA_MAY_USE_FROM_MODEL:
                wrong.append(f"{name} imports {target} (data/ never uses the model itself)")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_back_through_others():
    graph = {name: _imports(name) for name in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles:\n" + "\n".join(cycles)
