"""prepare(): held-out split, mixing, truncation, samples, the report files, and the guanaco case."""
import json

import pytest

from data_helpers import spans
from loraforge.config import DataSettings
from loraforge.data import bundled_path, prepare, write_data_report
from loraforge.errors import UserError


def rows(prefix, n):
    return [{"input": f"{prefix} question {i}?", "output": f"{prefix} answer {i}."} for i in range(n)]


def run(tok, sources, logs=None, **data):
    log = logs.append if logs is not None else (lambda s: None)
    return prepare(DataSettings.model_validate({"datasets": sources, **data}), tok, log=log)


def answers(prepared, tok, split="train"):
    out = []
    for r in getattr(prepared, split):
        a, b = spans(r["labels"])[0]
        out.append(tok.decode(r["input_ids"][a:b], skip_special_tokens=True).strip())
    return out


# --- held-out split ---------------------------------------------------------------------------

def test_eval_size_is_deterministic_and_disjoint(tok, write_jsonl):
    src = [{"path": write_jsonl("a.jsonl", rows("A", 20))}]
    p1, p2 = run(tok, src, eval_size=4, seed=7), run(tok, src, eval_size=4, seed=7)
    assert answers(p1, tok, "eval") == answers(p2, tok, "eval")
    assert len(p1.eval) == 4 and len(p1.train) == 16
    assert not set(answers(p1, tok, "eval")) & set(answers(p1, tok, "train"))
    p3 = run(tok, src, eval_size=4, seed=8)
    assert answers(p3, tok, "eval") != answers(p1, tok, "eval")
    assert p1.report["rows"] == {"train": 16, "eval": 4, "eval_from": "eval_size"}
    assert [s["reference"] for s in p1.samples] == answers(p1, tok, "eval")  # samples: the eval rows, in order


def test_eval_fraction_spans_all_sources(tok, write_jsonl):
    src = [{"path": write_jsonl("a.jsonl", rows("A", 10))}, {"path": write_jsonl("b.jsonl", rows("B", 10))}]
    p = run(tok, src, eval_fraction=0.25)
    assert len(p.eval) == 5 and len(p.train) == 15


def test_eval_fraction_always_leaves_training_rows(tok, write_jsonl):
    one = [{"path": write_jsonl("one.jsonl", rows("A", 1))}]
    assert (len(run(tok, one, eval_fraction=0.5).train), len(run(tok, one, eval_fraction=0.5).eval)) == (1, 0)
    two = [{"path": write_jsonl("two.jsonl", rows("A", 2))}]
    assert len(run(tok, two, eval_fraction=0.9).train) == 1


def test_eval_settings_conflicts(tok, write_jsonl):
    src = [{"path": write_jsonl("a.jsonl", rows("A", 5))}]
    with pytest.raises(UserError, match="not both"):
        run(tok, src, eval_fraction=0.1, eval_size=2)
    with pytest.raises(UserError, match="leave eval_fraction and eval_size out"):
        run(tok, src, eval_split="test", eval_size=2)
    with pytest.raises(UserError, match="asks for 5 held-out rows but there are only 5"):
        run(tok, src, eval_size=5)


# --- mixing -----------------------------------------------------------------------------------

def test_concat_keeps_every_row_in_order(tok, write_jsonl):
    src = [{"path": write_jsonl("a.jsonl", rows("A", 3))}, {"path": write_jsonl("b.jsonl", rows("B", 2))}]
    logs = []
    p = run(tok, [dict(s, weight=2) for s in src], logs=logs)
    assert answers(p, tok) == ["A answer 0.", "A answer 1.", "A answer 2.", "B answer 0.", "B answer 1."]
    assert any("source weights and mix_size are ignored" in line for line in logs)


def test_weighted_mix_follows_weights_deterministically(tok, write_jsonl):
    src = [{"path": write_jsonl("a.jsonl", rows("A", 50)), "weight": 3},
           {"path": write_jsonl("b.jsonl", rows("B", 10)), "weight": 1}]
    p = run(tok, src, mix="weighted", mix_size=400, seed=1)
    got = answers(p, tok)
    assert len(got) == 400
    n_b = sum(a.startswith("B") for a in got)
    assert 70 <= n_b <= 130  # expected 100 (1/4)
    assert len(set(a for a in got if a.startswith("B"))) == 10  # the small source is cycled through, all rows
    assert [s["train_rows"] for s in p.report["sources"]] == [400 - n_b, n_b]
    assert answers(run(tok, src, mix="weighted", mix_size=400, seed=1), tok) == got
    assert answers(run(tok, src, mix="weighted", mix_size=400, seed=2), tok) != got
    # default size: all rows together
    assert len(run(tok, src, mix="weighted").train) == 60


# --- truncation -------------------------------------------------------------------------------

LONG = {"input": "Short question?", "output": " ".join(["word"] * 60)}
LONG_PROMPT = {"input": " ".join(["long"] * 60), "output": "Yes."}
SHORT = {"input": "Hi?", "output": "Hello."}


