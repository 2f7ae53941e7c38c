"""The Ollama Modelfile that `export gguf` writes: its Go template, rendered as Ollama renders it (a small renderer
of the Go-template subset it uses, below), gives the training prompt byte for byte for every chat template loraforge
ships, with and without a system prompt, over several turns; stops and SYSTEM come from the run."""
import re

import pytest

from cli_runner import run_cli
from loraforge.config import TEMPLATE_NAMES
from loraforge.data.templates import get_template
from loraforge.export.modelfile import go_template, modelfile_text, turn_pieces

# --- a renderer for the Go text/template subset the Modelfile uses ------------------------------------------------
# {{ .Field }}, {{ if COND }}..{{ else if COND }}..{{ else }}..{{ end }}, {{ range .Messages }}..{{ end }}, where COND
# is `.Field` (true when non-empty) or `eq .Field "text"`. Whitespace-trimming markers are refused: Ollama's
# templates may use them, but loraforge's must not (they would eat newlines of the format).
ACTION = re.compile(r"{{(.*?)}}", re.S)


def parse_go(text: str):
    tokens, pos = [], 0
    for m in ACTION.finditer(text):
        tokens.append(("text", text[pos:m.start()]))
        body = m.group(1)
        assert not body.startswith("-") and not body.endswith("-"), f"trim marker in {{{{{body}}}}}"
        tokens.append(("action", body.strip()))
        pos = m.end()
    tokens.append(("text", text[pos:]))
    nodes, rest = _parse_list(tokens)
    assert rest == [], rest
    return nodes


def _parse_list(tokens):
    """Nodes up to an unmatched else / end (returned with the remaining tokens)."""
    nodes = []
    while tokens:
        kind, value = tokens[0]
        if kind == "text":
            nodes.append(("text", value))
            tokens = tokens[1:]
        elif value == "end" or value.startswith("else"):
            return nodes, tokens
        elif value.startswith("if "):
            node, tokens = _parse_if(value[3:], tokens[1:])
            nodes.append(node)
        elif value.startswith("range "):
            body, tokens = _parse_list(tokens[1:])
            assert tokens[0] == ("action", "end")
            nodes.append(("range", value[6:].strip(), body))
            tokens = tokens[1:]
        else:
            assert re.fullmatch(r"\.\w+", value), value
            nodes.append(("field", value[1:]))
            tokens = tokens[1:]
    return nodes, tokens


def _parse_if(condition, tokens):
    then, tokens = _parse_list(tokens)
    kind, value = tokens[0]
    otherwise = []
    if value.startswith("else if "):
        node, tokens = _parse_if(value[8:], tokens[1:])
        return ("if", condition.strip(), then, [node]), tokens
    if value == "else":
        otherwise, tokens = _parse_list(tokens[1:])
    assert tokens[0] == ("action", "end"), tokens[0]
    return ("if", condition.strip(), then, otherwise), tokens[1:]


def _true(condition: str, scope: dict) -> bool:
    m = re.fullmatch(r'eq \.(\w+) "([^"]*)"', condition)
    if m:
        return scope[m.group(1)] == m.group(2)
    assert re.fullmatch(r"\.\w+", condition), condition
    return bool(scope[condition[1:]])


