"""Imports point down (../shared/STYLE.md): cli -> compat / dashboard / api -> train / export -> lora -> quant ->
models -> kernels, with data standing alone and errors / env importable from anywhere. Every `velotune.*` import in
the package, at module level or inside a function, is checked against this table."""

from __future__ import annotations

import ast
from pathlib import Path

import velotune

LEVELS = {
    "errors": 0,
    "env": 0,
    "kernels": 1,
    "models": 2,
    "quant": 3,
    "lora": 4,
    "train": 5,
    "export": 5,
    "compat": 6,
    "dashboard": 6,
    "api": 6,
    "cli": 7,
    "__init__": 8,
    "__main__": 8,
}
STANDALONE = {"data", "datasets"}  # import only level 0; importable from train upwards
PACKAGE = Path(velotune.__file__).parent


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level velotune part) of every velotune import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "velotune" else [f"velotune.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found += [(node.lineno, n.split(".")[1]) for n in names if n.startswith("velotune.")]
    return found


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """`file:line imports X` for each import that points up (or into/out of a standalone part)."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        part = path.relative_to(package).parts[0].removesuffix(".py")
        for line, target in _imports(path):
            if target == part:
                continue
            if part in STANDALONE:
                ok = LEVELS.get(target) == 0
            elif target in STANDALONE:
                ok = LEVELS[part] >= LEVELS["train"]
            else:
                ok = LEVELS[target] <= LEVELS[part]
            if not ok:
                bad.append(f"{path.relative_to(package.parent)}:{line} imports velotune.{target}")
    return bad


def test_every_part_of_the_package_has_a_level():
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    unplaced = sorted(parts - set(LEVELS) - STANDALONE)
    assert not unplaced, f"give these a level in LEVELS: {unplaced}"


def test_imports_point_down():
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself: a models module importing the trainer is reported with its file and line."""
    pkg = tmp_path / "velotune"
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "bad.py").write_text("import torch\n\n\ndef f():\n    from velotune.train.loop import Trainer\n")
    (pkg / "data").mkdir()
    (pkg / "data" / "reader.py").write_text("from velotune.models.decoder import CausalLM\n")
    assert upward_imports(pkg) == [
        "velotune/data/reader.py:1 imports velotune.models",
        "velotune/models/bad.py:5 imports velotune.train",
    ]
