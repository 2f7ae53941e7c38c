"""What `--overwrite`/`--force` may delete, and one writer per run folder (issue 23, items 3, 4 and 10), driven
through the CLI in a temp dir: folders loraforge did not make survive byte for byte, only what carries
loraforge's `.loraforge` marker of the same kind is replaced, a second writer is refused with the holder
named, a lock left by a killed process does not block, run files are written whole, and a failed run takes
away the folders it created."""
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_runner import run_cli
from test_errors import FAST, assert_user_error, cli, snapshot

ONE_STEP = [*FAST, "--set", "train.max_steps=1", "--set", "train.save_steps=1"]


def user_folder(path: Path) -> Path:
    """A project folder loraforge did not make; it happens to hold a config.yaml."""
    (path / "src").mkdir(parents=True)
    (path / "config.yaml").write_text("experiment: mine\n")
    (path / "config.json").write_text('{"mine": true}\n')
    (path / "thesis.tex").write_text("precious")
    (path / "src" / "model.py").write_bytes(os.urandom(64))
    return path


HOLD = """import sys, time
from loraforge.ownership import lock_run_folder
lock_run_folder(sys.argv[1], sys.argv[2])
print("held", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def held_elsewhere(run_dir: Path, command: str = "loraforge train"):
    """The run folder's lock, taken by another process (as a running `loraforge train` holds it); the process
    is SIGKILLed afterwards, leaving its lock behind as a crash would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), command], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# --- item 3: --overwrite / --force touch only what loraforge made --------------------------------------

def test_train_overwrite_spares_a_folder_loraforge_did_not_make(capsys, tmp_path):
    folder = user_folder(tmp_path / "project")
    before = snapshot(folder)
    status, err = cli(capsys, "train", "tiny", *ONE_STEP, "--overwrite", "--output-dir", str(folder))
    assert_user_error(status, err, f"--overwrite: {folder} was not made by `loraforge train`",
                      "no .loraforge marker in it: made by an older loraforge or not by loraforge",
                      "delete it yourself if you mean it")
    assert snapshot(folder) == before, "not a byte changed, nothing added"


def test_train_overwrite_replaces_a_run_loraforge_made(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert cli(capsys, "train", "tiny", *ONE_STEP, "--output-dir", str(run_dir))[0] == 0
    marker = json.loads((run_dir / ".loraforge").read_text())
    assert marker["made_by"] == "loraforge" and marker["kind"] == "run"
    (run_dir / "checkpoints" / "step-000001" / "stale.txt").write_text("from the first run")
    status, err = cli(capsys, "train", "tiny", *ONE_STEP, "--overwrite", "--output-dir", str(run_dir))
    assert status == 0, err
    assert not (run_dir / "checkpoints" / "step-000001" / "stale.txt").exists()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / ".loraforge").is_file()
    assert not (run_dir / ".loraforge.lock.json").exists(), "the holder file goes when the command ends"


def test_overwrite_through_a_symlink_is_refused_naming_the_link_and_its_target(capsys, tmp_path):
    from loraforge.ownership import RUN, write_marker

    target = tmp_path / "disk" / "run"
    target.mkdir(parents=True)
    write_marker(target, RUN)
    (target / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    link = tmp_path / "run"
    link.symlink_to(target)
    before = snapshot(target)
    status, err = cli(capsys, "train", "tiny", *ONE_STEP, "--overwrite", "--output-dir", str(link))
    assert_user_error(status, err, f"--overwrite: {link} is a symbolic link (to {target})", "through a link")
    assert snapshot(target) == before

    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "nowhere")
    status, err = cli(capsys, "train", "tiny", *ONE_STEP, "--output-dir", str(dangling))
    assert_user_error(status, err, f"run directory {dangling} is a symbolic link to {tmp_path / 'nowhere'}, which "
                      "does not exist")