def render_go(nodes, scope: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(scope[node[1]])
        elif node[0] == "if":
            out.append(render_go(node[2] if _true(node[1], scope) else node[3], scope))
        else:
            out += [render_go(node[2], {**scope, **item}) for item in scope[node[1][1:]]]
    return "".join(out)


def ollama_prompt(template_text: str, messages: list[dict], default_system) -> str:
    """The prompt Ollama renders: the Modelfile's SYSTEM goes first unless the chat has a system message; .System
    joins the system messages; .Messages holds every message (template.go's Execute with collate)."""
    if default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    scope = {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
             "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return render_go(parse_go(template_text), scope)


def test_the_renderer_follows_go_semantics():
    nodes = parse_go('{{ if .System }}[{{ .System }}]{{ else }}none{{ end }}{{ range .Messages }}'
                     '{{ if eq .Role "user" }}U:{{ .Content }} {{ else if eq .Role "assistant" }}A:{{ .Content }} '
                     '{{ end }}{{ end }}')
    scope = {"System": "", "Messages": [{"Role": "system", "Content": "s"}, {"Role": "user", "Content": "u"},
                                        {"Role": "assistant", "Content": "a"}]}
    assert render_go(nodes, scope) == "noneU:u A:a "
    assert render_go(nodes, {**scope, "System": "s"}).startswith("[s]")
    with pytest.raises(AssertionError, match="trim marker"):
        parse_go("{{- .System }}")


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello!\nHow are you?"}],
    [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Two."}, {"role": "user", "content": "3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d\n\ne"}, {"role": "user", "content": "f"}],
]


def template_line(modelfile: str) -> str:
    m = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M)
    assert m, modelfile
    return m.group(1)


@pytest.mark.parametrize("system_prompt", [None, "You are a careful assistant."])
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_the_go_template_renders_the_training_prompt_byte_for_byte(name, system_prompt, tiny_tokenizer,
                                                                 smollm2_tokenizer):
    tokenizers = {"tiny (SentencePiece, BOS added by llama.cpp)": tiny_tokenizer,
                  "SmolLM2 (byte-level BPE, ChatML)": smollm2_tokenizer}
    if name == "tokenizer":  # the tiny tokenizer has no chat template of its own
        del tokenizers["tiny (SentencePiece, BOS added by llama.cpp)"]
    for label, tokenizer in tokenizers.items():
        template = get_template(name, tokenizer, system_prompt=system_prompt)
        add_bos = tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
        modelfile, note = modelfile_text("model.gguf", template, add_bos, 1024)
        assert note is None, (label, note)
        assert ("SYSTEM" in modelfile) == bool(system_prompt)
        text = template_line(modelfile)
        for messages in CONVERSATIONS:
            # llama.cpp puts BOS first where the GGUF says so; the template leaves it out then
            rendered = (tokenizer.bos_token if add_bos else "") + ollama_prompt(text, messages, system_prompt)
            assert rendered == template.prompt(messages), (label, messages)


def test_stops_and_parameters_come_from_the_template(tiny_tokenizer, smollm2_tokenizer):
    modelfile, _ = modelfile_text("run.gguf", get_template("llama2", tiny_tokenizer), True, 1024)
    assert modelfile.splitlines()[1] == "FROM ./run.gguf"
    stops = re.findall(r'^PARAMETER stop "(.*)"$', modelfile, re.M)
    assert stops == ["</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
    assert "PARAMETER num_ctx 1024" in modelfile and "PARAMETER repeat_penalty 1.0" in modelfile
    chatml, _ = modelfile_text("m.gguf", get_template("tokenizer", smollm2_tokenizer), False, 8192)
    assert re.findall(r'^PARAMETER stop "(.*)"$', chatml, re.M) == ["<|im_end|>", "<|im_start|>"]
    human, _ = modelfile_text("m.gguf", get_template("human_response", tiny_tokenizer), True, None)
    assert "\n### HUMAN:" not in re.findall(r'^PARAMETER stop "(.*)"$', human, re.M)  # one line each; the
    assert "### HUMAN:" in human  # marker without its newline stops there too


def test_a_template_that_is_not_built_of_fixed_pieces_gets_no_template_line(smollm2_tokenizer):
    class Reversed:  # a tokenizer whose chat template writes the turns in reverse order
        def __getattr__(self, name):
            return getattr(smollm2_tokenizer, name)

        chat_template = ("{% for m in messages | reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

        def apply_chat_template(self, *args, **kwargs):
            kwargs.setdefault("chat_template", self.chat_template)
            return smollm2_tokenizer.apply_chat_template(*args, **kwargs)

    template = get_template("tokenizer", Reversed())
    assert turn_pieces(template, drop_bos=False) is None
    modelfile, note = modelfile_text("m.gguf", template, False, 2048)
    assert "TEMPLATE" not in modelfile and "no TEMPLATE" in note and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_export_gguf_writes_the_modelfile_beside_the_file(short_run, tmp_path):
    import json

    import gguf

    from loraforge.data.templates import template_from_record

    out = tmp_path / "tiny.gguf"
    result = run_cli("export", "gguf", str(short_run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    modelfile = (tmp_path / "tiny.Modelfile").read_text()
    assert "FROM ./tiny.gguf" in modelfile and "ollama create tiny -f" in result.stdout
    record = json.loads((short_run / "template.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(short_run / "adapter")
    template = template_from_record(record, tokenizer)
    for messages in CONVERSATIONS:
        assert tokenizer.bos_token + ollama_prompt(template_line(modelfile), messages, None) == template.prompt(messages)
    stored = gguf.GGUFReader(str(out)).fields["loraforge.template"].contents()
    assert json.loads(stored)["format"] == record["format"]  # serve FILE.gguf chats in the training template

    again = run_cli("export", "gguf", str(short_run), "--out", str(tmp_path / "other.gguf"))
    assert again.returncode == 0
    (tmp_path / "third.Modelfile").write_text("mine")
    refused = run_cli("export", "gguf", str(short_run), "--out", str(tmp_path / "third.gguf"))
    assert refused.returncode == 2 and "third.Modelfile already exists" in refused.stderr
    assert not (tmp_path / "third.gguf").exists() and (tmp_path / "third.Modelfile").read_text() == "mine"
