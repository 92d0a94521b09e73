"""The house rule, checked on every top-level .py file, so the repo stays as readable as it was built.

Leaves (models, losses, data, synthetic data) import only libraries; scripts import leaves only, and use
another script only through its command line; imports stand at the top of a file (matplotlib, optional,
may wait). One thing per line: the rules below are the ones nanoGPT's and Pytorch-UNet's train.py
keep without trying (no line budgets: a budget on lines rewards packing them)."""
import ast
import io
import sys
import tokenize
from pathlib import Path

import pytest

HERE = Path(__file__).parent
LEAVES = {"unet", "resnet_cls", "losses", "data", "synth"}
LIBRARIES = {"torch", "torchvision", "numpy", "PIL"}
DEFERRABLE = {"matplotlib"}
# the design card's files: the two-stage system a reader reads in one sitting
CARD = ("unet.py", "resnet_cls.py", "losses.py", "data.py", "train_masker.py", "train_classifier.py",
        "evaluate.py")
# a budget on code, not on lines: 14,072 code tokens before the robustness fixes (+2,200), the
# mask modes that limit what the classifier sees (+700) and the holdout, calibration and TTA
# (+1,000); 16,500 was asked before those
CARD_TOKENS = 20_300
NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}


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


def docstring_lines(tree):
    """Line numbers of every module, class and function docstring."""
    lines = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        first = node.body[0] if node.body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            if isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_tokens(path):
    """(code tokens, lines that hold code) of a file: a docstring is one token, comments are free."""
    text = path.read_text()
    docs = docstring_lines(ast.parse(text))
    tokens = 0
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type in NOT_CODE:
            continue
        in_docstring = token.start[0] in docs
        if in_docstring and token.type != tokenize.STRING:
            continue
        tokens += 1
        last = token.start[0] if in_docstring else token.end[0]
        lines.update(range(token.start[0], last + 1))
    return tokens, len(lines)


@pytest.mark.parametrize("path", code_files(), ids=lambda p: p.name)
def test_lines_within_100_columns(path):
    wide = [i for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 100]
    assert not wide, f"{path.name}: lines over 100 columns: {wide}"


@pytest.mark.parametrize("path", code_files(), ids=lambda p: p.name)
def test_one_thing_per_line(path):
    text = path.read_text()
    tree = ast.parse(text)
    found = []
    in_comprehension = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            in_comprehension.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, (ast.IfExp, ast.BoolOp)):
            found.append(f"line {node.lineno}: a conditional used as a statement (use a plain if)")
        if isinstance(node, ast.IfExp):
            if any(isinstance(part, ast.IfExp) for part in (node.test, node.body, node.orelse)):
                found.append(f"line {node.lineno}: a nested conditional expression")
        if isinstance(node, ast.NamedExpr) and id(node) not in in_comprehension:
            found.append(f"line {node.lineno}: a walrus outside a comprehension")
    docs = docstring_lines(tree)
    for i, line in enumerate(text.splitlines(), 1):
        if line.rstrip().endswith("\\") and i not in docs:
            found.append(f"line {i}: a backslash continuation")
    assert not found, f"{path.name}: " + "; ".join(found)


@pytest.mark.parametrize("path", code_files(), ids=lambda p: p.name)
def test_functions_fit_on_a_screen(path):
    tree = ast.parse(path.read_text())
    long = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        limit = 100 if node.name in ("main", "parse_args") else 50
        length = node.end_lineno - node.lineno + 1
        if length > limit:
            long.append(f"{node.name} {length} lines (at most {limit})")
    assert not long, f"{path.name}: " + "; ".join(long)


@pytest.mark.parametrize("name", CARD)
def test_card_file_reads_one_thing_per_line(name):
    tokens, lines = code_tokens(HERE / name)
    assert tokens / lines <= 10.5, f"{name}: {tokens / lines:.1f} code tokens per code line (at most 10.5)"


def test_card_as_a_whole_is_light_and_small():
    counts = [code_tokens(HERE / name) for name in CARD]
    tokens = sum(t for t, _ in counts)
    lines = sum(n for _, n in counts)
    assert tokens / lines <= 9.5, f"design card: {tokens / lines:.2f} code tokens per code line (at most 9.5)"
    assert tokens <= CARD_TOKENS, f"design card: {tokens} code tokens (at most {CARD_TOKENS:,})"


def test_readme_file_table_counts_the_lines_there_are():
    """The README's reader's path gives each file's length: a stale count misleads the reader."""
    rows = [line for line in (HERE / "README.md").read_text().splitlines() if line.startswith("| `")]
    checked = 0
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        names = [name for name in cells[0].split("`") if name.endswith(".py")]
        if not names or not cells[1].isdigit():
            continue
        lines = sum(len((HERE / name).read_text().splitlines()) for name in names)
        assert int(cells[1]) == lines, f"README: {', '.join(names)} has {lines} lines, the table says {cells[1]}"
        checked += 1
    assert checked >= 10, f"README: only {checked} rows of the file table found"
