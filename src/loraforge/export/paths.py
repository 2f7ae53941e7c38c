"""Output paths of the after-training commands: never replaced silently (they are written whole by
`loraforge.atomic.written_whole`)."""
from __future__ import annotations

from pathlib import Path

from loraforge.atomic import check_writable
from loraforge.errors import UserError
from loraforge.rundir import ADAPTER_DIR, CONFIG_FILE


def check_output(path, force: bool, flag: str = "--out") -> Path:
    """Refuse an existing output unless `force`; a training run folder is never replaced."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not force:
            raise UserError(f"{flag} {path} already exists; choose another path or add --force to replace it")
        if path.is_dir() and ((path / CONFIG_FILE).is_file() or (path / ADAPTER_DIR).is_dir()):
            raise UserError(f"{flag} {path} is a training run directory; it is not replaced even with --force. "
                            "Choose another path")
        cwd = Path.cwd().resolve()
        if path.is_dir() and path.resolve() in (cwd, *cwd.parents):
            raise UserError(f"{flag} {path} contains the current folder; choose another path")
    check_writable(path, flag)  # before the model loads, not after
    return path
