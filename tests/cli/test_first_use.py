"""What a new user tripped over, driven through the CLI as they did it: inputs that used to end in
`internal error`, misleading messages, and surprises (issue 15). Broken inputs in bulk are in test_fuzz.py."""
import errno
import json
from pathlib import Path

import pytest
import torch

from test_errors import FAST, assert_user_error, cli, snapshot

ROWS = [{"instruction": f"Say {w}.", "output": f"{w}!"} for w in ("hi", "yes", "no", "ok", "bye", "go")]


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- inputs that ended in an internal error -----------------------------------------------------

def test_invalid_utf8_in_a_dataset_names_the_line_and_leaves_no_run_folder(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    status, err = cli(capsys, "data", "inspect", "tiny", "--dataset", str(data))
    assert_user_error(status, err, f"{data}: line 2: not UTF-8 text (byte 0xe9)", "Save the file as UTF-8")
    status, err = cli(capsys, "train", "tiny", *FAST, "--dataset", str(data), "--output-dir", str(tmp_path / "run"))
    assert_user_error(status, err, f"{data}: line 2: not UTF-8 text")
    assert not (tmp_path / "run").exists()


def test_a_binary_file_as_the_config(capsys, tmp_path):
    config = tmp_path / "model.yaml"
    config.write_bytes(bytes(range(256)))
    status, err = cli(capsys, "train", str(config), "--output-dir", str(tmp_path / "run"))
    assert_user_error(status, err, f"{config}: not a text file", "YAML")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["under a file", "under /proc", "read-only"])
def test_an_unwritable_output_dir(capsys, tmp_path, monkeypatch, where):
    (tmp_path / "notes.txt").write_text("mine")
    out = {"under a file": tmp_path / "notes.txt" / "run", "under /proc": Path("/proc/loraforge-run"),
           "read-only": tmp_path / "ro" / "run"}[where]
    if where == "read-only":  # tests run as root, where chmod stops nothing: fail the write as a ro mount does
        real_mkdir = Path.mkdir

        def read_only(self, *a, **kw):
            if str(self).startswith(str(tmp_path / "ro")):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *a, **kw)
        monkeypatch.setattr(Path, "mkdir", read_only)
    status, err = cli(capsys, "train", "tiny", *FAST, "--output-dir", str(out))
    assert_user_error(status, err, f"run directory {out} cannot be created", "choose another --output-dir")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_export_gguf_to_a_read_only_location(capsys, tmp_path, monkeypatch, short_run):
    import builtins

    real_open, target = builtins.open, tmp_path / "ro" / "model.gguf"
    (tmp_path / "ro").mkdir()

    def read_only(file, mode="r", *a, **kw):
        if str(file).startswith(str(tmp_path / "ro")) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *a, **kw)
    monkeypatch.setattr(builtins, "open", read_only)
    status, err = cli(capsys, "export", "gguf", str(short_run), "--out", str(target))
    assert_user_error(status, err, str(tmp_path / "ro"), "Read-only file system", "choose another")
    assert list((tmp_path / "ro").iterdir()) == []


def test_an_unexpected_pos_with_free_space_stays_a_bug(tmp_path):
    from loraforge.atomic import as_os_error

    failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert as_os_error(failure, tmp_path) is None  # plenty of space: not a full disk, not hidden
    assert as_os_error(RuntimeError("shapes do not match"), tmp_path) is None
    rust = type("SafetensorError", (Exception,), {})("Error while serializing: I/O error: No space left on device "
                                                    "(os error 28)")
    assert as_os_error(rust, tmp_path).errno == errno.ENOSPC


