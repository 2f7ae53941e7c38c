"""Load one configured source with the `datasets` library: Hub id, local file, glob, save_to_disk folder.

Each loaded source knows how to name a row for error messages (`line 12` of a .jsonl file, `row 3`
elsewhere), including which file of a glob it came from.
"""
from __future__ import annotations

import bisect
import contextlib
import glob as globlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from loraforge.data.locate import LineIndex, explain_json_array, explain_jsonl
from loraforge.config import remote_code_refusal
from loraforge.errors import UserError, first_line

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_LOCAL_HINT = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv", ".arrow")


def bundled_path() -> Path:
    """The bundled demo dataset: guanaco-llama2 style rows {"text": "<s>[INST] ... [/INST] ... </s>"}."""
    return Path(__file__).resolve().parent.parent / "assets" / "demo_chat.jsonl"


@dataclass
class LoadedSource:
    label: str
    kind: str  # hub | file | glob | disk
    dataset: object  # datasets.Dataset
    files: list[str] = field(default_factory=list)  # for file/glob: one per part
    starts: list[int] = field(default_factory=list)  # first row index of each part
    _lines: dict = field(default_factory=dict, repr=False)

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, index: int) -> str:
        """`file.jsonl line 7` / `row 7` for the 0-based row index."""
        if not self.files:
            return f"row {index + 1}"
        part = bisect.bisect_right(self.starts, index) - 1
        path, local = self.files[part], index - self.starts[part]
        prefix = f"{path} " if self.kind == "glob" else ""
        if path.endswith(".jsonl"):
            return f"{prefix}line {self._line_of(path, local)}"
        return f"{prefix}row {local + 1}"

    def _line_of(self, path: str, local: int) -> int:
        # The json loader skips blank lines; map the row to its real line number (reading, not holding, the file).
        if path not in self._lines:
            self._lines[path] = LineIndex(path)
        return self._lines[path].line_of(local) or local + 1


def is_local(path: str) -> bool:
    return (
        os.path.exists(path)
        or path.startswith(("/", ".", "~"))
        or path.lower().endswith(_LOCAL_HINT)
        or any(ch in path for ch in "*?[")
    )


@contextlib.contextmanager
def quiet_datasets(progress: bool):
    """Silence the datasets library's own logging (and progress bars for local files)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    logger = logging.getLogger("datasets")
    level = logger.level
    if not progress:
        datasets.disable_progress_bars()
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        if not progress and not was_disabled:
            datasets.enable_progress_bars()


def release_unused_memory() -> None:
    """Give memory freed after reading (pyarrow's pool, glibc's heap) back to the system, so what comes next
    (the model) does not stack its peak on the data's: a 20 MB row's parse left ~100 MB held otherwise."""
    try:
        import pyarrow

        pyarrow.default_memory_pool().release_unused()
    except Exception:  # noqa: BLE001 - an optimisation only
        pass
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc; elsewhere there is nothing to call
    except Exception:  # noqa: BLE001
        pass


def load_source(src, split: Optional[str] = None) -> LoadedSource:
    """Load `src` (a DatasetSource); `split` overrides src.split (used for data.eval_split)."""
    split = split or src.split
    path = os.path.expanduser(src.path)
    if any(ch in path for ch in "*?["):
        files = sorted(globlib.glob(path, recursive=True))
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise UserError(f"dataset glob '{src.path}' matches no files. Check the pattern and the folder.")
        exts = {Path(f).suffix.lower() for f in files}
        if len(exts) > 1:
            raise UserError(f"dataset glob '{src.path}' matches files of several kinds ({', '.join(sorted(exts))}); "
                            "narrow the pattern to one, e.g. *.jsonl")
        return _load_files(src, files, split, kind="glob")
    if os.path.isdir(path):
        return _load_disk(src, path, split)
    if os.path.isfile(path):
        return _load_files(src, [path], split, kind="file")
    if is_local(src.path):
        raise UserError(f"dataset file '{src.path}' not found (relative paths in a config file are resolved "
                        "against the config file's folder).")
    return _load_hub(src, split)


def _builder(path: str) -> str:
    ext = Path(path).suffix.lower()
    if ext not in BUILDERS:
        raise UserError(
            f"{path}: unsupported file type '{ext or '(none)'}'. Use .jsonl, .json (an array of objects), .csv "
            "or .parquet, a folder written by datasets' save_to_disk, or a Hub dataset id."
        )
    return BUILDERS[ext]


def _load_files(src, files: list[str], split: str, kind: str) -> LoadedSource:
    import datasets

    parts, starts, n = [], [], 0
    for f in files:
        builder = _builder(f)
        if builder != "parquet" and _blank(f):
            raise UserError(f"{f}: the file is empty. Put one example per line (or row), or remove the file.")
        if builder != "parquet":
            _check_utf8(f)
        kwargs = {}
        if builder == "csv":  # read every column as text: numeric-looking answers stay strings
            kwargs["features"] = _csv_string_features(f)
        try:
            with quiet_datasets(progress=False):
                ds = datasets.load_dataset(builder, data_files=f, split=split, **kwargs)
        except UserError:
            raise
        except Exception as e:
            if builder == "json":
                _explain_json(f)  # raises with the line number when it can find one
            raise _load_error(f, split, e) from None
        parts.append(ds)
        starts.append(n)
        n += len(ds)
    ds = parts[0] if len(parts) == 1 else _concat(parts, src.path)
    ds = _limit(ds, src)
    return LoadedSource(label=src.path, kind=kind, dataset=ds, files=files, starts=starts)


def _blank(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return not head.strip() and os.path.getsize(path) <= len(head)


def _check_utf8(path: str) -> None:
    """Text datasets must be UTF-8; the loader would fail later, mid-conversion, without a line number."""
    import codecs

    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                pending = decoder.getstate()[0]  # bytes of a character cut at the chunk's edge (never a newline)
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    line += (pending + chunk)[:e.start].count(b"\n")
                    raise UserError(f"{path}: line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}). "
                                    "Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove the line.") from None
                line += chunk.count(b"\n")
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{path}: ends in the middle of a character: not UTF-8 text. Save the file as UTF-8.") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None


def _concat(parts, label):
    import datasets

    try:
        return datasets.concatenate_datasets(parts)
    except Exception as e:
        raise UserError(f"dataset glob '{label}': the files have different columns or types ({e}). "
                        "List them as separate sources instead.") from None


def _csv_string_features(path: str):
    import csv

    from datasets import Features, Value

    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), None)
    except csv.Error as e:  # e.g. a field over csv's 128 KiB limit: no column name is that long
        raise UserError(f"{path}: the first line cannot be read as a CSV header ({e}). The first line must name "
                        "the columns, e.g. input,output; add that line if the file starts with data.") from None
    if not header:
        raise UserError(f"{path}: empty CSV file; the first line must name the columns.")
    return Features({name: Value("string") for name in header})


def _explain_json(path: str) -> None:
    """Find the first bad line/row of a JSON(L) file the loader rejected, and say what is wrong."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
    if path.lower().endswith(".json") and head.startswith(b"["):
        explain_json_array(path)
    else:
        explain_jsonl(path)


