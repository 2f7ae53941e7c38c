"""`loraforge serve RUN_DIR` through the official `openai` client and raw HTTP, against a real server process: greedy
answers equal `loraforge generate --greedy`'s, streamed and not; two clients at once share a batch and each gets its
own answer; 4xx errors in OpenAI's shape; the API key; a client that leaves mid-stream stops only its own
generation; the web page in headless Chromium."""
import http.client
import json
import socket
import threading
import time

import openai
import pytest

from cdp_browser import CHROMIUM, Browser
from cli_runner import run_cli
from serve_runner import ServeProcess

API_KEY = "test-key-5f2c9e"  # passed through the environment, as the README advises
# A sampled completion of the tiny run that goes on for over 200 tokens before EOS (seed and temperature fixed).
LONG = {"prompt": "Once upon a time", "temperature": 2.0, "seed": 7}


@pytest.fixture(scope="module")
def server(short_run):
    process = ServeProcess(short_run, env={"LORAFORGE_API_KEY": API_KEY})
    yield process
    assert process.stop() in (0, 130), process.output  # Ctrl-C: a clean stop


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


CONVERSATIONS = [
    [{"role": "user", "content": "How can I make my writing more concise?"}],
    [{"role": "system", "content": "You are a kind teacher for young children."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "What is an atom made of?"}, {"role": "assistant", "content": "Protons."},
     {"role": "user", "content": "And what else?"}],
]


def test_greedy_answers_equal_generate_streamed_and_not(server, client, short_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    generated = run_cli("generate", str(short_run), "--input", str(prompts), "--greedy", "--max-new-tokens", "24")
    assert generated.returncode == 0, generated.stderr
    expected = [json.loads(line)["answer"] for line in generated.stdout.splitlines()]

    assert [m.id for m in client.models.list()] == [short_run.name]
    for messages, answer in zip(CONVERSATIONS, expected):
        whole = client.chat.completions.create(model=short_run.name, messages=messages, temperature=0, max_tokens=24)
        assert whole.choices[0].message.content == answer
        assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.prompt_tokens > 5
        chunks = list(client.chat.completions.create(model=short_run.name, messages=messages, temperature=0,
                                                     max_tokens=24, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_sampling_with_a_seed_repeats_and_streams_the_same_text(client, short_run):
    ask = dict(model=short_run.name, messages=CONVERSATIONS[0], temperature=1.0, top_p=0.95, max_tokens=40)
    first = client.chat.completions.create(**ask, seed=11).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, seed=11,
                                                                                                 stream=True))
    other = client.chat.completions.create(**ask, seed=12).choices[0].message.content
    assert len(first.split()) > 3 and first == streamed and other != first


def test_completions_continue_the_raw_text_as_generate_reply_does(server, client, short_run):
    from loraforge.infer.generate import generate_reply
    from loraforge.infer.session import load_session

    session = load_session(short_run)
    expected = generate_reply(session.model, session.tokenizer, session.tokenizer.bos_token + LONG["prompt"],
                              max_new_tokens=30, temperature=0.0)
    got = client.completions.create(model=short_run.name, prompt=LONG["prompt"], temperature=0, max_tokens=30)
    assert got.choices[0].text == expected and got.object == "text_completion"
    cut = client.completions.create(model=short_run.name, max_tokens=60, **{**LONG, "stop": ["e"]})
    assert cut.choices[0].finish_reason == "stop" and "e" not in cut.choices[0].text


def _chat(client, short_run, results, key, **settings):
    reply = client.chat.completions.create(model=short_run.name, messages=CONVERSATIONS[0], max_tokens=16, **settings)
    results[key] = reply.choices[0].message.content


def test_two_clients_at_once_share_a_batch_and_get_their_own_answers(server, client, short_run):
    greedy, sampled = dict(temperature=0), dict(temperature=1.0, seed=5)
    alone: dict = {}
    _chat(client, short_run, alone, "greedy", **greedy)
    _chat(client, short_run, alone, "sampled", **sampled)
    before = server.health()

    together: dict = {}
    busy = threading.Thread(target=lambda: client.completions.create(model=short_run.name, max_tokens=60, **LONG))
    busy.start()  # keeps the worker busy while the two clients send, so that both wait for the same next batch
    deadline = time.monotonic() + 60
    while server.health()["running"] == 0 and busy.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    clients = [threading.Thread(target=_chat, args=(client, short_run, together, key), kwargs=settings)
               for key, settings in (("greedy", greedy), ("sampled", sampled))]
    for thread in clients:
        thread.start()
    for thread in [busy, *clients]:
        thread.join(timeout=120)
    after = server.health()
    assert together == alone and len(set(alone.values())) == 2
    assert after["answered"] - before["answered"] == 3 and after["batches"] - before["batches"] <= 2
    assert after["largest_batch"] >= 2


BAD_REQUESTS = [  # (path, body, status, words in the message, param)
    ("/v1/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "n": 2},
     400, "n: only 1 is supported", "n"),
    ("/v1/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "temperature": 3}, 400, "unrecognized request argument: logprobs", "temperature"),
    ("/v1/chat/completions", {"model": "{model}", "messages": []}, 400, "messages:", "messages"),
    ("/v1/chat/completions", {"model": "{model}", "messages": [{"role": "assistant", "content": "hi"}]},
     400, "expected a user turn", "messages"),
    ("/v1/chat/completions", {"model": "{model}", "messages": [{"role": "tool", "content": "hi"}]},
     400, "messages.0.role", "messages.0.role"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
     404, "this server serves", "model"),
    ("/v1/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 5000}, 400, "context is 1024 tokens", "max_tokens"),
    ("/v1/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": "word " * 1100}]},
     400, "context is 1024 tokens", "messages"),
    ("/v1/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": "hi"}],
                              "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop"),
    ("/v1/completions", {"model": "{model}", "prompt": ["one", "two"]}, 400, "one prompt per request", "prompt"),
    ("/v1/completions", {"model": "{model}", "prompt": ""}, 400, "prompt: empty", "prompt"),
    ("/v1/chat/completions", b'{"model": "x", "messages": [', 400, "not valid JSON", None),
    ("/v1/nowhere", {}, 404, "the API is under /v1", None),
]


