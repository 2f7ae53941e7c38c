"""Output paths of the after-training commands: never replaced silently, always written whole."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from loraforge.errors import UserError


def check_output(path, force: bool, flag: str = "--out") -> Path:
    """Refuse an existing output unless `force`; a training run folder is never replaced."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not force:
            raise UserError(f"{flag} {path} already exists; choose another path or add --force to replace it")
        if path.is_dir() and ((path / "config.yaml").is_file() or (path / "adapter").is_dir()):
            raise UserError(f"{flag} {path} is a training run directory; it is not replaced even with --force. "
                            "Choose another path")
        cwd = Path.cwd().resolve()
        if path.is_dir() and path.resolve() in (cwd, *cwd.parents):
            raise UserError(f"{flag} {path} contains the current folder; choose another path")
    return path


@contextlib.contextmanager
def written_whole(final, folder: bool = False):
    """`with written_whole(path) as tmp:` write `tmp` (a file, or a folder if `folder`); it replaces
    `path` only when the block completes, so a crash or Ctrl-C never leaves half an output."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    _remove(tmp)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        if final.exists() or final.is_symlink():
            final.rename(old)
        os.replace(tmp, final)
        _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
