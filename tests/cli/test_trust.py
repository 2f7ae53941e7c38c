"""Files from someone else are data: code named in a run folder, adapter, model folder or config runs only when
the command line of that invocation asks (`--trust-remote-code`, `--allow-metric-code`, `--metric`).

Each hostile folder is built here: its Python files create a marker file when imported. Without the flag the
marker never appears and the command ends with one `error:` line naming the flag; with the flag the marker does
appear, which shows that the folder really would have run code (and that these tests can fail).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_runner import run_cli

# The planted module: it leaves a marker when imported, and gives transformers classes to load.
CODE = """import pathlib
pathlib.Path({marker!r}).write_text("code from the folder ran")
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer


class EvilConfig(LlamaConfig):
    pass


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig


class EvilTokenizer(LlamaTokenizer):
    pass
"""
TOKENIZER_MAP = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
MODEL_MAP = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}


def plant(folder: Path, marker: Path, tokenizer: bool = True, model: bool = True) -> None:
    """evil.py in `folder`, named by the auto_map of its tokenizer_config.json and/or config.json."""
    (folder / "evil.py").write_text(CODE.format(marker=str(marker)))
    for name, on, auto_map in (("tokenizer_config.json", tokenizer, TOKENIZER_MAP), ("config.json", model, MODEL_MAP)):
        if on:
            config = json.loads((folder / name).read_text())
            (folder / name).write_text(json.dumps({**config, "auto_map": auto_map}))


def set_config(run: Path, **model) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"].update(model)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def loraforge(*args: str, cwd: Path | None = None, env: dict | None = None):
    """The real command, with "y" lines on stdin: transformers asks on stdin when trust_remote_code is left
    unset, and a piped "y" must not count as consent."""
    return subprocess.run([sys.executable, "-m", "loraforge", *args], input="y\ny\n/exit\n", capture_output=True,
                          text=True, timeout=600, cwd=cwd, env={**os.environ, **(env or {})})


def assert_refused(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.count("error: ") == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture(scope="module")
def hostile_run(short_run, tiny_model_dir, tmp_path_factory):
    """A finished run as someone might share it: its config.yaml asks for remote code; its base model is a folder
    shipped with it whose config.json and tokenizer name evil.py; the adapter's tokenizer names one too."""
    work = tmp_path_factory.mktemp("hostile")
    run = work / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    base = run / "base-model"
    shutil.copytree(tiny_model_dir, base)
    marker = work / "marker"
    plant(base, marker)
    plant(run / "adapter", marker, model=False)
    set_config(run, base=str(base), trust_remote_code=True)
    return run, marker, {"HF_MODULES_CACHE": str(work / "modules")}  # transformers copies allowed code there


def commands(run: Path, out: Path) -> dict[str, list[str]]:
    return {
        "chat": ["chat", str(run), "--greedy", "--max-new-tokens", "2"],
        "generate": ["generate", str(run), "--prompt", "hi", "--greedy", "--max-new-tokens", "2"],
        "merge": ["merge", str(run), "--out", str(out / "merged"), "--force"],
        "export gguf": ["export", "gguf", str(run), "--out", str(out / "model.gguf"), "--force"],
        "eval": ["eval", str(run), "--rows", "1", "--samples", "0", "--metric", "none", "--max-new-tokens", "2"],
    }


@pytest.mark.parametrize("command", ["chat", "generate", "merge", "export gguf", "eval"])
def test_a_run_folder_asking_for_remote_code_is_refused_without_the_flag(hostile_run, tmp_path, command):
    run, marker, env = hostile_run
    marker.unlink(missing_ok=True)
    argv = commands(run, tmp_path)[command]
    refused = loraforge(*argv, env=env)
    assert_refused(refused, "refused to run code shipped with the model", f"{run / 'config.yaml'} sets "
                   "model.trust_remote_code: true", "add --trust-remote-code to this command")
    assert not marker.exists(), "code from the run folder ran"
    assert not (tmp_path / "merged").exists() and not (tmp_path / "model.gguf").exists()

    allowed = loraforge(*argv, "--trust-remote-code", env=env)
    assert "refused" not in allowed.stderr and "Traceback" not in allowed.stderr, allowed.stderr[-2000:]
    assert allowed.returncode == 0, allowed.stdout[-2000:] + allowed.stderr[-2000:]
    assert marker.exists(), "with --trust-remote-code the folder's code is loaded: the refusal above was real"


