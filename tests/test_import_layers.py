"""The library's modules import each other one way: the library never imports the CLI, and the
file formats (checkpoint -> baked -> export -> loading) have no import cycle, lazy imports included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "certify"


def _imports(path: Path) -> set[str]:
    """Every certify module ``path`` imports, at the top or inside a function."""
    module = "certify." + ".".join(path.relative_to(PKG).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("certify"):
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("certify"))
    return out


LIBRARY = [p for p in PKG.rglob("*.py") if "cli" not in p.relative_to(PKG).parts]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PKG)))
def test_the_library_never_imports_the_cli(path):
    assert not any(m.startswith("certify.cli") for m in _imports(path))


@pytest.mark.parametrize("module,forbidden", [
    ("checkpoint.py", ("certify.baked", "certify.export", "certify.loading", "certify.onnx_graph")),
    ("baked.py", ("certify.export", "certify.loading", "certify.onnx_graph")),
    ("export.py", ("certify.loading",)),
])
def test_file_formats_import_downwards_only(module, forbidden):
    found = _imports(PKG / module)
    assert not [m for m in found if m.startswith(forbidden)]


def test_training_and_certifying_load_no_cli_module():
    code = ("import sys, certify.train, certify.certificates, certify.audit, certify.loading\n"
            "print([m for m in sys.modules if m.startswith('certify.cli')])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
