"""Pipeline order: train/ comes before infer/ and export/; the cli runs the before/after answers after training."""
import ast
from pathlib import Path

import loraforge.train

TRAIN_DIR = Path(loraforge.train.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_train_imports_no_later_stage():
    for path in TRAIN_DIR.glob("*.py"):
        later = {m for m in _imported_modules(path) if m.startswith(("loraforge.infer", "loraforge.export",
                                                                     "loraforge.cli"))}
        assert not later, f"{path.name} imports {sorted(later)}"
