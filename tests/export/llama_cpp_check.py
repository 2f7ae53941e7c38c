"""llama.cpp (through llama-cpp-python) against transformers: tokenization of a corpus, and greedy answers.

llama.cpp runs in a child process: a crash in native code then fails one test instead of ending the session.
"""
import json
import subprocess
import sys
from pathlib import Path

import torch

ANSWER_TOKENS = 32

CHILD = """
import json, sys
import llama_cpp
from llama_cpp import Llama
path, job = sys.argv[1], json.loads(open(sys.argv[2]).read())
llm = Llama(model_path=path, n_ctx=1024, n_threads=1, seed=0, verbose=False, vocab_only=not job["prompts"])
out = {"plain": [llm.tokenize(s.encode(), add_bos=False, special=True) for s in job["strings"]],
       "added": [llm.tokenize(s.encode(), add_bos=True, special=True) for s in job["strings"]],
       "answers": []}
vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
out["end_of_generation"] = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
for prompt in job["prompts"]:
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    answer = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        answer.append(token)
        if token in out["end_of_generation"] or len(answer) == job["max_tokens"]:
            break
    out["answers"].append(answer)
print(json.dumps(out))
"""


def run_llama_cpp(gguf: Path, strings=(), prompts=(), max_tokens: int = ANSWER_TOKENS) -> dict:
    """llama.cpp's token ids for `strings` (without and with the special tokens it adds), its end-of-generation
    ids, and greedy answers to `prompts` (each up to an end-of-generation token or `max_tokens`)."""
    job = gguf.with_suffix(".job.json")
    job.write_text(json.dumps({"strings": list(strings), "prompts": list(prompts), "max_tokens": max_tokens}))
    child = subprocess.run([sys.executable, "-c", CHILD, str(gguf), str(job)], capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def tokenization_mismatches(tokenizer, strings, got: dict) -> list:
    """(string, llama.cpp ids, transformers ids) wherever they differ, without or with added special tokens."""
    bad = []
    for text, plain, added in zip(strings, got["plain"], got["added"]):
        expected_plain = tokenizer(text, add_special_tokens=False).input_ids
        expected_added = tokenizer(text).input_ids
        if plain != expected_plain or added != expected_added:
            bad.append((text, plain, expected_plain))
    return bad


def transformers_answers(model, tokenizer, prompts, stop_ids, max_tokens: int = ANSWER_TOKENS) -> list:
    """Greedy answers (token ids, the stop token included), up to `max_tokens`."""
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens, eos_token_id=list(stop_ids),
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(out[0, ids.shape[1]:].tolist())
    return answers


def agreement(got: list, expected: list, tokens: int = ANSWER_TOKENS) -> float:
    """The fraction of prompts whose answers agree on their first `tokens` tokens."""
    same = sum(a[:tokens] == b[:tokens] for a, b in zip(got, expected))
    return same / len(expected)


def mean_common_prefix(got: list, expected: list, tokens: int = ANSWER_TOKENS) -> float:
    """How many leading tokens the answers share, on average (at most `tokens`)."""
    def common(a, b):
        n = 0
        while n < min(len(a), len(b), tokens) and a[n] == b[n]:
            n += 1
        return n
    return sum(common(a, b) for a, b in zip(got, expected)) / len(expected)
