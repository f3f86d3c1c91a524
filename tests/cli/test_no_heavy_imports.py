"""`llmconv --help` must stay fast: the CLI layer imports no heavy backend at import time.

(a) imports the app in a fresh interpreter and looks at sys.modules; (b) scans the source of
llmconv/cli/*.py for module-level imports of heavy modules, directly or through llmconv modules that
import them at module level (the idea of Polygraphy's tests/tools/test_no_cli_deps.py).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "llmconv"
HEAVY = ("torch", "onnx", "onnxruntime", "transformers", "optimum")
MUST_NOT_LOAD = HEAVY


def test_importing_the_app_loads_no_heavy_module():
    code = ("import json, sys; import llmconv.cli.app; "
            f"print(json.dumps([m for m in {list(MUST_NOT_LOAD)!r} if m in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_help_loads_no_heavy_module():
    code = ("import json, sys\n"
            "from llmconv.cli.app import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            f"sys.stderr.write(json.dumps([m for m in {list(MUST_NOT_LOAD)!r} if m in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "Usage" in r.stdout
    assert json.loads(r.stderr.strip().splitlines()[-1]) == []


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    package = base if _is_package(module) else base[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _is_package(module: str) -> bool:
    return (ROOT / Path(*module.split(".")) / "__init__.py").is_file()


def _top_level_imports(path: Path) -> list[tuple[int, str]]:
    """Modules imported when ``path`` is imported: module-level statements, including under if/try/with,
    but not inside functions or classes, nor under ``if TYPE_CHECKING:``."""
    module = _module_name(path)
    found: list[tuple[int, str]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node)
                found.append((node.lineno, base))
                # `from llmconv.formats import hf` imports the submodule llmconv.formats.hf too.
                found.extend((node.lineno, f"{base}.{a.name}") for a in node.names
                             if (ROOT / Path(*f"{base}.{a.name}".split("."))).with_suffix(".py").is_file()
                             or _is_package(f"{base}.{a.name}"))
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.For, ast.While)):
                visit(node.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def _module_path(module: str) -> Path | None:
    p = ROOT / Path(*module.split("."))
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def _heavy_chain(module: str, seen: dict[str, list[str] | None]) -> list[str] | None:
    """The import chain from ``module`` to a heavy module, following llmconv modules, or None."""
    if module in seen:
        return seen[module]
    seen[module] = None  # cycles: assume clean while visiting
    path = _module_path(module)
    if path is None:
        return None
    chain = None
    parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
    for _, name in [(0, p) for p in parents] + _top_level_imports(path):
        root = name.split(".")[0]
        if root in HEAVY:
            chain = [module, name]
            break
        if root == "llmconv" and name != module:
            sub = _heavy_chain(name, seen)
            if sub:
                chain = [module, *sub]
                break
    seen[module] = chain
    return chain


CLI_MODULES = sorted((PACKAGE / "cli").glob("*.py"))


@pytest.mark.parametrize("path", CLI_MODULES, ids=[p.name for p in CLI_MODULES])
def test_cli_source_has_no_module_level_heavy_imports(path):
    direct = [(line, name) for line, name in _top_level_imports(path) if name.split(".")[0] in HEAVY]
    assert direct == [], f"{path.name}: import these inside the command function: {direct}"
    chain = _heavy_chain(_module_name(path), {})
    assert chain is None, f"{path.name} imports a heavy module at import time: {' -> '.join(chain)}"


def test_the_scan_finds_what_it_should():
    """The scanner itself: it must flag llmconv modules that do import torch at module level."""
    assert _heavy_chain("llmconv.checkpoint", {}) == ["llmconv.checkpoint", "torch"]
    chain = _heavy_chain("llmconv.formats.safetensors", {})
    assert chain is not None and chain[-1] in HEAVY
    assert _heavy_chain("llmconv.errors", {}) is None
    assert _heavy_chain("llmconv.io", {}) is None
