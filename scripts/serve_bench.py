"""What batching buys `loraforge serve`: CLIENTS clients send greedy chat requests at once, against the server with
--max-batch-size 1 (one request at a time) and with the default 8; prints wall time and generated tokens/s of each.

    python scripts/serve_bench.py RUN_DIR [--clients 1,2,4,8] [--max-tokens 48]

Each client asks a different question; the answers of both servers are checked to be identical (greedy)."""
import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

QUESTIONS = ["What is the capital of France?", "Name three colours.", "How do I boil an egg?",
             "Explain what a hash map is.", "Write a haiku about the sea.", "What is 12 times 7?",
             "Give me a tip for writing clearly.", "Why is the sky blue?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=900) as r:
        return json.loads(r.read())


def start(source: str, batch: int):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "loraforge", "serve", source, "--port", str(port),
                                "--max-batch-size", str(batch)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return process, url
        except OSError:
            time.sleep(0.25)
    process.kill()
    raise SystemExit("the server did not start")


def round_of(url: str, model: str, clients: int, max_tokens: int):
    answers, tokens = [None] * clients, [0] * clients

    def ask(i: int) -> None:
        reply = post(url + "/v1/chat/completions", {"model": model, "temperature": 0, "max_tokens": max_tokens,
                                                    "messages": [{"role": "user", "content": QUESTIONS[i % 8]}]})
        answers[i], tokens[i] = reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    start_time = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start_time, sum(tokens), answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    print(f"load average before: {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    results = {}
    for batch in (1, 8):
        process, url = start(args.source, batch)
        try:
            model = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["id"]
            round_of(url, model, 1, 4)  # warm-up
            for clients in counts:
                results[batch, clients] = round_of(url, model, clients, args.max_tokens)
        finally:
            process.terminate()
            process.wait()
    print("| clients | one at a time: s, tokens/s | batched (8): s, tokens/s | speed-up | same answers |")
    print("|---|---|---|---|---|")
    for clients in counts:
        (t1, n1, a1), (t8, n8, a8) = results[1, clients], results[8, clients]
        print(f"| {clients} | {t1:.1f}, {n1 / t1:.1f} | {t8:.1f}, {n8 / t8:.1f} | {t1 / t8:.2f}x | {a1 == a8} |")


if __name__ == "__main__":
    main()
