"""`loraforge chat` and `loraforge generate` as a user runs them, and their errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from cli_runner import run_cli


def chat_cli(*args: str, lines: str) -> subprocess.CompletedProcess:
    """`loraforge chat` with its stdin piped, as in `printf ... | loraforge chat RUN_DIR`."""
    return subprocess.run([sys.executable, "-m", "loraforge", "chat", *args], input=lines, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))


def test_chat_piped_multi_turn_with_reset_and_exit(short_run):
    result = chat_cli(str(short_run), "--greedy", "--max-new-tokens", "16",
                      lines="hello\nhow are you?\n/reset\nhi\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model> ") == 3
    assert "(history cleared)" in result.stdout
    assert "[INST]" not in result.stdout and "</s>" not in result.stdout
    assert "template llama2" in result.stderr and "adapter on the base" in result.stderr


def test_generate_one_prompt_with_the_adapter_and_with_the_base(short_run):
    from loraforge.infer.generate import generate_reply, reply_stop_strings
    from loraforge.infer.session import load_session

    question = "How can I make my writing more concise?"
    args = ("generate", str(short_run), "--prompt", question, "--greedy", "--max-new-tokens", "12")
    tuned, base = run_cli(*args), run_cli(*args, "--base")
    assert tuned.returncode == base.returncode == 0, tuned.stderr + base.stderr
    assert "adapter on the base" in tuned.stderr and "base model only" in base.stderr
    session = load_session(short_run, base_only=True)
    prompt = session.template.prompt([{"role": "user", "content": question}])
    expected = generate_reply(session.model, session.tokenizer, prompt, max_new_tokens=12,
                              stop_strings=reply_stop_strings(session.template))
    assert base.stdout.strip() == expected and tuned.stdout.strip() != expected


def test_generate_file_writes_answers_and_refuses_to_overwrite(short_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": "What is the capital of France?"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]}) + "\n")
    answers = tmp_path / "answers.jsonl"
    first = run_cli("generate", str(short_run), "--input", str(prompts), "--output", str(answers), "--greedy",
                    "--max-new-tokens", "16")
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["What is the capital of France?", "Name a color."]
    assert rows[0]["id"] == 1 and all(isinstance(r["answer"], str) for r in rows)
    assert "2 answers written" in first.stderr

    refused = run_cli("generate", str(short_run), "--input", str(prompts), "--output", str(answers))
    assert refused.returncode == 2 and "--force" in refused.stderr and "Traceback" not in refused.stderr
    forced = run_cli("generate", str(short_run), "--input", str(prompts), "--output", str(answers), "--force",
                     "--greedy", "--max-new-tokens", "16")
    assert forced.returncode == 0 and [json.loads(x) for x in answers.read_text().splitlines()] == rows


def test_bad_prompt_rows_are_listed_by_line_before_loading(short_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n{"messages": [{"role": "assistant", "content": "x"}]}\n{"q": 1}\n')
    result = run_cli("generate", str(short_run), "--input", str(bad), "--output", str(tmp_path / "a.jsonl"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for expected in ("3 bad row(s)", "line 2: not valid JSON", "line 3:", 'line 4: no "prompt"'):
        assert expected in result.stderr
    assert not (tmp_path / "a.jsonl").exists()


def test_a_run_without_adapter_is_refused_by_every_command(short_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.yaml", "template.json"):
        shutil.copy(short_run / name, unfinished / name)
    commands = [("chat", str(unfinished)), ("generate", str(unfinished), "--prompt", "hi"),
                ("merge", str(unfinished), "--out", str(tmp_path / "m")),
                ("export", "gguf", str(unfinished), "--out", str(tmp_path / "m.gguf"))]
    for args in commands:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "has no adapter" in result.stderr and "--resume" in result.stderr, args
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("args, message", [
    (["generate", "{run}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "{run}", "--prompt", "hi", "--top-p", "1.5"], "--top-p in (0, 1]"),
    (["chat", "{run}", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "{run}", "--prompt", "hi", "--output", "{tmp}/a.jsonl"], "--output goes with --input"),
    (["generate", "{run}", "--prompt", "   "], "--prompt is empty"),
    (["generate", "{run}", "--prompt", "hi", "--greedy", "--temperature", "0.9"], "give --greedy or --temperature"),
    (["generate", "{tmp}/nowhere", "--prompt", "hi"], "not found"),
    (["chat", "{tmp}"], "has no config.yaml"),
])
def test_bad_options_are_one_clear_message(short_run, tmp_path, args, message):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    result = run_cli(*[a.format(run=short_run, tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "a.jsonl").exists()