def test_bad_requests_get_4xx_errors_in_openais_shape(server, short_run):
    for path, body, status, words, param in BAD_REQUESTS:
        if isinstance(body, dict):
            body = json.loads(json.dumps(body).replace("{model}", short_run.name))
        headers = {**auth(), "Content-Type": "application/json"} if isinstance(body, bytes) else auth()
        got_status, got = server.request("POST", path, body, headers)
        assert got_status == status, (path, body, got)
        assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}, got
        assert words in got["error"]["message"] and got["error"]["param"] == param, (body, got)
    # a JSON body sent as a form (curl -d without the header) or a cross-site page's text/plain POST is refused
    status, got = server.request("POST", "/v1/chat/completions", b'{"model": "m"}',
                                 {**auth(), "Content-Type": "text/plain"})
    assert status == 400 and "Content-Type: application/json" in got["error"]["message"]
    status, got = server.request("GET", "/health", headers={"Host": "attacker.example:80"})
    assert status == 400 and "invalid Host header" in got["error"]["message"]
    assert server.health()["status"] == "ok"  # and the server still serves


def test_the_api_key_is_required_on_the_api_and_never_shown(server, short_run):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, got = server.get("/v1/models", headers)
        assert status == 401 and got["error"]["code"] == "invalid_api_key", (headers, got)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=short_run.name, messages=CONVERSATIONS[0])
    assert server.get("/")[0] == 200 and server.get("/health")[0] == 200  # the page and health need no key
    assert "API key required" in server.output and API_KEY not in server.output


def _read_events(response, count: int) -> list[dict]:
    events = []
    while len(events) < count:
        line = response.readline().decode()
        if line.startswith("data: {"):
            events.append(json.loads(line[6:]))
    return events


def test_a_client_that_disconnects_mid_stream_stops_only_its_generation(server, client, short_run):
    alone: dict = {}
    _chat(client, short_run, alone, "greedy", temperature=0)
    before = server.health()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request("POST", "/v1/completions", json.dumps({"model": short_run.name, "max_tokens": 200,
                                                              "stream": True, **LONG}),
                       {**auth(), "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    other: dict = {}
    staying = threading.Thread(target=_chat, args=(client, short_run, other, "greedy"), kwargs={"temperature": 0})
    staying.start()
    assert all(e["choices"][0]["text"] for e in _read_events(response, 3))
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    staying.join(timeout=120)
    deadline = time.monotonic() + 60
    while (server.health()["answered"] < before["answered"] + 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    after = server.health()
    assert other == alone, "the other client's answer is whole and unchanged"
    assert after["cancelled"] == before["cancelled"] + 1
    left_tokens = after["generated_tokens"] - before["generated_tokens"]
    assert left_tokens < 60 + 16, f"generation went on after the client left ({left_tokens} tokens)"
    assert server.health()["status"] == "ok"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: apt-get install chromium)")
def test_the_web_page_chats_with_streamed_answers_in_a_real_browser(server, client, short_run, tmp_path):
    question = CONVERSATIONS[0][0]["content"]
    expected = client.chat.completions.create(model=short_run.name, messages=CONVERSATIONS[0], temperature=0,
                                              max_tokens=24).choices[0].message.content
    browser = Browser(tmp_path / "profile")
    try:
        browser.send("Page.navigate", {"url": server.url + "/"})
        # the server wants a key: the page says so and asks for it
        assert browser.wait_for("document.querySelector('#model').textContent === 'API key needed' && "
                                "!document.querySelector('#key-row').hidden")
        browser.evaluate(f"const k = document.querySelector('#key'); k.value = {json.dumps(API_KEY)}; "
                         "k.dispatchEvent(new Event('change'))")
        assert browser.wait_for(f"document.querySelector('#model').textContent === 'model: {short_run.name}'")
        browser.evaluate("document.querySelector('#temperature').value = '0'; "
                         "document.querySelector('#max-tokens').value = '24'; document.querySelector('#prompt').focus()")
        browser.type_text(question)
        browser.press_enter()
        done = "document.querySelectorAll('.msg.assistant[data-done=\"true\"]').length"
        browser.wait_for(f"{done} === 1")
        assert browser.evaluate("[...document.querySelectorAll('.msg')].map(m => m.className + ':' + m.textContent)") \
            == [f"msg user:{question}", f"msg assistant:{expected}"]

        # a sampled, longer reply arrives in pieces: the bubble changes several times before it is done
        browser.evaluate("document.querySelector('#temperature').value = '1.5'; "
                         "document.querySelector('#max-tokens').value = '40'; window.updates = 0; "
                         "new MutationObserver(() => window.updates++).observe(document.querySelector('#log'), "
                         "{subtree: true, childList: true, characterData: true}); "
                         "document.querySelector('#prompt').focus()")
        browser.type_text("Tell me more.")
        browser.press_enter()
        browser.wait_for(f"{done} === 2")
        last = browser.evaluate("(() => { const b = [...document.querySelectorAll('.msg.assistant')].pop(); "
                                "return [b.textContent, b.dataset.finish, window.updates]; })()")
        assert last[0].strip() and last[1] in ("stop", "length") and last[2] >= 4, last
        assert browser.errors() == []
    finally:
        browser.close()
