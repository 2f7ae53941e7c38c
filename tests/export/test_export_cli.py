"""`loraforge merge` / `export`: refusals with one clear message, and Hub uploads mocked at the network boundary."""
import shutil

import pytest
from huggingface_hub import HfApi

from cli_runner import run_cli
from loraforge.cli import main


def test_existing_outputs_are_refused_unless_forced(short_run, tmp_path):
    taken_dir, taken_file = tmp_path / "merged", tmp_path / "model.gguf"
    taken_dir.mkdir()
    (taken_dir / "keep.txt").write_text("mine")
    taken_file.write_text("mine")
    for args in (("merge", str(short_run), "--out", str(taken_dir)),
                 ("export", "gguf", str(short_run), "--out", str(taken_file))):
        result = run_cli(*args)
        assert result.returncode == 2 and "already exists" in result.stderr and "--force" in result.stderr
        assert "Traceback" not in result.stderr
    assert (taken_dir / "keep.txt").read_text() == "mine" and taken_file.read_text() == "mine"

    refused = run_cli("export", "gguf", str(short_run), "--out", str(taken_file), "--type", "f32", "--force")
    assert refused.returncode == 2 and "is not a GGUF file" in refused.stderr, refused.stderr
    assert taken_file.read_text() == "mine", "--force replaces only a GGUF file"
    taken_file.write_bytes(b"GGUF" + bytes(60))  # an older export
    forced = run_cli("export", "gguf", str(short_run), "--out", str(taken_file), "--type", "f32", "--force")
    assert forced.returncode == 0, forced.stderr
    assert taken_file.read_bytes()[:4] == b"GGUF"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")], "no scratch file is left behind"

    into_run = run_cli("merge", str(short_run), "--out", str(short_run), "--force")
    assert into_run.returncode == 2 and "training run directory" in into_run.stderr


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path, short_run):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(gpt2)
    result = run_cli("export", "gguf", str(gpt2), "--out", str(tmp_path / "x.gguf"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "GPT2LMHeadModel" in result.stderr and "LlamaForCausalLM" in result.stderr
    assert "convert_hf_to_gguf.py" in result.stderr

    run_on_gpt2 = tmp_path / "run"  # a run whose base is not a Llama: refused before any weights load
    shutil.copytree(short_run / "adapter", run_on_gpt2 / "adapter")
    shutil.copy(short_run / "template.json", run_on_gpt2)
    (run_on_gpt2 / "config.yaml").write_text((short_run / "config.yaml").read_text().replace(
        "base: tiny", f"base: {gpt2}"))
    result = run_cli("export", "gguf", str(run_on_gpt2), "--out", str(tmp_path / "y.gguf"))
    assert result.returncode == 2 and "GPT2LMHeadModel" in result.stderr
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


class FakeHub:
    """Stands in for the Hub's HTTP API only: records what would be uploaded."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs.get("private"), api.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, api, *, folder_path, repo_id, **kwargs):
        from pathlib import Path

        self.uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: fake.upload_folder(api, **kw))
    return fake


def test_adapter_is_copied_and_pushed(short_run, tmp_path, hub, capsys):
    out = tmp_path / "adapter-copy"
    assert main(["export", "adapter", str(short_run), "--out", str(out), "--push-to-hub", "me/tiny-adapter",
                 "--private"]) == 0
    printed = capsys.readouterr()
    assert {"adapter_config.json", "adapter_model.safetensors", "template.json"} <= {p.name for p in out.iterdir()}
    assert hub.repos == [("me/tiny-adapter", True, "hf_secret_value_123")]
    assert hub.uploads[0][0] == "me/tiny-adapter" and "adapter_model.safetensors" in hub.uploads[0][1]
    assert "https://huggingface.co/me/tiny-adapter" in printed.out
    assert "hf_secret_value_123" not in printed.out + printed.err


def test_merge_pushes_the_merged_folder(short_run, tmp_path, hub, capsys):
    assert main(["merge", str(short_run), "--out", str(tmp_path / "merged"), "--push-to-hub", "me/tiny-merged"]) == 0
    assert hub.uploads[0][0] == "me/tiny-merged"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"} <= set(hub.uploads[0][1])
    assert "hf_secret_value_123" not in "".join(capsys.readouterr())


def test_a_refused_upload_is_one_clear_error(short_run, monkeypatch, hub, capsys):
    from huggingface_hub.errors import HfHubHTTPError
    from requests import Response

    response = Response()
    response.status_code = 401

    def refuse(api, **kwargs):
        raise HfHubHTTPError("401 Unauthorized", response=response)

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    assert main(["export", "adapter", str(short_run), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "HF_TOKEN" in err and "hf_secret_value_123" not in err
    assert main(["export", "adapter", str(short_run), "--push-to-hub", "not-a-repo-id"]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err
