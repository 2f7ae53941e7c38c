"""Shared fixtures: an isolated cache for the built-in models (tiny, and the real default SmolLM2), and one short
CLI training run of each."""
import os
from pathlib import Path

import pytest

from cli_runner import SHORT_RUN_STEPS, SMOLLM2_RUN_STEPS, run_cli

# Offline, and the tiny model is built into a throwaway folder, never the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if "LORAFORGE_TEST_HOME" not in os.environ:
    import tempfile

    os.environ["LORAFORGE_TEST_HOME"] = tempfile.mkdtemp(prefix="loraforge-test-home-")
os.environ["LORAFORGE_HOME"] = os.environ["LORAFORGE_TEST_HOME"]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from loraforge.model.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def short_run(tmp_path_factory, tiny_model_dir) -> Path:
    """One real NF4 training run of the demo through the CLI, shared by the tests that use its outputs."""
    run_dir = tmp_path_factory.mktemp("runs") / "short"
    result = run_cli("train", "tiny", "--set", f"train.max_steps={SHORT_RUN_STEPS}", "--set", "train.save_steps=8",
                     "--set", "train.eval_steps=12", "--set", "train.logging_steps=8",
                     "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir / "stdout.txt").write_text(result.stdout)
    return run_dir


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real default model's checkpoint, built once per session from the packaged GGUF file."""
    from loraforge.model.smollm2 import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_short_run(tmp_path_factory, smollm2_dir) -> Path:
    """The default recipe (`loraforge train` with no recipe) on the real model, cut short: NF4 training through
    the CLI, then the base-vs-tuned evaluation it ends with, on a few held-out rows. Sized for CI's 2-core CPU."""
    run_dir = tmp_path_factory.mktemp("runs") / "smollm2"
    result = run_cli("train", "--set", f"train.max_steps={SMOLLM2_RUN_STEPS}", "--set", "train.micro_batch_size=2",
                     "--set", "eval.rows=2", "--set", "eval.max_new_tokens=16", "--set", "samples=2",
                     "--set", "train.logging_steps=1", "--output-dir", str(run_dir), timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(result.stdout)
    return run_dir