def test_push_to_hub_checks_the_token_before_connecting_and_survives_no_network(capsys, short_run, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **kw: calls.append("create_repo"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    status, err = cli(capsys, "export", "adapter", str(short_run), "--push-to-hub", "me/x")
    assert_user_error(status, err, "--push-to-hub: no Hub token; set HF_TOKEN")
    assert calls == [], "no connection before the token is known"

    def no_network(api, *a, **kw):
        import requests
        raise requests.ConnectionError("Failed to establish a new connection: [Errno 101] Network is unreachable")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setattr(HfApi, "create_repo", no_network)
    status, err = cli(capsys, "export", "adapter", str(short_run), "--push-to-hub", "me/x")
    assert_user_error(status, err, "--push-to-hub me/x: could not reach the Hub", "Network is unreachable",
                      "check your connection")
    assert "hf_secret_value_123" not in err


def test_true_is_not_a_batch_size(capsys):
    status, err = cli(capsys, "config", "show", "tiny", "--set", "train.micro_batch_size=true")
    assert_user_error(status, err, "train.micro_batch_size: expected a number, not true/false")


# --- messages -----------------------------------------------------------------------------------

def test_a_plain_folder_as_dataset_shows_a_filled_in_glob(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    status, err = cli(capsys, "data", "inspect", "tiny", "--dataset", str(tmp_path / "data"))
    assert_user_error(status, err, f"path: '{tmp_path / 'data'}/*.jsonl'")
    assert "{path}" not in err


def test_a_typo_inside_a_dataset_entry(capsys, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  base: tiny\ndata:\n  datasets:\n    - path: d.jsonl\n      colums: {input: q}\n")
    status, err = cli(capsys, "train", str(config))
    assert_user_error(status, err, f"{config}: 1 problem(s)",
                      "data.datasets.0.colums: unknown key; did you mean 'columns'?")


def test_max_length_advice_is_not_the_setting_in_effect(capsys, tmp_path):
    status, err = cli(capsys, "data", "inspect", "tiny", "--set", "data.max_length=9")
    assert_user_error(status, err, "every training row was dropped", "Raise data.max_length")
    assert "use truncation: truncate" not in err


def test_set_errors_blame_the_flag_and_show_no_pydantic_internals(capsys):
    status, err = cli(capsys, "train", "tiny", "--set", "lora.targets=5")
    assert_user_error(status, err, "--set: 1 problem(s)", "lora.targets: Input should be 'attention' or 'all-linear'",
                      "(from --set lora.targets=5)")
    assert "tiny.yaml" not in err and "literal[" not in err and "list[str]" not in err


# --- surprises ----------------------------------------------------------------------------------

def test_data_inspect_writes_only_with_out_and_replaces_its_own_report(capsys, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "d.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert cli(capsys, "data", "inspect", "tiny", "--dataset", str(data))[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
    for max_length in (32, 48):
        assert cli(capsys, "data", "inspect", "tiny", "--dataset", str(data), "--out", "rep",
                   "--max-length", str(max_length))[0] == 0
    assert json.loads((tmp_path / "rep" / "data_report.json").read_text())["max_length"] == 48


def test_trl_and_question_answer_columns_and_the_column_flag(capsys, tmp_path):
    pc = write_rows(tmp_path / "pc.jsonl", [{"prompt": r["instruction"], "completion": r["output"]} for r in ROWS])
    qa = write_rows(tmp_path / "qa.jsonl", [{"question": r["instruction"], "answer": r["output"]} for r in ROWS])
    mine = write_rows(tmp_path / "mine.jsonl", [{"q": r["instruction"], "a": r["output"]} for r in ROWS])
    for path in (pc, qa):
        assert cli(capsys, "data", "inspect", "tiny", "--dataset", str(path))[0] == 0
    status, err = cli(capsys, "data", "inspect", "tiny", "--dataset", str(mine))
    assert_user_error(status, err, "cannot tell the dataset's shape", "--column input=q --column output=a")
    status, _ = cli(capsys, "data", "inspect", "tiny", "--dataset", str(mine), "--column", "input=q",
                    "--column", "output=a")
    assert status == 0


def test_train_with_dataset_keep_best_and_next_commands(capsys, tmp_path, monkeypatch):
    """`train --dataset` (question/answer columns); with train.keep_best the adapter is the best evaluation's,
    and the end lists the next commands."""
    from safetensors.torch import load_file

    from loraforge.cli import main
    from loraforge.train import loop

    losses = iter([1.0, 2.0, 3.0])  # the first evaluation is the best
    monkeypatch.setattr(loop, "mean_token_loss", lambda *a, **kw: (next(losses), 0))
    data = write_rows(tmp_path / "qa.jsonl", [{"question": r["instruction"], "answer": r["output"]} for r in ROWS])
    run_dir = tmp_path / "run"
    assert main(["train", "tiny", *FAST, "--dataset", str(data), "--set", "train.max_steps=3",
                 "--set", "train.eval_steps=1", "--set", "data.eval_size=2", "--set", "train.keep_best=true",
                 "--output-dir", str(run_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines at 80 columns off a terminal
    assert "train.keep_best: the adapter is the best evaluation's (step 1, eval loss 1.0000)" in out
    best = load_file(str(run_dir / "checkpoints" / "step-000001" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    for command in ("loraforge eval", "loraforge chat", "loraforge merge", "loraforge export gguf"):
        assert f"{command} {run_dir}" in out


def test_a_better_earlier_evaluation_is_said(tmp_path):
    from loraforge.config import load_config
    from loraforge.train.checkpoint import TrainerState
    from loraforge.train.loop import _best_or_final

    said = []
    _best_or_final(load_config("tiny"), TrainerState(step=200, best_step=100, best_eval_loss=1.25), tmp_path,
                   model=None, say=said.append)
    assert "the best eval loss (1.2500) was at step 100, not at the last step (200)" in said[0]
    assert "set train.keep_best=true" in said[0] and "step-000100" in said[0]


def test_tokens_per_second_is_averaged_over_the_logging_window():
    import io

    from rich.console import Console

    from loraforge.train.progress import TrainProgress

    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    with TrainProgress(4, 0, console) as progress:
        for step, (tokens, seconds) in enumerate([(74, 1.0), (1461, 1.0)], 1):
            record = {"step": step, "loss": 1.0, "lr": 1e-4, "grad_norm": 1.0, "tokens": tokens,
                      "tokens_per_s": tokens / seconds}
            progress.update(step, record)
        progress.log_line(record)
    assert "768 tok/s" in console.file.getvalue()  # (74 + 1461) / 2 s, not the last step's 1461


def test_set_replaces_the_recipes_conflicting_eval_key(capsys):
    from loraforge.cli import main

    assert main(["config", "show", "tiny", "--set", "data.eval_size=500"]) == 0
    data = __import__("yaml").safe_load(capsys.readouterr().out)["data"]
    assert data["eval_size"] == 500 and data["eval_fraction"] == 0.0


def test_contradicting_flags(capsys, tmp_path, short_run):
    status, err = cli(capsys, "train", "tiny", "--resume", str(tmp_path), "--overwrite")
    assert_user_error(status, err, "--resume continues a run and --overwrite deletes it")
    status, err = cli(capsys, "generate", str(short_run), "--prompt", "hi", "--greedy", "--temperature", "0.9")
    assert_user_error(status, err, "give --greedy or --temperature, not both")


def test_resuming_a_finished_run_says_so_and_writes_nothing(capsys, short_run):
    from cli_runner import SHORT_RUN_STEPS

    before = snapshot(short_run)
    from loraforge.cli import main

    assert main(["train", "tiny", "--set", f"train.max_steps={SHORT_RUN_STEPS}", "--set", "train.save_steps=8",
                 "--set", "train.eval_steps=12", "--set", "train.logging_steps=8", "--resume", str(short_run)]) == 0
    assert f"{short_run} already finished at step {SHORT_RUN_STEPS}: nothing to resume" in capsys.readouterr().out
    assert snapshot(short_run) == before


def test_debug_after_the_sub_command(tmp_path):
    from loraforge.cli import main
    from loraforge.errors import UserError

    with pytest.raises(UserError, match="not found"):
        main(["train", str(tmp_path / "nope.yaml"), "--debug"])


def test_generate_input_without_output_writes_jsonl_to_stdout(capsys, tmp_path, short_run):
    from loraforge.cli import main

    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n{"prompt": "yo"}\n')
    assert main(["generate", str(short_run), "--input", str(tmp_path / "p.jsonl"), "--greedy",
                 "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hi", "yo"] and all("answer" in r for r in rows)
    assert "Loading weights" not in err  # not a terminal: no progress bars in the log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_config_show_prints_the_resolved_config(capsys, tmp_path):
    from loraforge.cli import main

    assert main(["config", "show", "tiny", "--set", "lora.r=4", "--set", "model.hub_token=hf_secret"]) == 0
    out = capsys.readouterr().out
    cfg = __import__("yaml").safe_load(out)
    assert cfg["lora"]["r"] == 4 and cfg["train"]["keep_best"] is False and "hf_secret" not in out
    assert main(["config", "show", "tiny", "--out", str(tmp_path / "c.yaml")]) == 0
    assert (tmp_path / "c.yaml").is_file()
    status, err = cli(capsys, "config", "show", "tiny", "--out", str(tmp_path / "c.yaml"))
    assert_user_error(status, err, "already exists", "--force")


def test_a_collapsed_run_is_warned_about():
    from loraforge.train.health import CollapseWatch

    watch = CollapseWatch(vocab_size=1000, learning_rate=1e9)
    uniform = watch.uniform_loss
    said = [watch.check({"step": s, "loss": uniform, "grad_norm": 0.0}) for s in range(1, 6)]
    assert said[:2] == [None, None] and "training has collapsed" in said[2] and "learning_rate (now 1e+09)" in said[2]
    assert said[3:] == [None, None], "once"
    healthy = CollapseWatch(vocab_size=1000, learning_rate=2e-4)
    assert all(healthy.check({"step": s, "loss": 2.0 - s / 10, "grad_norm": 0.5}) is None for s in range(1, 9))


def test_a_run_with_a_far_too_high_learning_rate_is_warned_about_when_and_after_it_collapses(tmp_path, short_run):
    from cli_runner import run_cli

    run_dir = tmp_path / "collapse"
    result = run_cli("train", "tiny", "--set", "train.learning_rate=1e9", "--set", "train.max_steps=6", "--set",
                     "samples=0", "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    out = " ".join(result.stdout.split())
    warning = "training has collapsed: gradient norm 0 for 3 steps"
    assert out.count(warning) == 2, "said at the step, and again after 'done'"
    assert out.index("done:") < out.rindex(warning) and "lower train.learning_rate (now 1e+09)" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["warnings"]) == 1 and warning in summary["warnings"][0]
    assert json.loads((short_run / "summary.json").read_text())["warnings"] == [], "a healthy run: no warning"


def test_no_network_gives_one_message_without_the_hubs_retry_lines(tmp_path):
    import os
    import socket

    from cli_runner import run_cli

    with socket.socket() as s:  # a port nobody listens on: every connection is refused, as with no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    # huggingface_hub backs off 1, 2, 4, 8 s between its retries; made instant so the test takes seconds.
    (hooks / "sitecustomize.py").write_text("import time\ntime.sleep = lambda seconds: None\n")
    # HF_HUB_VERBOSITY empty, as in a user's shell (an in-process CLI test of this session may have set it).
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_HUB_VERBOSITY": "", "TRANSFORMERS_VERBOSITY": "",
           "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("train", "--set", "model.base=someone/model", "--output-dir", str(tmp_path / "run"), env=env,
                     timeout=300)
    assert result.returncode == 2
    assert "could not load the tokenizer of 'someone/model'" in result.stderr and "your connection" in result.stderr
    assert "Retrying" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    debug = run_cli("--debug", "train", "--set", "model.base=someone/model", "--output-dir", str(tmp_path / "run"),
                    env=dict(env, HF_HOME=str(tmp_path / "hf-debug")), timeout=300)
    assert "Retrying in" in debug.stderr, "the retries did happen: only their lines were hidden"
