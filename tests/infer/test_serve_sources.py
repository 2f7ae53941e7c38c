"""`loraforge serve` on what export writes: a merged folder (transformers, float32) and a GGUF file (llama.cpp, where
llama-cpp-python is installed); and its refusals, each one clear message before any model loads."""
import importlib.util
import json
import shutil
import socket

import pytest

from cli_runner import run_cli
from serve_runner import ServeProcess

QUESTION = [{"role": "user", "content": "How can I make my writing more concise?"}]


def chat(server, name: str, stream: bool = False) -> str:
    status, body = server.request("POST", "/v1/chat/completions", {"model": name, "messages": QUESTION,
                                                                   "temperature": 0, "max_tokens": 24,
                                                                   "stream": stream})
    assert status == 200, body
    if not stream:
        return body["choices"][0]["message"]["content"]
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events)


def test_a_merged_folder_is_served_in_its_training_template(short_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.data.templates import template_from_record
    from loraforge.infer.generate import generate_reply, reply_stop_strings

    merged = tmp_path / "merged"
    assert run_cli("merge", str(short_run), "--out", str(merged)).returncode == 0
    tokenizer = AutoTokenizer.from_pretrained(merged)
    template = template_from_record(json.loads((merged / "template.json").read_text()), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(merged)
    expected = generate_reply(model, tokenizer, template.prompt(QUESTION), max_new_tokens=24,
                              stop_strings=reply_stop_strings(template))
    server = ServeProcess(merged)
    try:
        assert "merged model" in server.output and "template llama2" in server.output
        assert chat(server, "merged") == expected == chat(server, "merged", stream=True)
    finally:
        assert server.stop() in (0, 130)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (it compiles llama.cpp; README gives the command)")
def test_a_gguf_file_is_served_through_llama_cpp_in_the_training_template(short_run, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from loraforge.data.templates import template_from_record

    gguf = tmp_path / "tiny.gguf"
    assert run_cli("export", "gguf", str(short_run), "--out", str(gguf)).returncode == 0
    tokenizer = AutoTokenizer.from_pretrained(short_run / "adapter")
    template = template_from_record(json.loads((short_run / "template.json").read_text()), tokenizer)
    ids = tokenizer(template.prompt(QUESTION), add_special_tokens=False).input_ids
    llm = Llama(model_path=str(gguf), n_ctx=256, verbose=False)
    answer = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        if token == tokenizer.eos_token_id or len(answer) == 24:
            break
        answer.append(token)
    expected = tokenizer.decode(answer, skip_special_tokens=True).strip()
    server = ServeProcess(gguf)
    try:
        assert "llama.cpp" in server.output and "template llama2" in server.output
        assert "one at a time" in server.output  # said, not silent: llama-cpp-python decodes one sequence
        assert chat(server, "tiny") == expected == chat(server, "tiny", stream=True)
    finally:
        assert server.stop() in (0, 130)


def test_refusals_are_one_clear_message(short_run, tmp_path):
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"GGUF")
    no_llama_cpp = tmp_path / "hide"  # llama-cpp-python as if not installed
    no_llama_cpp.mkdir()
    (no_llama_cpp / "llama_cpp.py").write_text("raise ImportError('hidden by the test')\n")
    trusting = tmp_path / "trusting"
    shutil.copytree(short_run, trusting, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    config = trusting / "config.yaml"
    config.write_text(config.read_text().replace("trust_remote_code: false", "trust_remote_code: true"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = [
            ((str(tmp_path / "nowhere"),), {}, "does not exist"),
            ((str(not_gguf),), {}, "not a .gguf"),
            ((str(tmp_path),), {}, "neither a run directory"),
            ((str(fake_gguf),), {"PYTHONPATH": f"{no_llama_cpp}:{__import__('os').environ.get('PYTHONPATH', '')}"},
             "pip install llama-cpp-python"),
            ((str(short_run), "--port", port), {}, f"cannot listen on 127.0.0.1:{port}"),
            ((str(short_run), "--max-batch-size", "0"), {}, "--max-batch-size must be at least 1"),
            ((str(trusting),), {}, "never runs code named in a run folder"),
        ]
        for args, env, message in cases:
            result = run_cli("serve", *args, *(() if "--port" in args else ("--port", "0")), env=env)
            assert result.returncode == 2, (args, result.stderr)
            assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
