"""The house rule, checked on every top-level .py file, so the repo stays as readable as it was built.

Leaves (models, losses, data, synthetic data) import only libraries; scripts import leaves only, and use
another script only through its command line; imports stand at the top of a file (matplotlib, optional,
may wait)."""
import ast
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
LEAVES = {"unet", "resnet_cls", "losses", "data", "synth"}
LIBRARIES = {"torch", "torchvision", "numpy", "PIL"}
DEFERRABLE = {"matplotlib"}


def code_files():
    return sorted(p for p in HERE.glob("*.py") if not p.name.startswith("test_") and p.name != "conftest.py")


def imports(path):
    """(top-level module, line, at the top of the file?) of every import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(((node.module or "").split(".")[0], node.lineno, id(node) in top))
    return found


@pytest.mark.parametrize("path", code_files(), ids=lambda p: p.name)
def test_import_rule(path):
    stdlib = set(sys.stdlib_module_names)
    leaf = path.stem in LEAVES
    for module, line, at_top in imports(path):
        where = f"{path.name}:{line} imports {module}"
        assert module in stdlib or module in LIBRARIES or module in DEFERRABLE or (not leaf and module in LEAVES), \
            where + (" (a leaf imports libraries only)" if leaf else " (a script imports leaves only)")
        assert at_top or module in DEFERRABLE, where + " inside a function: imports go at the top"


def test_no_script_loads_another_by_name():
    for path in code_files():
        text = path.read_text()
        assert "__import__(" not in text and "importlib" not in text and "runpy" not in text, path.name


def test_readme_reads_in_ten_minutes():
    chars = len((HERE / "README.md").read_text())
    assert chars <= 15_000, f"README.md: {chars} characters, budget 15,000"


def test_no_reference_to_files_outside_the_repo():
    for path in [*code_files(), HERE / "README.md"]:
        assert "SPEC.md" not in path.read_text(), path.name