def test_truncate_counts_and_cuts(tok, write_jsonl):
    logs = []
    p = run(tok, [{"path": write_jsonl("a.jsonl", [SHORT, LONG, LONG_PROMPT])}], logs=logs, max_length=40)
    r = p.report
    assert r["over_max_length"] == 2 and r["truncated"] == 2
    assert r["dropped_no_trainable"] == 1  # LONG_PROMPT: its reply lies beyond token 40
    assert [d["reason"] for d in r["dropped_rows"]] == ["no trainable token left after truncation"]
    assert r["dropped_rows"][0]["where"].endswith("a.jsonl line 3")
    assert [len(x["input_ids"]) for x in p.train] == [len(p.train[0]["input_ids"]), 40]
    assert p.train[1]["labels"][-1] != -100  # cut inside the reply: still trained up to the cut
    assert any("2 row(s) are longer than max_length=40 and were truncated" in line for line in logs)
    assert r["tokens"]["total"]["max"] > 40  # lengths are reported before truncation


def test_drop_mode(tok, write_jsonl):
    p = run(tok, [{"path": write_jsonl("a.jsonl", [SHORT, LONG, LONG_PROMPT])}], max_length=40, truncation="drop")
    assert p.report["dropped_too_long"] == 2 and p.report["truncated"] == 0
    assert answers(p, tok) == ["Hello."]


def test_everything_dropped_is_an_error(tok, write_jsonl):
    with pytest.raises(UserError, match="every training row was dropped: 2 longer than max_length=20"):
        run(tok, [{"path": write_jsonl("a.jsonl", [LONG, LONG_PROMPT])}], max_length=20, truncation="drop")


# --- the guanaco case --------------------------------------------------------------------------

GUANACO = [
    {"text": "<s>[INST] What is the capital of France? [/INST] The capital of France is Paris. </s>"},
    {"text": "<s>[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nName a primary colour. [/INST] Red. </s>"},
    {"text": "<s>[INST] Say hello. [/INST] Hello! </s><s>[INST] Say bye. [/INST] Bye! </s>"},
]


def test_guanaco_text_trains_on_responses_only(tok, write_jsonl):
    p = run(tok, [{"path": write_jsonl("g.jsonl", GUANACO)}])
    trained = [[tok.decode(r["input_ids"][a:b]) for a, b in spans(r["labels"])] for r in p.train]
    assert trained == [["The capital of France is Paris. </s>"], ["Red. </s>"], ["Hello! </s>", "Bye! </s>"]]
    # the training strings are the rows themselves (already canonical Llama-2 format)
    assert [tok.decode(r["input_ids"]) for r in p.train] == [g["text"] for g in GUANACO]


def test_inference_prompt_is_the_training_prefix(tok, write_jsonl):
    p = run(tok, [{"path": write_jsonl("g.jsonl", GUANACO)}])
    row, text = p.train[0], GUANACO[0]["text"]
    prompt = p.template.prompt([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt == "<s>[INST] What is the capital of France? [/INST]"
    assert text.startswith(prompt)  # byte for byte
    first = spans(row["labels"])[0][0]
    assert tok(prompt, add_special_tokens=False)["input_ids"] == row["input_ids"][:first]  # and token for token
    new = p.template.prompt([{"role": "user", "content": "What is the capital of Peru?"}])
    assert new == "<s>[INST] What is the capital of Peru? [/INST]"
    assert p.report["prompt_token_check"] == {"checked": 4, "mismatches": 0}


def test_prompt_token_mismatch_is_reported(gpt2_split_tok, write_jsonl):
    p = run(gpt2_split_tok, [{"path": write_jsonl("a.jsonl", rows("A", 2))}], template="llama3")
    assert p.report["prompt_token_check"] == {"checked": 2, "mismatches": 2}
    assert any("tokenizes differently" in w for w in p.report["warnings"])


# --- bundled data and the report --------------------------------------------------------------

def test_bundled_dataset_by_default(tok):
    assert bundled_path().name == "demo_chat.jsonl" and bundled_path().is_file()
    n = sum(1 for line in bundled_path().read_text().splitlines() if line.strip())
    p = prepare(DataSettings(eval_fraction=0.05), tok, log=lambda s: None)
    assert len(p.train) + len(p.eval) == n
    assert p.report["sources"][0]["shape"] == "text"
    assert 1 <= len(p.samples) <= 5
    assert all(s["messages"][-1]["role"] == "user" and s["reference"] for s in p.samples)
    assert p.template_record()["name"] == "llama2"


def test_write_data_report(tok, write_jsonl, tmp_path):
    p = run(tok, [{"path": write_jsonl("g.jsonl", GUANACO)}], max_length=64)
    json_path, png_path = write_data_report(p, tmp_path / "run")
    report = json.loads(json_path.read_text())
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["max_length"] == 64 and report["rows"]["train"] == 3
    assert report["lengths"]["total"] == [len(r["input_ids"]) for r in p.train]
    assert report["tokens"]["total"]["min"] == min(report["lengths"]["total"])
    trained = sum(1 for r in p.train for lab in r["labels"] if lab != -100)
    assert report["trainable_share"] == round(trained / sum(len(r["input_ids"]) for r in p.train), 4)
    ex = report["examples"][0]
    assert ex["marked"] == "⟦<s>[INST] What is the capital of France? [/INST]⟧ The capital of France is Paris. </s>"
    assert len(report["examples"]) == 3