def _load_error(path: str, split: str, e: Exception) -> UserError:
    msg = first_line(e)
    if "split" in msg.lower() and split not in ("train",):
        return UserError(f"{path}: no split '{split}' (a local file has only 'train'; slices like "
                         f"'train[:100]' work). Use data.eval_fraction or eval_size to hold out rows.")
    return UserError(f"{path}: could not be read as a dataset: {msg}")


def _load_disk(src, path: str, split: str) -> LoadedSource:
    import datasets

    markers = ("dataset_dict.json", "state.json", "dataset_info.json")
    if not any(os.path.exists(os.path.join(path, m)) for m in markers):
        raise UserError(f"{path} is a folder but not one written by datasets' save_to_disk. "
                        f"Point at the data files instead, e.g. path: '{path}/*.jsonl'.")
    try:
        with quiet_datasets(progress=False):
            ds = datasets.load_from_disk(path)
    except Exception as e:
        raise UserError(f"{path}: could not load the save_to_disk folder: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split '{split}'; it has: {', '.join(ds)}. Set split: to one of them.")
        ds = ds[split]
    return LoadedSource(label=src.path, kind="disk", dataset=_limit(ds, src))


def _offline() -> bool:
    try:
        import datasets

        if datasets.config.HF_HUB_OFFLINE or getattr(datasets.config, "HF_DATASETS_OFFLINE", False):
            return True
    except Exception:  # pragma: no cover
        pass
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _load_hub(src, split: str) -> LoadedSource:
    import datasets

    kwargs = {"split": split}
    if src.revision:
        kwargs["revision"] = src.revision
    if src.trust_remote_code:  # allowed only by this command line's --trust-remote-code (the CLI refuses sooner)
        if not src.remote_code_allowed:
            raise UserError(remote_code_refusal(f"the data source {src.path}", ["trust_remote_code"]))
        kwargs["trust_remote_code"] = True
    label = f"{src.path}" + (f" ({src.subset})" if src.subset else "") + f" [{split}]"
    try:
        with quiet_datasets(progress=True):
            ds = datasets.load_dataset(src.path, src.subset, **kwargs)
    except Exception as e:
        reason = first_line(e)
        hint = "check the name or your connection"
        if _offline():
            hint += "; offline mode is on: set HF_HUB_OFFLINE=0 (and HF_DATASETS_OFFLINE=0) to download"
        if "split" in reason.lower():
            hint = "check the split name (for example train, validation, test)"
        raise UserError(f"could not load dataset {src.path} from the Hub: {reason}. {hint[0].upper() + hint[1:]}.") from None
    return LoadedSource(label=label, kind="hub", dataset=_limit(ds, src))


def _limit(ds, src):
    if src.max_rows and len(ds) > src.max_rows:
        return ds.select(range(src.max_rows))
    return ds