def test_a_folder_naming_code_without_the_config_key_runs_none_of_it(short_run, tmp_path):
    """No trust_remote_code anywhere, but the adapter's tokenizer names its own code (auto_map): a class
    transformers knows is loaded as data and the .py is ignored; an unknown one is refused, naming the flag."""
    run = tmp_path / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    marker = tmp_path / "marker"
    plant(run / "adapter", marker, model=False)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    argv = ["generate", str(run), "--prompt", "hi", "--greedy", "--max-new-tokens", "2"]
    known = loraforge(*argv, env=env)
    assert known.returncode == 0 and not marker.exists(), known.stderr[-2000:]

    config = json.loads((run / "adapter" / "tokenizer_config.json").read_text())
    (run / "adapter" / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "EvilTokenizer"}))
    refused = loraforge(*argv, env=env)
    assert_refused(refused, f"refused to run code shipped with '{run / 'adapter'}'", "auto_map",
                   "add --trust-remote-code")
    assert not marker.exists()
    assert loraforge(*argv, "--trust-remote-code", env=env).returncode == 0 and marker.exists()


def test_a_merged_folder_naming_code_is_exported_without_running_it(short_run, tmp_path):
    """`export gguf MERGED_DIR`: a merged folder has no config.yaml that could ask, so only the flag allows its
    auto_map code; without it transformers' own Llama classes read the folder as data."""
    merged = tmp_path / "merged"
    assert run_cli("merge", str(short_run), "--out", str(merged)).returncode == 0
    marker = tmp_path / "marker"
    plant(merged, marker)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    plain = loraforge("export", "gguf", str(merged), "--out", str(tmp_path / "a.gguf"), env=env)
    assert plain.returncode == 0 and (tmp_path / "a.gguf").is_file(), plain.stderr[-2000:]
    assert not marker.exists(), "the merged folder's code ran without --trust-remote-code"
    allowed = loraforge("export", "gguf", str(merged), "--out", str(tmp_path / "b.gguf"), "--trust-remote-code", env=env)
    assert allowed.returncode == 0 and marker.exists(), allowed.stderr[-2000:]


def test_an_adapter_naming_a_module_for_peft_to_import_is_refused(short_run, tmp_path):
    """PEFT imports the module an adapter config names in megatron_core (allow-listed to megatron.*; the current
    folder is importable under `python -m`): loraforge refuses such an adapter unless asked."""
    run = tmp_path / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    marker = tmp_path / "marker"
    (tmp_path / "megatron").mkdir()
    (tmp_path / "megatron" / "__init__.py").write_text("")
    (tmp_path / "megatron" / "core.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(
        {**config, "megatron_config": {"tensor_model_parallel_size": 1}, "megatron_core": "megatron.core"}))
    argv = ["merge", str(run), "--out", str(tmp_path / "merged")]
    assert_refused(loraforge(*argv, cwd=tmp_path), "refused to run code named by the adapter", "megatron_config",
                   "'megatron.core'", "add --trust-remote-code")
    assert not marker.exists()
    loraforge(*argv, "--trust-remote-code", cwd=tmp_path)  # PEFT goes on to fail on the fake module: only the import
    assert marker.exists()


def test_train_and_data_inspect_refuse_a_recipe_asking_for_remote_code(tiny_model_dir, tmp_path):
    recipe = tmp_path / "shared.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"base": "tiny", "trust_remote_code": True},
                                      "data": {"datasets": [{"path": "someone/data", "trust_remote_code": True}]}}))
    for argv in (["train", str(recipe), "--output-dir", str(tmp_path / "run")], ["data", "inspect", str(recipe)]):
        result = run_cli(*argv)
        assert_refused(result, "refused to run code shipped with the model or data",
                       "model.trust_remote_code, data.datasets[0].trust_remote_code: true",
                       "add --trust-remote-code to this command")
    assert not (tmp_path / "run").exists()


