"""Guard against internal errors: every sub-command, fed a deterministic set of broken inputs (random
bytes, truncated and empty files, wrong JSON/YAML types, bad encodings, unwritable and full output
locations, no network), answers with exit 2 and one `error:` message naming the file, row, key or flag,
without a traceback, and changes nothing that was on disk before.

The commands run in this process (`loraforge.cli.main`) so that a read-only or full disk can be faked by
patching the write calls (tests run as root, where chmod stops nothing). Bounded: well under 2 minutes.
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

SEED = 15
SHORT_RUN_FLAGS = ["--set", "train.max_steps=24", "--set", "train.save_steps=8", "--set", "train.eval_steps=12",
                   "--set", "train.logging_steps=8"]  # the shared short run's (tests/conftest.py)
FAST = ["--set", "data.max_length=64", "--set", "train.micro_batch_size=1", "--set", "train.tensorboard=false",
        "--set", "samples=0", "--set", "lora.r=4", "--set", "train.max_steps=1"]
CONFIG = """description: a small run
model:
  base: tiny
lora:
  r: 4
data:
  max_length: 64
  eval_fraction: 0.1
train:
  max_steps: 1
  micro_batch_size: 1
samples: 0
"""
DATA_ROWS = [{"instruction": f"Say {w}.", "output": f"{w}!"} for w in ("hi", "yes", "no", "ok", "bye", "go")]


# --- broken contents ----------------------------------------------------------------------------

def random_bytes(rng: random.Random, good: bytes) -> bytes:
    return bytes([0xFF]) + bytes(rng.randrange(256) for _ in range(rng.randrange(16, 400)))


def truncated(rng: random.Random, good: bytes) -> bytes:
    return good[:rng.randrange(1, max(2, len(good) // 2))]


def empty(rng: random.Random, good: bytes) -> bytes:
    return b""


def bad_encoding(rng: random.Random, good: bytes) -> bytes:
    cut = rng.randrange(len(good) // 3, max(len(good) // 3 + 1, len(good) - 1))
    return good[:cut] + b"\xc3\x28\xff" + good[cut:]


def utf16(rng: random.Random, good: bytes) -> bytes:
    if not is_text(good):
        return truncated(rng, good)
    return good.decode("utf-8").encode("utf-16")


def is_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in data


WRONG_VALUES = [None, 7, -1.5, "x", [], {}, [1, "a"], {"k": [None]}, True]


def wrong_types(rng: random.Random, good: bytes) -> bytes:
    """The same document with one value (at any depth) replaced by a value of another type."""
    if not is_text(good):  # weights, optimizer state: flip bytes in the middle instead
        middle = len(good) // 2
        return good[:middle] + bytes(rng.randrange(256) for _ in range(64)) + good[middle + 64:]
    text = good.decode("utf-8")
    if text.lstrip().startswith(("{", "[")) and "\n{" not in text:
        doc = json.loads(text)
        _replace_one(rng, doc)
        return json.dumps(doc).encode()
    if text.lstrip().startswith("{"):  # JSONL: one row
        lines = text.splitlines()
        i = rng.randrange(len(lines))
        row = json.loads(lines[i]) if lines[i].strip() else {}
        lines[i] = json.dumps(rng.choice(WRONG_VALUES) if rng.random() < 0.3 else _replace_one(rng, row) or row)
        return ("\n".join(lines) + "\n").encode()
    import yaml

    doc = yaml.safe_load(text)
    _replace_one(rng, doc)
    return yaml.safe_dump(doc).encode()


def _replace_one(rng: random.Random, node) -> None:
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            return
        key = rng.choice(keys)
        if isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.6:
            node = node[key]
            continue
        choices = [v for v in WRONG_VALUES if type(v) is not type(node[key])]
        node[key] = rng.choice(choices)
        return


CORRUPTIONS = [random_bytes, truncated, empty, bad_encoding, utf16, wrong_types]


# --- faults of the machine ----------------------------------------------------------------------

@contextlib.contextmanager
def unwritable(root: Path, code: int):
    """Every write under `root` fails with OSError `code` (EROFS: a read-only mount, ENOSPC: a full disk)."""
    root = os.path.abspath(root)

    def inside(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(root)
        except TypeError:
            return False

    def fail(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_replace, real_rename = os.replace, os.rename

    def fake_open(file, mode="r", *a, **kw):
        if isinstance(file, (str, bytes, os.PathLike)) and inside(file) and any(c in mode for c in "wax+"):
            fail(file)
        return real_open(file, mode, *a, **kw)

    def fake_os_open(path, flags, *a, **kw):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(path)
        return real_os_open(path, flags, *a, **kw)

    def guarded(real):
        def call(path, *a, **kw):
            if inside(path):
                fail(path)
            return real(path, *a, **kw)
        return call

    patches = [(builtins, "open", fake_open), (io, "open", fake_open), (os, "open", fake_os_open),
               (os, "mkdir", guarded(real_mkdir)), (os, "replace", guarded(real_replace)),
               (os, "rename", guarded(real_rename))]
    with pytest.MonkeyPatch.context() as mp:
        for target, name, value in patches:
            mp.setattr(target, name, value)
        yield


# --- the cases ----------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    argv: list[str]
    names: tuple[str, ...]  # the message must contain one of these (a file, key, row or flag)
    setup: Callable[[Path], None] = lambda ws: None
    fault: Optional[Callable[[Path], contextlib.AbstractContextManager]] = None
    env: dict = field(default_factory=dict)
    # Some damage leaves a valid file (a CSV cut after a row, an empty config = all defaults). Such cases
    # carry a flag that stops the command cheaply right after the input is read (no training), with this
    # message; or, for commands that only print, they may succeed.
    valid_marker: Optional[str] = None
    may_succeed: bool = False


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.rmtree(path)
    path.write_bytes(data)


def good_files() -> dict[str, bytes]:
    rows = "".join(json.dumps(r) + "\n" for r in DATA_ROWS)
    csv = "instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in DATA_ROWS)
    return {"cfg.yaml": CONFIG.encode(), "data.jsonl": rows.encode(), "data.json": json.dumps(DATA_ROWS).encode(),
            "data.csv": csv.encode(), "prompts.jsonl": b'{"prompt": "hi"}\n{"messages": [{"role": "user", '
            b'"content": "yo"}]}\n'}


RUN_FILES = {  # file of a finished run -> commands that need it
    "config.yaml": ["eval", "report", "chat", "generate", "merge", "gguf", "adapter", "resume"],
    "template.json": ["chat", "generate", "merge", "gguf"],
    "adapter/adapter_config.json": ["eval", "chat", "generate", "merge", "gguf", "adapter"],
    "adapter/adapter_model.safetensors": ["eval", "chat", "generate", "merge", "gguf", "adapter"],
    "summary.json": ["report"],
    "data_report.json": ["report"],
    "metrics.jsonl": ["report"],
    "checkpoints/step-000016/trainer_state.json": ["resume"],
    "checkpoints/step-000016/optimizer.pt": ["resume"],
    "checkpoints/step-000016/adapter/adapter_model.safetensors": ["resume"],
}


MODEL_COMMANDS = ("eval", "chat", "generate", "merge", "gguf")


def run_command(kind: str, run: str) -> list[str]:
    return {
        "eval": ["eval", run, "--rows", "2", "--samples", "0", "--metric", "none"],
        "report": ["report", run],
        "chat": ["chat", run, "--greedy", "--max-new-tokens", "2"],
        "generate": ["generate", run, "--prompt", "hi", "--greedy", "--max-new-tokens", "2"],
        "merge": ["merge", run, "--out", "ws/merged"],
        "gguf": ["export", "gguf", run, "--out", "ws/model.gguf"],
        "adapter": ["export", "adapter", run, "--out", "ws/adapter-copy"],
        "resume": ["train", "tiny", *SHORT_RUN_FLAGS, "--resume", f"{run}/checkpoints/step-000016"],
    }[kind]


def build_cases(rng: random.Random) -> list[Case]:
    cases: list[Case] = []
    good = good_files()

    def corrupt(target: str, content: bytes, how):
        data = how(rng, content)
        return lambda ws: _write(ws / target, data)

    # Config files: train, data inspect, config show. A config that is still valid reaches the data
    # (a missing file: stop there).
    gone = "ws/missing.jsonl"
    for how in CORRUPTIONS:
        for argv in (["train", "ws/cfg.yaml", "--dataset", gone, "--output-dir", "ws/run"],
                     ["data", "inspect", "ws/cfg.yaml", "--dataset", gone, "--out", "ws/inspect"],
                     ["config", "show", "ws/cfg.yaml"]):
            cases.append(Case(f"config {how.__name__}: {argv[0]}", argv, ("cfg.yaml",),
                              corrupt("cfg.yaml", good["cfg.yaml"], how), valid_marker=f"'{gone}' not found",
                              may_succeed=argv[0] == "config"))
    # Datasets in every format: data inspect --dataset, train --dataset. Data that is still valid is
    # all dropped by max_length 9 (before any weights load).
    tight = ["--set", "data.max_length=9", "--set", "data.truncation=drop", "--set", "data.eval_fraction=0"]
    for name in ("data.jsonl", "data.json", "data.csv"):
        for how in CORRUPTIONS:
            for argv in (["data", "inspect", "tiny", "--dataset", f"ws/{name}", *tight, "--out", "ws/inspect"],
                         ["train", "tiny", *FAST, *tight, "--dataset", f"ws/{name}", "--output-dir", "ws/run"]):
                cases.append(Case(f"dataset {name} {how.__name__}: {argv[0]}", argv, (name,),
                                  corrupt(name, good[name], how), valid_marker="every training row was dropped"))
    # Prompts for generate --input.
    for how in CORRUPTIONS:
        cases.append(Case(f"prompts {how.__name__}: generate", ["generate", "ws/run0", "--input", "ws/prompts.jsonl",
                          "--output", "ws/answers.jsonl"], ("prompts.jsonl",),
                          corrupt("prompts.jsonl", good["prompts.jsonl"], how)))
    # The files of a finished run, for each command that reads them (one corruption each, two for
    # the fast commands). Cut, emptied or retyped text may still be valid (an empty config is all
    # defaults): then the command may succeed, changing only its own outputs.
    for target, kinds in RUN_FILES.items():
        text = not target.endswith((".safetensors", ".pt"))
        for kind in kinds:
            # (a retyped value in a resumed run's files may be harmless, and the resume would train)
            # (and a config cut to nothing is all defaults: the model commands would then really run)
            pool = [c for c in CORRUPTIONS if not (kind == "resume" and c is wrong_types)
                    and not (target == "config.yaml" and kind in MODEL_COMMANDS and c in (truncated, empty, wrong_types))]
            for how in rng.sample(pool, 2 if kind in ("report", "resume", "adapter") else 1):
                def setup(ws, target=target, how=how, seed=rng.random()):
                    path = ws / "run0" / target
                    _write(path, how(random.Random(seed), path.read_bytes()))
                cases.append(Case(f"run file {target} {how.__name__}: {kind}", run_command(kind, "ws/run0"),
                                  (Path(target).name, str(Path(target).parent)), setup,
                                  may_succeed=target == "metrics.jsonl"  # a bad last line is a cut-off write: skipped
                                  or how is wrong_types  # flipped weight bytes are still weights
                                  or text and how in (truncated, empty)))
    # Output locations: under a regular file, under /proc, read-only, full.
    outputs = {
        "train": lambda out: ["train", "tiny", *FAST, "--output-dir", out],
        "data inspect": lambda out: ["data", "inspect", "tiny", "--out", out],
        "generate": lambda out: ["generate", "ws/run0", "--input", "ws/prompts.jsonl", "--output", out + "/a.jsonl",
                                 "--greedy", "--max-new-tokens", "2"],
        "merge": lambda out: ["merge", "ws/run0", "--out", out],
        "export gguf": lambda out: ["export", "gguf", "ws/run0", "--out", out + "/m.gguf"],
        "export adapter": lambda out: ["export", "adapter", "ws/run0", "--out", out],
        "config show": lambda out: ["config", "show", "tiny", "--out", out + "/c.yaml"],
    }
    def prompts(ws):
        _write(ws / "prompts.jsonl", good["prompts.jsonl"])
        _write(ws / "afile", b"not a folder")
        (ws / "ro").mkdir()

    for command, argv in outputs.items():
        cases.append(Case(f"output under a file: {command}", argv("ws/afile/out"), ("afile",), prompts))
        cases.append(Case(f"output under /proc: {command}", argv("/proc/loraforge-out"), ("/proc",), prompts))
        for code in (errno.EROFS, errno.ENOSPC):
            cases.append(Case(f"output {errno.errorcode[code]}: {command}", argv("ws/ro/out"), ("ws/ro",), prompts,
                              fault=lambda ws, code=code: unwritable(ws / "ro", code)))
    for code in (errno.EROFS, errno.ENOSPC):  # eval and report write into the run directory itself
        for argv in (run_command("eval", "ws/run0"), ["report", "ws/run0"]):
            cases.append(Case(f"run dir {errno.errorcode[code]}: {argv[0]}", argv, ("run0",),
                              fault=lambda ws, code=code: unwritable(ws / "run0", code)))
    # No network.
    no_token = {"HF_TOKEN": "", "HF_HUB_OFFLINE": "0", "HF_HOME": "{ws}/hf-home"}
    for argv in (["export", "adapter", "ws/run0", "--push-to-hub", "me/x"],
                 ["merge", "ws/run0", "--out", "ws/merged", "--push-to-hub", "me/x"]):
        cases.append(Case(f"push without a token: {argv[0]}", argv, ("HF_TOKEN",), env=no_token))
        cases.append(Case(f"push without a network: {argv[0]}", argv, ("me/x",), fault=lambda ws: no_network(),
                          env={"HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "0"}))
    for argv in (["data", "inspect", "tiny", "--dataset", "someone/no-such-dataset", "--out", "ws/inspect"],
                 ["train", "tiny", *FAST, "--set", "model.base=someone/no-such-model", "--output-dir", "ws/run"]):
        cases.append(Case(f"offline Hub id: {argv[0]}", argv, ("someone/no-such",)))
    # Wrong types for every --set key family, and nonsense flags.
    for key in ("train.micro_batch_size", "lora.targets", "data.datasets", "data.max_length", "model", "train"):
        value = json.dumps(rng.choice(WRONG_VALUES))
        cases.append(Case(f"--set {key}={value}: train", ["train", "tiny", "--set", f"{key}={value}", "--output-dir",
                          "ws/run"], (key,)))
    for argv, name in ((["eval", "ws/run0", "--rows", "0"], "--rows"), (["eval", "ws/nope"], "ws/nope"),
                       (["report", "ws/afile"], "ws/afile"), (["chat", "ws/run0", "--top-p", "2"], "--top-p"),
                       (["export", "gguf", "ws/cfg.yaml", "--out", "ws/x.gguf"], "ws/cfg.yaml")):
        cases.append(Case(f"bad argument {name}: {argv[0]}", argv, (name,),
                          lambda ws: (_write(ws / "afile", b"x"), _write(ws / "cfg.yaml", CONFIG.encode()))))
    return cases


@contextlib.contextmanager
def no_network():
    """Every connection attempt fails as it does with the cable pulled."""
    import socket

    def refuse(*a, **kw):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # read once, at import (conftest: offline)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(time, "sleep", lambda seconds: None)  # the Hub client's retry back-off
        yield


# --- the test -----------------------------------------------------------------------------------

OWN_OUTPUTS = {"run0/report.html", "run0/eval.json"}  # what eval and report rewrite when they succeed


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


def test_every_command_answers_broken_input_with_one_clear_error(short_run, tmp_path, monkeypatch, capsys):
    from loraforge.cli import main

    cases = build_cases(random.Random(SEED))
    only = os.environ.get("LORAFORGE_FUZZ_ONLY")  # while debugging: a regular expression for case names
    cases = [c for c in cases if not only or re.search(only, c.name)]
    started, failures = time.perf_counter(), []
    monkeypatch.chdir(tmp_path)
    for i, case in enumerate(cases):
        ws = tmp_path / "ws"
        if ws.exists():
            shutil.rmtree(ws)
        ws.mkdir()
        shutil.copytree(short_run, ws / "run0", ignore=shutil.ignore_patterns("tb", "stdout.txt"))
        case.setup(ws)
        before = snapshot(ws)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in case.env.items():
                mp.setenv(k, v.format(ws=ws))
            mp.setattr("sys.stdin", io.StringIO("hello\n"))
            with case.fault(ws) if case.fault else contextlib.nullcontext():
                try:
                    status = main(list(case.argv))
                except SystemExit as e:  # argparse's own usage errors
                    status = e.code
        out, err = capsys.readouterr()
        after = snapshot(ws)
        problem = check(case, status, err, before, after)
        if os.environ.get("LORAFORGE_FUZZ_ONLY") is not None:
            print(f"[{i}] {time.perf_counter() - started:6.1f}s {case.name}: exit {status} {problem or 'ok'}\n"
                  f"      {err.strip()[:300]!r}", file=sys.__stderr__, flush=True)
        if problem:
            failures.append(f"[{i}] {case.name}: {problem}\n    argv: {case.argv}\n    stderr: {err.strip()[:600]}")
    seconds = time.perf_counter() - started
    print(f"\nfuzz: {len(cases)} cases in {seconds:.0f} s, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def check(case: Case, status, err: str, before: dict, after: dict) -> Optional[str]:
    if "Traceback" in err or "internal error" in err:
        return f"internal error (exit {status})"
    changed = [k for k in before if after.get(k) != before[k]]
    if changed and not (status == 0 and case.may_succeed and set(changed) <= OWN_OUTPUTS):
        return f"changed what was on disk: {changed[:5]}"
    if status == 0 and case.may_succeed:
        return None
    if status != 2:
        return f"exit {status}, expected 2"
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    first = next((n for n, line in enumerate(lines) if "error: " in line), None)
    if first is None or sum("error: " in line for line in lines) != 1 or not lines[first].startswith("error: "):
        return "expected exactly one line starting with 'error: '"
    if any(not line.startswith("Loading weights") for line in lines[:first]):
        return "output before the error message"
    if not any(name in err for name in case.names) and not (case.valid_marker and case.valid_marker in err):
        return f"the message names none of {case.names}"
    return None
