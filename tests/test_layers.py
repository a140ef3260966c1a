"""The import rule of ARCHITECTURE.md, checked on the source of every installed module.

A module imports only from its own layer or below (at module level and inside functions
alike), and never a private name (``_x``) or a private module (``memjax.pkg._mod``) of
another package; ``memjax._checks`` and ``memjax._io`` are shared by every layer. The layer
table is read from ARCHITECTURE.md, so the document and the test cannot drift apart.
"""

from __future__ import annotations

import ast
import configparser
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = "memjax"
#: Private modules at the package root that every layer may import.
SHARED = frozenset({"memjax._checks", "memjax._io"})
#: Imports that break the rule today and are being removed by work in progress (issue 12):
#: each entry is (importing module, imported module). An entry that no longer occurs fails
#: the test, so the list only shrinks.
PENDING: frozenset[tuple[str, str]] = frozenset()


def layer_table(architecture: Path) -> dict[str, int]:
    """``{module: layer}`` from the first Markdown table whose header starts with "layer":
    rows ``| <n> | `memjax.a`, `memjax.b` | ... |``."""
    table: dict[str, int] = {}
    in_table = False
    for line in architecture.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|"):
            if table:
                break
            in_table = False
            continue
        if cells[0].lower() == "layer":
            in_table = True
        elif in_table and cells[0].isdigit():
            for name in re.findall(r"`([\w.]+)`", cells[1]):
                table[name] = int(cells[0])
    if not table:
        raise AssertionError(f"{architecture}: no layer table (| layer | modules | ... |)")
    return table


def package_dirs(setup_cfg: Path) -> dict[str, Path]:
    """``{package: folder}`` of the installed packages that live in their own folder
    (setup.cfg ``package_dir``: memjax -> memjax/, memjax.kernels -> kernels/)."""
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    dirs = {}
    for line in config["options"]["package_dir"].strip().splitlines():
        name, folder = (part.strip() for part in line.split("="))
        dirs[name] = setup_cfg.parent / folder
    return dirs


def discover(roots: dict[str, Path]) -> dict[str, tuple[Path, bool, str]]:
    """``{module name: (file, is_package, file as shown)}`` of every ``.py`` file under
    the roots (shown relative to the folder holding the root)."""
    modules: dict[str, tuple[Path, bool, str]] = {}
    for package, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            shown = path.relative_to(folder.parent).as_posix()
            modules[".".join([package, *parts])] = (path, is_package, shown)
    return modules


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _owner(module: str, is_package: bool) -> str:
    """The package a module belongs to; a module at the root is a package of its own."""
    if is_package:
        return module
    parent = module.rpartition(".")[0]
    return module if parent == ROOT else parent


def _within(package: str, scope: str) -> bool:
    """Whether ``package`` may use what is private to ``scope``: the scope itself and its
    subpackages; what is private to the root belongs to the root's ``__init__`` alone."""
    if scope == ROOT:
        return package == ROOT
    return package == scope or package.startswith(scope + ".")


def _layer(module: str, table: dict[str, int]) -> int | None:
    if module == ROOT:
        return table.get(ROOT)
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        name = ".".join(parts[:end])
        if name in table:
            return table[name]
    return None


def _imports(tree: ast.AST, module: str, is_package: bool, modules: dict):
    """(line, imported module, imported name or None) of every memjax import."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != ROOT and not base.startswith(ROOT + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    yield node.lineno, sub, None
                else:
                    yield node.lineno, base, alias.name


def check_imports(roots: dict[str, Path], table: dict[str, int]) -> list[tuple[str, str, str]]:
    """Every import that breaks the rule: (importer, imported module, "file:line: reason")."""
    modules = discover(roots)
    found = []
    for module, (path, is_package, shown) in sorted(modules.items()):
        own_layer = _layer(module, table)
        if own_layer is None:
            found.append((module, module, f"{shown}: {module} is not in the layer table"))
            continue
        own_package = _owner(module, is_package)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, target, name in _imports(tree, module, is_package, modules):
            what = target if name is None else f"{target}.{name}"
            at = f"{shown}:{line}: {module} imports {what}"
            problems = []
            private = [i for i, part in enumerate(target.split(".")) if _private(part)]
            if private and target not in SHARED:
                scope = ".".join(target.split(".")[: private[0]])
                if not _within(own_package, scope):
                    problems.append(f"{at}, a private module of {scope}")
            if name is not None and _private(name):
                scope = _owner(target, modules.get(target, (None, True))[1])
                if not _within(own_package, scope):
                    problems.append(f"{at}, a private name of {scope}")
            layer = _layer(target, table)
            if layer is None and not problems:
                problems.append(f"{at}, which is not in the layer table")
            elif layer is not None and layer > own_layer:
                problems.append(f"{at} from layer {layer} above it (its own: {own_layer})")
            found += [(module, target, problem) for problem in problems]
    return found


def test_every_module_follows_the_import_rule():
    table = layer_table(REPO / "ARCHITECTURE.md")
    found = check_imports(package_dirs(REPO / "setup.cfg"), table)
    new = [message for importer, what, message in found if (importer, what) not in PENDING]
    assert not new, "imports that break ARCHITECTURE.md's rule:\n" + "\n".join(new)
    fixed = sorted(PENDING - {(importer, what) for importer, what, _ in found})
    assert not fixed, f"these PENDING entries no longer occur; remove them: {fixed}"


def test_the_layer_table_covers_every_package():
    """Every subpackage and root module of memjax has a row (a new one needs a layer)."""
    table = layer_table(REPO / "ARCHITECTURE.md")
    modules = discover(package_dirs(REPO / "setup.cfg"))
    missing = sorted(m for m in modules if _layer(m, table) is None)
    assert not missing, f"add these to ARCHITECTURE.md's layer table: {missing}"
    assert table["memjax.errors"] == table["memjax._checks"] == table["memjax._io"] == 0
    assert table["memjax.cli"] == max(table.values())


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


FAKE_TABLE = """\
# Layers

