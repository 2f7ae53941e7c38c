"""Bad input gets one clear answer: `error: ...` naming the file, row or key and what to do, exit 2,
no traceback, and nothing on disk changed. One test per row of the table in docs/errors.md.

The command runs in this process (`loraforge.cli.main`, what `python -m loraforge` calls) so that
faults such as a full disk can be injected; one case also goes through a real subprocess.
"""
import errno
import hashlib
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli

FAST = ["--set", "data.max_length=64", "--set", "train.micro_batch_size=1", "--set", "train.tensorboard=false",
        "--set", "samples=0", "--set", "lora.r=4", "--set", "train.eval_steps=null"]


def cli(capsys, *args) -> tuple[int, str]:
    """Run `loraforge ARGS` in-process; return the exit status and stderr (unwrapped)."""
    from loraforge.cli import main

    status = main(list(args))
    _, err = capsys.readouterr()
    return status, err


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def assert_user_error(status: int, err: str, *fragments: str) -> None:
    """Exit 2 and one `error: ...` message, preceded at most by a model-loading progress bar."""
    assert status == 2, err
    assert err.count("error: ") == 1, err
    before = err[:err.index("error: ")].replace("\r", "\n").splitlines()
    assert all(not line.strip() or line.startswith("Loading weights") for line in before), err
    assert "Traceback" not in err and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def fake_run(run_dir: Path, overrides: list[str], checkpoint_step: int | None = 3) -> None:
    """A run directory as training leaves it: the resolved config and (optionally) one checkpoint."""
    from loraforge.config import load_config, save_config
    from loraforge.rundir import CHECKPOINT_FILES

    run_dir.mkdir(parents=True)
    save_config(load_config("tiny", overrides + [f"output_dir={run_dir}"]), run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    if checkpoint_step:
        ck = run_dir / "checkpoints" / f"step-{checkpoint_step:06d}"
        for name in CHECKPOINT_FILES:
            (ck / name).parent.mkdir(parents=True, exist_ok=True)
            (ck / name).write_text("{}")


# --- config and recipe --------------------------------------------------------------------------

def test_missing_config_file(capsys, tmp_path):
    status, err = cli(capsys, "train", str(tmp_path / "nope.yaml"), "--output-dir", str(tmp_path / "run"))
    assert_user_error(status, err, f"config file {tmp_path / 'nope.yaml'} not found", "loraforge recipes")
    assert not (tmp_path / "run").exists()


def test_malformed_config_value(capsys, tmp_path):
    status, err = cli(capsys, "train", "--set", "train.learning_rate=fast", "--set", "lora.dropout=2",
                      "--output-dir", str(tmp_path / "run"))
    assert_user_error(status, err, "--set: 2 problem(s)", "train.learning_rate: Input should be a valid number",
                      "(got 'fast') (from --set train.learning_rate=fast)", "lora.dropout: Input should be less than 1")
    assert "demo.yaml" not in err, "the recipe file is not to blame"
    assert not (tmp_path / "run").exists()


def test_unknown_config_key(capsys, tmp_path):
    status, err = cli(capsys, "train", "--set", "train.max_step=3", "--output-dir", str(tmp_path / "run"))
    assert_user_error(status, err, "train.max_step: unknown key; did you mean 'max_steps'?")


def test_config_file_that_is_not_yaml(capsys, tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("train:\n  max_steps: [3\n")
    status, err = cli(capsys, "train", str(bad), "--output-dir", str(tmp_path / "run"))
    assert_user_error(status, err, f"{bad}: not valid YAML", "line 2")
    assert not (tmp_path / "run").exists()


def test_unknown_recipe(capsys, tmp_path):
    status, err = cli(capsys, "train", "llama2-7b-guanac", "--output-dir", str(tmp_path / "run"))
    assert_user_error(status, err, "unknown recipe 'llama2-7b-guanac'", "Did you mean 'llama2-7b-guanaco'?",
                      "Shipped recipes: demo")


def test_secret_in_a_malformed_value_is_not_echoed(capsys, tmp_path):
    status, err = cli(capsys, "train", "--set", "model.hub_token=12345678987654321", "--output-dir",
                      str(tmp_path / "run"))
    assert_user_error(status, err, "model.hub_token: Input should be a valid string")
    assert "12345678987654321" not in err


# --- the model ----------------------------------------------------------------------------------

def test_model_folder_without_config_json(capsys, tmp_path, tiny_model_dir):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    status, err = cli(capsys, "train", "tiny", *FAST, "--set", f"model.base={folder}", "--output-dir", str(tmp_path / "run"))
    assert_user_error(status, err, f"model.base: {folder} has no config.json", "Hugging Face checkpoint folder")
    assert not (tmp_path / "run").exists(), "a run that never started leaves no folder behind"
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]


def test_model_folder_that_does_not_exist(capsys, tmp_path):
    status, err = cli(capsys, "train", "tiny", *FAST, "--set", f"model.base={tmp_path}/nope", "--output-dir",
                      str(tmp_path / "run"))
    assert_user_error(status, err, f"model.base: folder {tmp_path}/nope does not exist")
    assert not (tmp_path / "run").exists()


def test_unreachable_hub_id_while_offline(tmp_path):
    """Through the real command in a subprocess: HF_HUB_OFFLINE=1 (conftest sets it) and an uncached id."""
    result = run_cli("train", "tiny", *FAST, "--set", "model.base=someone/no-such-model", "--output-dir",
                     str(tmp_path / "run"), env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert_user_error(result.returncode, result.stderr, "could not load the tokenizer of 'someone/no-such-model'",
                      "HF_HUB_OFFLINE=1 is set, so only cached models load")
    assert result.stderr.count("\n") == 1, "one message, nothing else"
    assert not (tmp_path / "run").exists()


def test_float16_needs_a_gpu(capsys, tmp_path, tiny_model_dir):
    status, err = cli(capsys, "train", "tiny", *FAST, "--set", "model.compute_dtype=float16", "--output-dir",
                      str(tmp_path / "run"))
    assert_user_error(status, err, "model.compute_dtype: float16 needs a CUDA GPU", "use 'auto'")
    assert not (tmp_path / "run").exists()


def test_flash_attention_needs_a_gpu(capsys, tmp_path, tiny_model_dir):
    status, err = cli(capsys, "train", "tiny", *FAST, "--set", "model.attention=flash_attention_2", "--output-dir",
                      str(tmp_path / "run"))
    assert_user_error(status, err, "model.attention: flash_attention_2 needs a CUDA GPU; use 'sdpa'")
    assert not (tmp_path / "run").exists(), "config.yaml etc. written before the model loaded are removed again"


# --- data ---------------------------------------------------------------------------------------

def test_no_trainable_rows(capsys, tmp_path, tiny_model_dir):
    status, err = cli(capsys, "train", "tiny", *FAST, "--set", "data.max_length=9", "--output-dir", str(tmp_path / "run"))
    assert_user_error(status, err, "every training row was dropped", "Raise data.max_length")
    assert not (tmp_path / "run").exists()


# --- the run directory --------------------------------------------------------------------------

def test_non_empty_run_directory_without_resume_or_overwrite(capsys, tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir, FAST[1::2])
    before = snapshot(run_dir)
    status, err = cli(capsys, "train", "tiny", *FAST, "--output-dir", str(run_dir))
    assert_user_error(status, err, f"run directory {run_dir} already exists and is not empty", "--resume",
                      "--overwrite")
    assert snapshot(run_dir) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(capsys, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    (folder / "config.yaml").write_text("mine: true\n")  # a config.yaml alone does not make it a run
    before = snapshot(folder)
    status, err = cli(capsys, "train", "tiny", *FAST, "--overwrite", "--output-dir", str(folder))
    assert_user_error(status, err, f"--overwrite: {folder} was not made by `loraforge train` (no .loraforge marker",
                      "not deleted")
    assert snapshot(folder) == before


def test_resume_without_a_checkpoint(capsys, tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir, FAST[1::2], checkpoint_step=None)
    before = snapshot(run_dir)
    status, err = cli(capsys, "train", "tiny", *FAST, "--resume", str(run_dir))
    assert_user_error(status, err, f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}",
                      "start afresh without --resume")
    assert snapshot(run_dir) == before


def test_resume_with_a_config_that_changes_the_result(capsys, tmp_path):
    run_dir = tmp_path / "run"
    fake_run(run_dir, FAST[1::2])
    before = snapshot(run_dir)
    status, err = cli(capsys, "train", "tiny", *FAST, "--set", "lora.r=8", "--set", "train.micro_batch_size=2",
                      "--set", "train.logging_steps=1", "--resume", str(run_dir))
    assert_user_error(status, err, "--resume: the config differs from the run's",
                      "in lora.r, train.micro_batch_size (", "lora.r: 4 in the run, 8 now",
                      "train.micro_batch_size: 1 in the run, 2 now")
    assert "logging_steps" not in err, "a harmless change is not listed"
    assert snapshot(run_dir) == before


def test_resume_allows_harmless_changes(tmp_path):
    from loraforge.config import load_config
    from loraforge.train.resume import prepare_run_dir

    run_dir = tmp_path / "run"
    fake_run(run_dir, FAST[1::2])
    cfg = load_config("tiny", FAST[1::2] + ["train.logging_steps=1", "train.save_steps=5", "train.save_total_limit=9",
                                          "train.eval_steps=3", "samples=1", "model.hub_token=hf_x"])
    assert prepare_run_dir(cfg, "demo", str(run_dir), overwrite=False) == \
        (run_dir, run_dir / "checkpoints" / "step-000003")


# --- faults while training ----------------------------------------------------------------------

@pytest.mark.parametrize("full", ["ENOSPC", "zip-writer"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint(capsys, tmp_path, monkeypatch, tiny_model_dir, full):
    """A full disk during the second checkpoint: as an OSError, or as torch.save's zip writer reports it
    ('unexpected pos', told apart by the free space); either way the promised message and step 1 intact."""
    import shutil as shutil_module
    from collections import namedtuple

    from loraforge import rundir

    real_save, real_usage, folders = torch.save, shutil_module.disk_usage, []

    def disk_fills_up(obj, f, *a, **kw):
        folders.append(Path(f).parent.name)
        if len(set(folders)) == 2:  # the second checkpoint
            if full == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *a, **kw)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", disk_fills_up)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0) if len(set(folders)) == 2
                        else real_usage(p))
    run_dir = tmp_path / "run"
    status, err = cli(capsys, "train", "tiny", *FAST, "--set", "train.max_steps=3", "--set", "train.save_steps=1",
                      "--output-dir", str(run_dir))
    good = run_dir / "checkpoints" / "step-000001"
    assert_user_error(status, err, f"could not write the checkpoint for step 2 in {run_dir}: No space left on device",
                      f"The previous checkpoint ({good}) is intact; free space and resume")
    monkeypatch.undo()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001"]
    assert rundir.latest_checkpoint(run_dir) == good
    torch.load(good / "optimizer.pt", weights_only=True)


def test_resume_into_another_output_dir_checks_the_run_that_wrote_the_checkpoint(tmp_path):
    from loraforge.config import load_config
    from loraforge.errors import UserError
    from loraforge.train.resume import prepare_run_dir

    source = tmp_path / "run"
    fake_run(source, FAST[1::2])
    before = snapshot(source)
    fork = tmp_path / "fork"
    changed = load_config("tiny", FAST[1::2] + ["lora.r=8", f"output_dir={fork}"])
    with pytest.raises(UserError, match=r"lora\.r: 4 in the run, 8 now"):
        prepare_run_dir(changed, "demo", str(source), overwrite=False)
    assert not fork.exists()
    same = load_config("tiny", FAST[1::2] + [f"output_dir={fork}"])
    assert prepare_run_dir(same, "demo", str(source), overwrite=False) == \
        (fork, source / "checkpoints" / "step-000003")
    assert fork.is_dir() and snapshot(source) == before