# --- metric code named in a run's or recipe's config ----------------------------------------------------------

METRIC = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n\ndef score(prediction, reference, row):\n" \
         "    return float(bool(prediction))\n"


@pytest.fixture(scope="module")
def metric_run(short_run, tmp_path_factory):
    """A finished run whose config.yaml names a metric file shipped in the folder (as a path and as a module)."""
    work = tmp_path_factory.mktemp("metric")
    run = work / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "eval.json"))
    marker = work / "marker"
    (run / "checks.py").write_text(METRIC.format(marker=str(marker)))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["eval"]["metrics"] = ["exact_match", f"{run / 'checks.py'}:score", "checks:score"]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run, marker


def test_eval_runs_no_metric_code_from_the_run_folder_unless_asked(metric_run):
    run, marker = metric_run
    marker.unlink(missing_ok=True)
    argv = ["eval", str(run), "--split", "train", "--rows", "1", "--samples", "0", "--max-new-tokens", "2"]
    refused = run_cli(*argv, cwd=run)  # the folder is the current one: `checks:score` would import from it
    assert_refused(refused, f"refused to run metric code named in {run / 'config.yaml'}",
                   f"eval.metrics names {run / 'checks.py'}:score, checks:score", "add --allow-metric-code",
                   "--metric SPEC")
    assert not marker.exists() and not (run / "eval.json").exists()

    allowed = run_cli(*argv, "--allow-metric-code", cwd=run)
    assert allowed.returncode == 0, allowed.stdout[-2000:] + allowed.stderr[-2000:]
    assert marker.exists()
    assert list(json.loads((run / "eval.json").read_text())["metrics"]) == \
           ["exact_match", f"{run / 'checks.py'}:score", "checks:score"]


def test_train_refuses_metric_code_in_the_config_before_training(tiny_model_dir, tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "checks.py").write_text(METRIC.format(marker=str(marker)))
    result = run_cli("train", "tiny", "--set", f"eval.metrics=[{tmp_path / 'checks.py'}:score]", "--output-dir",
                     str(tmp_path / "run"), cwd=tmp_path)
    assert_refused(result, "refused to run metric code named in the config (tiny and --set)",
                   f"{tmp_path / 'checks.py'}:score", "add --allow-metric-code")
    assert "--metric SPEC" not in result.stderr  # train has no --metric
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_only_loraforges_own_metrics_run_from_a_config(tmp_path, monkeypatch):
    from loraforge.errors import UserError
    from loraforge.evaluate.metrics import resolve_metrics

    source = str(tmp_path / "config.yaml")
    assert [m.name for m in resolve_metrics(["rouge_l", "loraforge.evaluate.sql:execution_match"], source)] == \
           ["rouge_l", "loraforge.evaluate.sql:execution_match"]
    # Any other function, loraforge's included: called as f(prediction, reference, row), the model's answer
    # would choose its first argument (write_text_whole(path, text) would write a file).
    with pytest.raises(UserError, match="loraforge.atomic:write_text_whole"):
        resolve_metrics(["loraforge.atomic:write_text_whole"], source)
    assert [m.name for m in resolve_metrics(["loraforge.atomic:write_text_whole"], source, allow_code=True)] == \
           ["loraforge.atomic:write_text_whole"]
    # Allowed config metrics are imported as installed, never from the current folder.
    (tmp_path / "folder_metric.py").write_text("def score(p, r, row):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(UserError, match="cannot import module 'folder_metric'"):
        resolve_metrics(["folder_metric:score"], source, allow_code=True)
    assert [m.name for m in resolve_metrics(["folder_metric:score"])] == ["folder_metric:score"]  # typed: found