| layer | modules | what for |
|---|---|---|
| 0 | `memjax.errors`, `memjax._checks` | bottom |
| 1 | `memjax.kernels` | kernels |
| 2 | `memjax.signals` | signals |
| 3 | `memjax.mia`, `memjax.memorization` | methods |
| 4 | `memjax.cli`, `memjax` | command |
"""

CLEAN = {
    "memjax/__init__.py": "from memjax.mia import attack\n",
    "memjax/errors.py": "class InputError(ValueError): ...\n",
    "memjax/_checks.py": "from memjax.errors import InputError\n",
    "memjax/signals/__init__.py": "from memjax.signals._tokens import tokens\n",
    "memjax/signals/_tokens.py": "from memjax.kernels import vocab_stats\n"
                                 "from memjax._checks import InputError\n"
                                 "def tokens(): ...\n",
    "memjax/mia/__init__.py": "from memjax.mia._attack import attack\n",
    "memjax/mia/_attack.py": "from . import _helpers\nfrom ._helpers import _shared\n"
                             "def attack():\n    from memjax.signals import tokens\n",
    "memjax/mia/_helpers.py": "_shared = 1\n",
    "memjax/memorization/__init__.py": "",
    "memjax/cli/__init__.py": "def main():\n    from memjax import mia\n"
                              "    from memjax.mia import attack\n",
    "kernels/__init__.py": "from memjax._checks import InputError\n"
                           "from ._ref import vocab_stats\n",
    "kernels/_ref.py": "from memjax.errors import InputError\ndef vocab_stats(): ...\n",
}


@pytest.mark.parametrize("name, text, reason", [
    # A kernel importing a signal, at module level and inside a function.
    ("kernels/_ref.py", "from memjax.signals import tokens\n", "from layer 2 above it"),
    ("kernels/_ref.py", "def f():\n    import memjax.mia\n", "from layer 3 above it"),
    ("kernels/_ref.py", "def f():\n    from memjax import cli\n", "from layer 4 above it"),
    # A signal importing the package's facade (layer 4), not a submodule.
    ("memjax/signals/_tokens.py", "from memjax import attack\n", "from layer 4 above it"),
    # Another package's private module, and its private name.
    ("memjax/memorization/__init__.py", "from memjax.mia._attack import attack\n",
     "a private module of memjax.mia"),
    ("memjax/memorization/__init__.py", "from memjax.mia import _attack\n",
     "a private module of memjax.mia"),
    ("memjax/cli/__init__.py", "from memjax.kernels._ref import vocab_stats\n",
     "a private module of memjax.kernels"),
    ("memjax/memorization/__init__.py", "from memjax.signals import _private\n",
     "a private name of memjax.signals"),
    # A private module at the root that is not one of the shared ones.
    ("memjax/mia/_helpers.py", "from memjax._secret import x\n",
     "a private module of memjax"),
    # A module that has no layer.
    ("memjax/extra.py", "", "not in the layer table"),
])
def test_the_checker_finds_a_planted_violation(tmp_path, name, text, reason):
    _write(tmp_path, CLEAN)
    (tmp_path / "ARCHITECTURE.md").write_text(FAKE_TABLE)
    table = layer_table(tmp_path / "ARCHITECTURE.md")
    roots = {"memjax": tmp_path / "memjax", "memjax.kernels": tmp_path / "kernels"}
    assert check_imports(roots, table) == []  # the clean tree passes
    path = tmp_path / name
    path.write_text(path.read_text() + text if path.exists() else text)
    found = check_imports(roots, table)
    assert len(found) == 1 and reason in found[0][2], found
    assert found[0][2].startswith(name), found
