"""Where built-in checkpoints live, and building one into place exactly once, atomically."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable


def loraforge_home() -> Path:
    """Where loraforge keeps built models: $LORAFORGE_HOME, default ~/.cache/loraforge."""
    return Path(os.environ.get("LORAFORGE_HOME") or "~/.cache/loraforge").expanduser()


def models_dir() -> Path:
    return loraforge_home() / "models"


def is_complete(path: Path, required: Iterable[str]) -> bool:
    return all((path / name).is_file() for name in required)


def build_once(target: Path, build: Callable[[Path], None], required: Iterable[str]) -> Path:
    """`target`, built by `build(folder)` on first use.

    The build goes into a temporary sibling folder that is renamed into place only when complete:
    a crash never leaves a folder that looks finished, and of two processes building at once the
    second simply discards its copy.
    """
    required = tuple(required)
    if is_complete(target, required):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        # Not from us (our builds appear complete or not at all): left by hand or by an old tool.
        shutil.rmtree(target, ignore_errors=True)
    prefix = f".{target.name}.tmp-"
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would follow the folder into place
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target, required):  # not a racing process's finished build: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_stale_staging(target.parent, prefix)
    return target


def _remove_stale_staging(parent: Path, prefix: str, older_than_s: float = 3600) -> None:
    """Staging folders of builds that were killed outright; a build still running is much younger."""
    for leftover in parent.glob(f"{prefix}*"):
        try:
            if time.time() - leftover.stat().st_mtime > older_than_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