def test_overwrite_never_deletes_the_current_folder(capsys, tmp_path, monkeypatch):
    from loraforge.ownership import RUN, write_marker

    write_marker(tmp_path, RUN)  # even one that says loraforge made it
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    status, err = cli(capsys, "train", "tiny", *ONE_STEP, "--overwrite", "--output-dir", ".")
    assert_user_error(status, err, "--overwrite: . contains the current folder, so it is not deleted")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_merge_and_export_force_replace_only_their_own_folders(capsys, tmp_path, short_run):
    project = user_folder(tmp_path / "project")
    before = snapshot(project)
    for command in (["merge", str(short_run)], ["export", "adapter", str(short_run)]):
        status, err = cli(capsys, *command, "--out", str(project), "--force")
        assert_user_error(status, err, f"--out: {project} was not made by `loraforge {command[0]}",
                          "no .loraforge marker", "delete it yourself if you mean it")
    assert snapshot(project) == before

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert cli(capsys, "merge", str(short_run), "--out", str(merged))[0] == 0
    assert cli(capsys, "export", "adapter", str(short_run), "--out", str(adapter))[0] == 0
    assert json.loads((merged / ".loraforge").read_text())["kind"] == "merged"
    assert json.loads((adapter / ".loraforge").read_text())["kind"] == "adapter"
    status, err = cli(capsys, "merge", str(short_run), "--out", str(adapter), "--force")
    assert_user_error(status, err, f"--out: {adapter} is a loraforge adapter copy, not a merged model folder")
    (merged / "left-over.txt").write_text("x")
    status, err = cli(capsys, "merge", str(short_run), "--out", str(merged), "--force")
    assert status == 0, err
    assert not (merged / "left-over.txt").exists() and (merged / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(merged)  # the marker does not get in the way of loading


def test_export_gguf_force_replaces_only_a_gguf_file(capsys, tmp_path, short_run):
    notes, folder, link = tmp_path / "notes.gguf", user_folder(tmp_path / "project"), tmp_path / "link.gguf"
    notes.write_text("not a model")
    link.symlink_to(notes)
    before, before_folder = snapshot(tmp_path), snapshot(folder)
    for out, says in ((notes, "is not a GGUF file (it does not start with 'GGUF')"), (folder, "is a folder"),
                      (link, f"is a symbolic link (to {notes})"), (Path("/dev/null"), "is not a regular file")):
        status, err = cli(capsys, "export", "gguf", str(short_run), "--out", str(out), "--force")
        assert_user_error(status, err, f"--out {out} {says}")
    assert snapshot(tmp_path) == before

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    status, err = cli(capsys, "generate", str(short_run), "--input", str(prompts), "--output", str(folder), "--force")
    assert_user_error(status, err, f"--output {folder} is a folder; --force replaces only a file")
    assert snapshot(folder) == before_folder


# --- item 4: one writer per run folder ----------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(capsys, tmp_path, short_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(short_run, run_dir, ignore=shutil.ignore_patterns("tb", "stdout.txt"))
    with held_elsewhere(run_dir) as pid:
        before, since = snapshot(run_dir), time.strftime("%H:%M")
        for command in (["eval", str(run_dir)],
                        ["train", "tiny", *ONE_STEP, "--overwrite", "--output-dir", str(run_dir)],
                        ["train", "tiny", *ONE_STEP, "--devices", "2", "--overwrite", "--output-dir", str(run_dir)],
                        ["data", "inspect", "tiny", "--out", str(run_dir), "--force"],
                        ["export", "adapter", str(run_dir), "--out", str(run_dir / "copy")]):
            status, err = cli(capsys, *command)
            assert_user_error(status, err, f"run folder {run_dir} is in use by PID {pid} (loraforge train, since ",
                              "wait for it or stop it")
            assert since in err or time.strftime("%H:%M") in err
        assert snapshot(run_dir) == before, "the refused commands wrote nothing"
        # The report only reads the run and replaces report.html whole: it may be rebuilt mid-training.
        status, err = cli(capsys, "report", str(run_dir))
        assert status == 0, err
        assert (run_dir / "report.html").stat().st_mtime > (short_run / "report.html").stat().st_mtime
    # The holder was SIGKILLed: the OS released its lock, and the next writer goes ahead.
    from loraforge.ownership import lock_run_folder, release_run_locks

    lock_run_folder(run_dir, "loraforge eval")
    release_run_locks()


def test_a_second_train_into_a_running_train_is_refused(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "loraforge", "train", "tiny", *FAST, "--set", "train.max_steps=2000",
                              "--output-dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size):
            assert first.poll() is None and time.monotonic() < deadline, "the first train did not start"
            time.sleep(0.2)
        second = run_cli("train", "tiny", *FAST, "--set", "train.max_steps=2", "--output-dir", str(run_dir))
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert f"error: run folder {run_dir} is in use by PID {first.pid} (loraforge train, since " in second.stderr
        assert first.poll() is None, "the first one trains on"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((run_dir / ".loraforge.lock.json").read_text())["pid"] == first.pid  # left by the kill
    from loraforge.ownership import lock_run_folder, release_run_locks

    lock_run_folder(run_dir, "loraforge eval")  # a lock left by a killed process does not block
    release_run_locks()


def test_one_process_takes_the_lock_again_without_blocking_itself(tmp_path):
    from loraforge.ownership import lock_run_folder, release_run_locks

    lock_run_folder(tmp_path, "loraforge eval")
    lock_run_folder(tmp_path, "loraforge report")  # e.g. eval writing its report: the same writer
    assert json.loads((tmp_path / ".loraforge.lock.json").read_text())["command"] == "loraforge eval"
    release_run_locks()
    assert not (tmp_path / ".loraforge.lock.json").exists()
    with held_elsewhere(tmp_path) as pid:
        from loraforge.errors import UserError

        with pytest.raises(UserError, match=f"in use by PID {pid}"):
            lock_run_folder(tmp_path, "loraforge eval")


# --- item 10: run files written whole, no folders left by a failed run -----------------------------------

@pytest.mark.parametrize("name", ["config.yaml", "template.json", "summary.json"])
def test_run_files_are_written_whole(capsys, tmp_path, monkeypatch, name):
    """A full disk while writing `name`: the old file stays (config.yaml and template.json are written again
    on resume), or none appears (the first summary.json); never half of one."""
    run_dir = tmp_path / "run"
    before = None
    if name != "summary.json":  # a run stopped after its last checkpoint, before its summary: resumed below
        assert cli(capsys, "train", "tiny", *ONE_STEP, "--output-dir", str(run_dir))[0] == 0
        (run_dir / "summary.json").unlink()
        before = (run_dir / name).read_bytes()
    real_write = Path.write_text

    def disk_fills_up(self, text, *args, **kwargs):
        if name in self.name:  # the file itself, or a scratch file beside it
            real_write(self, text[:len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_fills_up)
    where = ["--resume", str(run_dir)] if before else ["--output-dir", str(run_dir)]
    status, err = cli(capsys, "train", "tiny", *ONE_STEP, *where)
    monkeypatch.undo()
    assert_user_error(status, err, "No space left on device")
    if before:
        assert (run_dir / name).read_bytes() == before
    else:
        assert (run_dir / "checkpoints" / "step-000001").is_dir() and not (run_dir / name).exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]


def test_a_failed_train_removes_the_parent_folders_it_created(capsys, tmp_path):
    (tmp_path / "runs").mkdir()
    run_dir = tmp_path / "runs" / "2026" / "december" / "run"
    status, err = cli(capsys, "train", "tiny", *ONE_STEP, "--set", "data.max_length=9", "--output-dir", str(run_dir))
    assert_user_error(status, err, "every training row was dropped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and not any((tmp_path / "runs").iterdir())
    # A folder that was there (here reached through a link) stays, as empty as it was: no marker, no lock.
    (tmp_path / "disk" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "disk" / "mine")
    status, err = cli(capsys, "train", "tiny", *ONE_STEP, "--set", "data.max_length=9",
                      "--output-dir", str(tmp_path / "runs" / "link"))
    assert_user_error(status, err, "every training row was dropped")
    assert (tmp_path / "disk" / "mine").is_dir() and not any((tmp_path / "disk" / "mine").iterdir())
