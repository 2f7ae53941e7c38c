"""llama.cpp itself (through llama-cpp-python, which CI installs) loads the exported GGUF and agrees with
transformers: same tokens for the chat prompt, logits within 5e-3 (measured 4e-4 for f16), the same 24 greedy
tokens, and a chat completion through the file's own chat template gives the merged model's reply."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from loraforge.export.gguf import export_gguf
from loraforge.export.merge import merge_run
from loraforge.infer.generate import generate_reply, reply_stop_strings
from loraforge.rundir import read_run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed (it compiles llama.cpp; README gives "
                                "the command that runs these)")

QUESTION = "How can I make my writing more concise?"
STEPS = 24

# Run in a child process: a crash in native code fails this test instead of ending the whole session.
LLAMA_CPP_SCRIPT = """
import json, sys
import numpy as np
from llama_cpp import Llama, LogitsProcessorList
path, prompt, question, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=512, logits_all=True, n_threads=2, seed=0, verbose=False)
ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
llm.eval(ids)
last = llm.scores[len(ids) - 1].tolist()
def no_eos(_, scores):
    scores[llm.token_eos()] = -np.inf
    return scores
tokens = []
for token in llm.generate(ids, top_k=1, temp=0.0, reset=True, logits_processor=LogitsProcessorList([no_eos])):
    tokens.append(token)
    if len(tokens) == steps:
        break
chat = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0.0, max_tokens=48)
print(json.dumps({"ids": ids, "last_logits": last, "tokens": tokens,
                  "reply": chat["choices"][0]["message"]["content"]}))
"""


def test_llama_cpp_loads_the_gguf_and_agrees(short_run, tmp_path):
    path = tmp_path / "model-f16.gguf"
    export_gguf(short_run, path, "f16")
    merged = merge_run(read_run(short_run), torch.float32)
    prompt = merged.template.prompt([{"role": "user", "content": QUESTION}])

    child = subprocess.run([sys.executable, "-c", LLAMA_CPP_SCRIPT, str(path), prompt, QUESTION, str(STEPS)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])

    ids = merged.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    assert got["ids"] == ids[0].tolist(), "llama.cpp must tokenize the chat prompt exactly as training did"
    with torch.no_grad():
        last = merged.model(input_ids=ids).logits[0, -1]
        expected = merged.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         min_new_tokens=STEPS, max_new_tokens=STEPS, pad_token_id=0)
    difference = (torch.tensor(got["last_logits"]) - last).abs().max().item()
    print(f"AGREEMENT GGUF f16 in llama.cpp vs merged: largest logit difference {difference:.2e}")
    assert difference < 5e-3
    assert got["tokens"] == expected[0, ids.shape[1]:].tolist()
    reply = generate_reply(merged.model, merged.tokenizer, prompt, max_new_tokens=48,
                           stop_strings=reply_stop_strings(merged.template))
    assert got["reply"].strip() == reply
