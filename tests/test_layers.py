"""The ground floor: edgeprop/ (bundle, trainer, rules, planner, ...) imports numpy and the
standard library only, and nothing from the folders above it (exporters, runtimes, devices,
targets, cli), not even inside a function. Engines reach the core through edgeprop.engine."""
import ast
import sys
from pathlib import Path

from conftest import ROOT

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

CORE = ROOT / "edgeprop"
# Every top-level folder mapped into the edgeprop namespace (pyproject's package-dir) sits
# above the core: exporters, runtimes, devices, targets, cli, and whatever is added later.
PACKAGE_DIR = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
ABOVE = tuple(sorted(name.split(".")[1] for name in PACKAGE_DIR))
ALLOWED = {"numpy"}  # besides the standard library
ENTRY_POINT = CORE / "__main__.py"  # `python -m edgeprop`: the program's entry, which calls edgeprop.cli


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import anywhere in the tree, functions included."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
                # `from . import x` may import a submodule x: judge each name as a module
                names = [f"{name}.{alias.name}" for alias in node.names] if not node.module else [name]
            else:
                names = [node.module]
            found += [(node.lineno, n) for n in names]
    return found


def upward(name: str) -> bool:
    """Does importing `name` from the core break the layering?"""
    top = name.split(".")[0]
    if top == "edgeprop":
        return len(name.split(".")) > 1 and name.split(".")[1] in ABOVE
    return top not in sys.stdlib_module_names and top not in ALLOWED and top != "__future__"


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    return [f"line {line}: {name}" for line, name in imported(ast.parse(source), module, is_package)
            if upward(name)]


def test_the_core_imports_nothing_from_above_it():
    assert {"exporters", "runtimes", "devices", "targets", "cli"} <= set(ABOVE)
    problems = {}
    for path in sorted(CORE.rglob("*.py")):
        if path == ENTRY_POINT:
            continue
        found = upward_imports(path.read_text(), module_name(path), path.name == "__init__.py")
        if found:
            problems[str(path.relative_to(ROOT))] = found
    assert not problems, problems


def test_the_check_catches_an_upward_import_even_inside_a_function():
    source = ("import json\n"
              "import numpy as np\n"
              "from .bundle import Bundle\n"
              "from ..errors import EdgepropError\n"
              "def train(bundle):\n"
              "    from edgeprop.runtimes import get_engine\n"
              "    from ..devices import load_profile\n"
              "    from .. import cli\n"
              "    import torch\n")
    assert upward_imports(source, "edgeprop.rules.noprop_dt") == [
        "line 6: edgeprop.runtimes", "line 7: edgeprop.devices", "line 8: edgeprop.cli", "line 9: torch"]
    assert upward_imports("from . import trainer, memory\n", "edgeprop", is_package=True) == []
