"""No function or method in audio_llm/ is longer than 80 lines, from its `def` to its last line
(docstring included, decorators not): a longer one does several things and is split by concern."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "audio_llm"
MAX_LINES = 80


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[int, str, int]]:
    """(line, qualified name, length) of every function in `source` longer than `limit` lines,
    methods and nested functions included."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                length = child.end_lineno - child.lineno + 1
                if length > limit:
                    found.append((child.lineno, name, length))
                visit(child, f"{name}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_the_count_runs_from_def_to_the_last_line_and_names_methods():
    body = "".join(f"    x{i} = {i}\n" for i in range(79))
    method = "".join(f"        x{i} = {i}\n" for i in range(80))
    source = f"@decorator\ndef fits():\n{body}\n\nclass A:\n    def over(self):\n{method}"
    assert long_functions(source) == [(85, "A.over", 81)]  # fits: 80 lines, the decorator apart
    assert long_functions(source, limit=79)[0] == (2, "fits", 80)


def test_no_function_in_the_package_is_over_80_lines():
    offenders = [
        f"audio_llm/{path.relative_to(PACKAGE)}:{line} {name} is {length} lines"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name, length in long_functions(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"over {MAX_LINES} lines, split by concern:\n" + "\n".join(offenders)
