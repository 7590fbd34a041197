"""The import rules of docs/architecture.md, enforced on the source tree (every import statement,
including the ones inside functions, since the library imports Megatron-Core and its own heavy parts
lazily).

Units are the packages and top-level modules of megatron_rpt (`config`, `training`, `validate`, ...).
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megatron_rpt"

# unit -> the megatron_rpt units it may import (None: any). Lower layers first.
ALLOWED: dict[str, set | None] = {
    "platform": set(),
    "fileio": set(),
    "distributed": {"platform"},
    "config": {"platform"},
    "models": {"config", "platform"},
    "loss": {"config", "platform"},
    "data": {"config", "platform", "fileio"},
    "checkpoint": {"config", "models", "platform", "fileio"},
    "validate": {"config", "data", "loss"},
    "demo_assets": {"fileio"},
    "inference": {"checkpoint", "config", "distributed", "models", "platform", "fileio"},
    "convert": {"checkpoint", "config", "data", "distributed", "models", "platform", "validate", "fileio"},
    "training": {"checkpoint", "config", "data", "distributed", "loss", "models", "platform", "validate",
                 "fileio"},
    "rpt": {"checkpoint", "config", "convert", "data", "distributed", "fileio", "inference", "loss", "models",
            "platform", "training", "validate"},
    # entry points: thin, may import any library unit
    "pretrain": None,
    "train_rpt": None,
}


def imports_of(source: str) -> set[str]:
    """Every absolute module name an import statement of `source` names (from-imports of
    `megatron_rpt` also name the imported submodules)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "megatron_rpt":
                found.update(f"megatron_rpt.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError("relative import: the project uses absolute imports only")
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    """One line per import of a module under `package` that breaks ALLOWED."""
    out = []
    for path in sorted(package.rglob("*.py")):
        names = imports_of(path.read_text(encoding="utf-8"))
        rel = path.relative_to(package).parts
        unit = rel[0][:-3] if len(rel) == 1 else rel[0]
        if unit == "__init__":
            continue
        assert unit in ALLOWED, f"{path}: unit {unit!r} has no import rule: add it to ALLOWED and the docs"
        for name in sorted(names):
            top = name.split(".")[0]
            if top in ("tools", "tests"):
                out.append(f"{path.relative_to(package.parent)} imports {name}: the library never imports {top}/")
            if top != "megatron_rpt" or name == "megatron_rpt":
                continue
            target = name.split(".")[1]
            if target == unit or ALLOWED[unit] is None:
                continue
            if target not in ALLOWED[unit]:
                out.append(f"{path.relative_to(package.parent)} imports {name}: {unit} may import only "
                           f"{', '.join(sorted(ALLOWED[unit])) or 'nothing of megatron_rpt'}")
    return out


def test_library_follows_the_import_rules():
    assert violations() == []


@pytest.mark.parametrize("rule", [("convert", "training"), ("config", "data"), ("config", "loss"),
                                  ("checkpoint", "training"), ("data", "training")])
def test_the_rules_that_matter_are_stated(rule):
    """The rules the architecture relies on are in the table (a later edit cannot drop them unseen)."""
    unit, forbidden = rule
    assert forbidden not in ALLOWED[unit]


def test_scanner_sees_lazy_relative_and_package_imports(tmp_path):
    """The scanner finds imports inside functions and `from megatron_rpt import x`, and the checker
    reports a violation (so the main test can fail)."""
    src = "def f():\n    from megatron_rpt.training.loop import pretrain\n    from megatron_rpt import data\n"
    assert {"megatron_rpt.training.loop", "megatron_rpt.data"} <= imports_of(src)
    with pytest.raises(AssertionError, match="relative import"):
        imports_of("from . import x\n")
    (tmp_path / "megatron_rpt" / "convert").mkdir(parents=True)
    (tmp_path / "megatron_rpt" / "convert" / "probe.py").write_text(
        "def f():\n    import megatron_rpt.training.checkpointing\n    import tests.cli\n")
    found = violations(tmp_path / "megatron_rpt")
    assert any("probe.py imports megatron_rpt.training.checkpointing: convert may import only" in v
               for v in found), found
    assert any("the library never imports tests/" in v for v in found), found
