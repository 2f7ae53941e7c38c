"""`loraforge serve` on the real default model (the short NF4 run of SmolLM2-135M-Instruct that the suite shares):
several clients at once, answered in batches, get exactly `loraforge generate --greedy`'s answers."""
import json
import threading

import openai

from cli_runner import run_cli
from serve_runner import ServeProcess

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Explain, step by step and with an example, how a hash map handles collisions."}],
    [{"role": "system", "content": "You write SQLite queries."},
     {"role": "user", "content": "CREATE TABLE t (a INTEGER, b TEXT); INSERT INTO t VALUES (1, 'x'), (2, 'y');\n"
                                 "How many rows does t have?"}],
]


def test_concurrent_answers_of_the_real_model_equal_generate(smollm2_short_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    generated = run_cli("generate", str(smollm2_short_run), "--input", str(prompts), "--greedy",
                        "--max-new-tokens", "32")
    assert generated.returncode == 0, generated.stderr
    expected = [json.loads(line)["answer"] for line in generated.stdout.splitlines()]
    assert len(set(expected)) == len(CHATS) and "Paris" in expected[0]

    server = ServeProcess(smollm2_short_run)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        got = [None] * len(CHATS)

        def ask(i: int) -> None:
            got[i] = client.chat.completions.create(model=smollm2_short_run.name, messages=CHATS[i], temperature=0,
                                                    max_tokens=32).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(CHATS))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert got == expected
        assert server.health()["largest_batch"] >= 2, "the clients were answered together"
    finally:
        assert server.stop() in (0, 130)
