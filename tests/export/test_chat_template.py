"""The Jinja chat template written to merged checkpoints and GGUF files renders exactly the training strings."""
import pytest

from loraforge.data.templates import TEMPLATE_NAMES, get_template
from loraforge.export.chat_template import training_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "What's 2+2?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Empty system falls back to the default."}],
    [{"role": "user", "content": " a "}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\nd"}],
]


@pytest.mark.parametrize("name", [n for n in TEMPLATE_NAMES if n != "tokenizer"])
@pytest.mark.parametrize("system", [None, 'Say "hi" \\ caf\u00e9 {{ not jinja }} \U0001f642\nline two'])
def test_jinja_renders_every_template_as_training_does(tiny_tokenizer, name, system):
    template = get_template(name, tiny_tokenizer, system_prompt=system)
    jinja = training_chat_template(template)  # raises if any of its own checks differ
    for messages in CONVERSATIONS:
        rendered = tiny_tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                                      add_generation_prompt=True)
        assert rendered == template.prompt(messages)
    finished = CONVERSATIONS[2][:2]
    assert tiny_tokenizer.apply_chat_template(finished, chat_template=jinja, tokenize=False) == template.text(finished)


def test_tokenizer_template_is_passed_through(tiny_tokenizer):
    template = get_template("tokenizer", tiny_tokenizer)
    assert training_chat_template(template) == tiny_tokenizer.chat_template


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_jinja_renders_every_template_with_the_real_models_tokenizer(smollm2_tokenizer, name):
    """SmolLM2's BOS is `<|im_start|>`: ChatML adds none before it; its own template (`tokenizer`) is kept as is."""
    template = get_template(name, smollm2_tokenizer)
    jinja = training_chat_template(template)
    for messages in (CONVERSATIONS[0], [m | {"content": m["content"].strip()} for m in CONVERSATIONS[2]]):
        rendered = smollm2_tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                                         add_generation_prompt=True)
        assert rendered == template.prompt(messages)
    assert not template.prompt(CONVERSATIONS[0]).startswith("<|im_start|><|im_start|>")
