"""A multi-turn chat with a run's model in its training template: history, /reset, /exit, streamed replies."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from loraforge.data.tokenize import encode_prompt
from loraforge.errors import UserError
from loraforge.infer.generate import Sampling, check_fits, context_length, generate_reply, reply_stop_strings

COMMANDS = "/reset clears the history, /exit quits"


class Chat:
    """The conversation so far; each `ask` renders the whole history with the run's template."""

    def __init__(self, session, sampling: Sampling):
        self.session = session
        self.sampling = sampling
        self.history: list[dict] = []
        self.dropped_turns = 0  # oldest exchanges forgotten because the context was full

    def reset(self) -> None:
        self.history = []

    def prompt_for(self, user_text: str) -> tuple[str, int]:
        """The prompt for the next reply, and how many of the oldest exchanges were left out so that it
        fits the context with room for the reply."""
        history, _, dropped = self.fit(user_text)
        return self.session.template.prompt(history), dropped

    def fit(self, user_text: str) -> tuple[list[dict], list[int], int]:
        """The conversation to answer, its prompt's token ids and how many of the oldest exchanges were left
        out so that it fits the context with room for the reply."""
        history = self.history + [{"role": "user", "content": user_text}]
        limit = context_length(self.session.model)
        dropped = 0
        while True:
            ids = encode_prompt(self.session.template, history)
            if not limit or len(ids) + self.sampling.max_new_tokens <= limit or len(history) == 1:
                return history, ids, dropped
            history = history[2:]
            dropped += 1

    def ask(self, user_text: str, on_text: Optional[Callable[[str], None]] = None) -> str:
        _, prompt, dropped = self.fit(user_text)
        check_fits(self.session.model, self.session.tokenizer, prompt, self.sampling.max_new_tokens, "this message")
        reply = generate_reply(self.session.model, self.session.tokenizer, prompt, on_text=on_text,
                               stop_strings=reply_stop_strings(self.session.template), **self.sampling.as_kwargs())
        self.history = self.history[2 * dropped:] + [{"role": "user", "content": user_text},
                                                     {"role": "assistant", "content": reply}]
        self.dropped_turns += dropped
        return reply


def run_chat(chat: Chat, lines: Iterable[str], write: Callable[[str], None], echo_input: bool) -> int:
    """Read user turns from `lines` until /exit or end of input; write prompts and streamed replies.

    `echo_input` repeats each line after the prompt, so a transcript of piped input reads like a chat.
    """
    write("you> ")
    for raw in lines:
        text = raw.strip()
        if echo_input:
            write(text + "\n")
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            chat.reset()
            write("(history cleared)\n")
        elif text.startswith("/"):
            write(f"(unknown command {text}: {COMMANDS})\n")
        elif text:
            dropped = chat.dropped_turns
            write("model> ")
            try:
                reply = chat.ask(text, on_text=write)
            except UserError as e:  # a message too long for the context: say so and keep chatting
                write(f"({e})\n")
            else:
                write("\n" if reply else "(no reply: the model ended its turn at once)\n")
            if chat.dropped_turns > dropped:
                write(f"(the oldest {chat.dropped_turns - dropped} exchange(s) no longer fit the context "
                      "and were forgotten)\n")
        write("you> ")
    write("\n")
    return 0
