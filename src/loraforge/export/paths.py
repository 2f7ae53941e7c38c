"""Output paths of the after-training commands: never replaced silently, and `--force` replaces only what
loraforge made - a folder carrying its marker of the same kind (`loraforge.ownership`), or a regular file
(of the expected format, e.g. a GGUF file). Outputs are written whole by `loraforge.atomic.written_whole`,
so the old one survives until the new one is complete."""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Optional

from loraforge.atomic import check_writable
from loraforge.errors import UserError
from loraforge.ownership import RUN, check_replaceable, link_target, lock_run_folder, marker_kind
from loraforge.rundir import ADAPTER_DIR, CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE

GGUF_MAGIC = ("GGUF", b"GGUF")  # (format, the bytes its files start with)


def check_output(path, force: bool, flag: str = "--out", kind: Optional[str] = None, magic: Optional[tuple[str, bytes]] = None,
                 command: str = "loraforge") -> Path:
    """Refuse an existing output unless `force` allows replacing it: with `kind` the output is a folder (it must
    carry loraforge's marker of that kind), without it a file (a regular file; starting with `magic` if given).
    A training run folder is never replaced; an output inside one is written under the run's lock (held by
    `command` until it ends)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not force:
            raise UserError(f"{flag} {path} already exists; choose another path or add --force to replace it")
        check_replaceable_output(path, flag, kind, magic)
    parent = path.absolute().parent
    if (parent / CONFIG_FILE).is_file():  # e.g. --output RUN/answers.jsonl: one writer per run folder
        lock_run_folder(parent, command)
    check_writable(path, flag)  # before the model loads, not after
    return path


def _older_run(path: Path) -> bool:
    """A run folder from a loraforge older than the marker."""
    return (path / CONFIG_FILE).is_file() and any((path / name).exists() for name in (ADAPTER_DIR, CHECKPOINT_DIR,
                                                                                         METRICS_FILE))


def check_replaceable_output(path, flag: str, kind: Optional[str] = None, magic: Optional[tuple[str, bytes]] = None) -> None:
    """What `--force` may replace (see check_output); also called again just before the replacement, since
    the model took minutes and the path may have changed meanwhile."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if kind is not None:
        if path.is_dir() and not path.is_symlink() and (marker_kind(path) == RUN or _older_run(path)):
            raise UserError(f"{flag} {path} is a training run directory; it is not replaced even with --force. "
                            "Choose another path")
        check_replaceable(path, kind, flag)
        return
    if path.is_symlink():
        raise UserError(f"{flag} {path} is a symbolic link (to {link_target(path)}); --force does not replace "
                        "links. Remove it yourself, or choose another path")
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, socket or pipe)"
        raise UserError(f"{flag} {path} is {what}; --force replaces only a file. Choose another path")
    if magic is not None:
        name, start = magic
        try:
            with open(path, "rb") as f:
                head = f.read(len(start))
        except OSError as e:
            raise UserError(f"{flag} {path} cannot be read ({e.strerror or e}); choose another path") from None
        if head != start:
            raise UserError(f"{flag} {path} is not a {name} file (it does not start with {start.decode()!r}), so "
                            "--force does not replace it; delete it yourself if you mean it, or choose another path")
