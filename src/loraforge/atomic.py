"""Write a file or a folder whole: it appears (or replaces the old one) only once it is complete.

One mechanism for every output loraforge writes: checkpoints, the final adapter, merged models, GGUF
files, answers, eval.json, report.html. The new content goes to `.tmp-NAME-PID` beside the target,
is fsynced, and is renamed into place; an existing target is first renamed to `.trash-NAME-PID` and
deleted after. The two renames run with SIGTERM/SIGINT held, so a second Ctrl-C cannot fall between
them, and a crash leaves the old target or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

SCRATCH_PREFIXES = (".tmp-", ".trash-")  # what a killed write can leave beside its target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: not every file system supports it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync(path: Path) -> None:
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.is_dir():
        fsync_dir(path)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGTERM/SIGINT (and so the training loop's 'second signal: exit now') for a few renames."""
    blockable = hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT}) if blockable else None
    try:
        yield
    finally:
        if blockable:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def replace(tmp: Path, final: Path) -> None:
    """Move the complete `tmp` to `final`. A file replaces a file in one rename (there is no moment without
    one); an existing folder is swapped out first (a rename cannot replace a non-empty folder), with signals
    held between the two renames."""
    with signals_deferred():
        old = None
        if (final.is_dir() and not final.is_symlink()) or (tmp.is_dir() and (final.exists() or final.is_symlink())):
            old = final.with_name(f".trash-{final.name}-{os.getpid()}")
            _remove(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    if old is not None:
        _remove(old)


# How libraries that do not raise OSError report a failed write: safetensors (Rust) names the OS
# error; torch.save's zip writer says only "unexpected pos", so free space decides (below).
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed")
LOW_SPACE = 1 << 20  # bytes: below this after a failed write, the disk was full


def as_os_error(e: BaseException, folder: Path) -> OSError | None:
    """The OSError behind a library's failed write (a full or read-only disk), else None: a real bug
    stays a bug. Call while the partial output still occupies its space."""
    if isinstance(e, OSError):
        return e
    if not isinstance(e, Exception) or type(e).__name__ not in ("RuntimeError", "SafetensorError"):
        return None
    text = str(e)
    code = _OS_ERROR_IN_TEXT.search(text)
    if code:
        number = int(code.group(1))
        return OSError(number, os.strerror(number), str(folder))
    if any(marker in text for marker in _TORCH_WRITE_FAILED):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < LOW_SPACE:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
    return None


@contextlib.contextmanager
def written_whole(final, folder: bool = False, before_replace=None):
    """`with written_whole(path) as tmp:` write `tmp` (a file, or a folder if `folder`); it becomes
    `path` only when the block completes. On any error the partial `tmp` is removed. `before_replace()`,
    if given, runs just before the swap and may refuse it by raising (what is there may have changed
    while the new content was made)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    _remove(tmp)
    try:
        if folder:
            tmp.mkdir()
        yield tmp
        _fsync(tmp)
        if before_replace is not None:
            before_replace()
        replace(tmp, final)
    except BaseException as e:
        disk = as_os_error(e, final.parent)
        _remove(tmp)
        if disk is not None and disk is not e:
            raise disk from e
        raise


def check_writable(path, what: str) -> None:
    """Fail now, not after minutes of work, when `path` (a file or folder still to be written) cannot be:
    a file where a folder should be, a read-only or full disk, /proc. Probes with a scratch file in the
    nearest existing folder; creates nothing that stays."""
    from loraforge.errors import UserError

    path = Path(path).absolute()
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{what} {path}: {folder} is a file, not a folder; choose another location")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write in {folder} ({e.strerror or e}); choose another location "
                        "or free some space") from None


def write_text_whole(path, text: str) -> Path:
    """`path` holds `text` (UTF-8) entirely or keeps what it held before."""
    with written_whole(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
