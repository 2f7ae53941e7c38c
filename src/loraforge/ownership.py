"""What loraforge made, and who is writing it.

- The ownership marker: `.loraforge`, a small JSON file (made_by, kind, version, created) that loraforge
  writes into each folder it creates - a run folder, a merged model, a copied adapter. `train --overwrite`
  and `merge/export --force` delete or replace a folder only when it carries the marker of that kind; any
  other folder (a user's, another tool's, one from a loraforge older than the marker) is refused, never
  deleted. Reading a folder never needs the marker.
- The one-writer lock of a run folder: `.loraforge.lock`, an OS lock (flock, through the `filelock` library)
  held by every command that writes into the folder (train, eval, report, ...) until it ends. The kernel
  drops it when the holder dies, so a lock left by a killed process never blocks. Beside it,
  `.loraforge.lock.json` names the holder (PID, command, start time) for the second writer's refusal.
  `train --devices N` holds it in the launcher; the rank that writes is its child and is told so
  (`HANDOFF_ENV`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from loraforge import __version__
from loraforge.atomic import write_text_whole
from loraforge.errors import UserError

MARKER_FILE = ".loraforge"
LOCK_FILE = ".loraforge.lock"
LOCK_INFO_FILE = ".loraforge.lock.json"
BOOKKEEPING_FILES = (MARKER_FILE, LOCK_FILE, LOCK_INFO_FILE)  # loraforge's own, in a folder that holds nothing else

RUN, MERGED, ADAPTER = "run", "merged", "adapter"
_NOUN = {RUN: "run folder", MERGED: "merged model folder", ADAPTER: "adapter copy"}
_MAKER = {RUN: "`loraforge train`", MERGED: "`loraforge merge`", ADAPTER: "`loraforge export adapter`"}
_MARKER_MAX_BYTES = 4096

# Set by the `--devices N` launcher, which holds the run folder's lock, for the ranks it starts.
HANDOFF_ENV = "LORAFORGE_RUN_LOCK_HOLDER"


# --- the ownership marker -----------------------------------------------------------------------

def write_marker(folder, kind: str) -> None:
    """Mark `folder` as made by loraforge (a `kind` output), atomically."""
    record = {"made_by": "loraforge", "kind": kind, "version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text_whole(Path(folder) / MARKER_FILE, json.dumps(record, indent=1) + "\n")


def marker_kind(folder) -> Optional[str]:
    """The kind named by `folder`'s marker; None without a readable one (a link or an odd file counts as none)."""
    path = Path(folder) / MARKER_FILE
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MARKER_MAX_BYTES:
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("made_by") != "loraforge" or not isinstance(record.get("kind"), str):
        return None
    return record["kind"]


def link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def contains_cwd(folder: Path) -> bool:
    cwd = Path.cwd().resolve()
    return folder.resolve() in (cwd, *cwd.parents)


def check_replaceable(folder, kind: str, flag: str, instead: str = "choose another path") -> None:
    """Refuse (UserError) unless `flag` may delete or replace `folder`: a real folder (not a link), not the
    current folder nor one above it, carrying loraforge's marker of `kind`. `instead`: what to do instead."""
    folder = Path(folder)
    if folder.is_symlink():
        raise UserError(f"{flag}: {folder} is a symbolic link (to {link_target(folder)}); loraforge does not delete "
                        f"or replace anything through a link. Remove the link yourself, or {instead}")
    if not folder.is_dir():
        raise UserError(f"{flag}: {folder} is not a folder, so it is not replaced; {instead}")
    if contains_cwd(folder):
        raise UserError(f"{flag}: {folder} contains the current folder, so it is not deleted; {instead}")
    found = marker_kind(folder)
    if found == kind:
        return
    if found in _NOUN:
        raise UserError(f"{flag}: {folder} is a loraforge {_NOUN[found]}, not a {_NOUN[kind]}, so it is not "
                        f"replaced; {instead}")
    raise UserError(f"{flag}: {folder} was not made by {_MAKER[kind]} (no {MARKER_FILE} marker in it: made by an "
                    f"older loraforge or not by loraforge), so it is not deleted; delete it yourself if you mean "
                    f"it, or {instead}")


def foreign_entries(folder) -> list[Path]:
    """What `folder` holds besides loraforge's own bookkeeping files."""
    return sorted(p for p in Path(folder).iterdir() if p.name not in BOOKKEEPING_FILES)


# --- the one-writer lock of a run folder -----------------------------------------------------------

_held: dict[str, tuple[object, Path]] = {}  # realpath -> (FileLock, run folder), released by release_run_locks


def _read_holder(run_dir: Path) -> Optional[dict]:
    path = run_dir / LOCK_INFO_FILE
    try:
        if path.is_symlink() or path.stat().st_size > _MARKER_MAX_BYTES:
            return None
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe_holder(info: Optional[dict]) -> str:
    if not info or not isinstance(info.get("pid"), int):
        return "another process (it left no holder information)"
    since = ""
    if isinstance(info.get("started"), (int, float)):
        when = time.localtime(info["started"])
        same_day = time.strftime("%Y-%m-%d", when) == time.strftime("%Y-%m-%d")
        since = ", since " + time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", when)
    command = info.get("command") if isinstance(info.get("command"), str) else "loraforge"
    command = "".join(c for c in command if c.isprintable())[:80]  # the file is data: no terminal escapes
    return f"PID {info['pid']} ({command}{since})"


def lock_run_folder(run_dir, command: str) -> None:
    """Hold `run_dir`'s one-writer lock until `release_run_locks()` (the CLI calls it when a command ends) or
    the process exits. A second writer gets a UserError naming the holder; taking it again in the same
    process is a no-op."""
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    if key in _held:
        return
    lock = FileLock(str(run_dir / LOCK_FILE), thread_local=False)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        holder = _read_holder(run_dir)
        if holder is not None and str(holder.get("pid")) == os.environ.get(HANDOFF_ENV):
            return  # the `--devices` launcher that started this rank holds it for the run
        raise UserError(f"run folder {run_dir} is in use by {_describe_holder(holder)}; wait for it or stop "
                        "it (one command writes into a run folder at a time)") from None
    except OSError as e:
        raise UserError(f"run folder {run_dir} cannot be locked for writing ({e.strerror or e}); check its "
                        "permissions, or choose another folder") from None
    _held[key] = (lock, run_dir)
    write_text_whole(run_dir / LOCK_INFO_FILE, json.dumps(
        {"pid": os.getpid(), "command": command, "started": time.time(),
         "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def hand_lock_to_children() -> None:
    """The processes this one starts from now on (the `--devices` ranks) write under the lock it holds."""
    os.environ[HANDOFF_ENV] = str(os.getpid())


def release_run_locks() -> None:
    """Release every run-folder lock this process holds (its holder file goes with it)."""
    if os.environ.get(HANDOFF_ENV) == str(os.getpid()):
        del os.environ[HANDOFF_ENV]
    while _held:
        _, (lock, run_dir) = _held.popitem()
        holder = _read_holder(run_dir)
        if holder is not None and holder.get("pid") == os.getpid():
            (run_dir / LOCK_INFO_FILE).unlink(missing_ok=True)
        lock.release()
