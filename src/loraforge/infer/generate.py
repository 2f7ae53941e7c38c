"""Generate a reply for a prompt string rendered by the training template, streamed or not, cut before
any template marker."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from loraforge.errors import UserError

@dataclass(frozen=True)
class Sampling:
    """Decoding settings; `greedy` (or temperature 0) picks the most likely token every step."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: Optional[int] = 0
    greedy: bool = False

    def as_kwargs(self) -> dict:
        greedy = self.greedy or self.temperature <= 0
        return dict(max_new_tokens=self.max_new_tokens, temperature=0.0 if greedy else self.temperature,
                    top_p=self.top_p, seed=None if greedy else self.seed)


def reply_stop_strings(template) -> tuple[str, ...]:
    """Where a reply ends in this template: its stop strings (end of turn, EOS) and the turn markers."""
    return tuple(dict.fromkeys((*template.stop_strings, *template.turn_markers)))


class ReplyStream(BaseStreamer):
    """Decodes the reply as tokens arrive and passes on only final text: never a stop string or what
    follows it, nor half of a multi-byte character or of a possible stop string.

    Written here because transformers' TextStreamer restarts decoding after each newline (SentencePiece
    then drops the space that follows) and prints template markers.
    """

    def __init__(self, tokenizer, stop_strings=(), on_text: Optional[Callable[[str], None]] = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in stop_strings if s]
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.prompt_skipped = False
        self.stopped = False

    def put(self, value) -> None:
        if not self.prompt_skipped:  # generate() first hands over the prompt
            self.prompt_skipped = True
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._update(final=False)

    def end(self) -> None:
        self._update(final=True)

    @property
    def reply(self) -> str:
        return self.text.strip()

    def _update(self, final: bool) -> None:
        if self.stopped:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            self.stopped = True
            text = text[:min(cuts)]
            safe = len(text)
        elif final:
            safe = len(text)
        else:
            safe = len(text) - self._held_back(text)
        self.text = text
        start = max(self.sent, len(text) - len(text.lstrip()))  # no leading whitespace
        if self.on_text and safe > start:
            self.on_text(text[start:safe])
        self.sent = max(self.sent, safe)

    def _held_back(self, text: str) -> int:
        """Characters at the end that may still change: an incomplete byte sequence or a stop string's start."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class _StopWhenDone(StoppingCriteria):
    """Ends generation once the reply stream has seen a stop string."""

    def __init__(self, stream: ReplyStream):
        self.stream = stream

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.stream.stopped, dtype=torch.bool, device=input_ids.device)


def stop_token_ids(tokenizer, stop_strings) -> list[int]:
    """EOS and every stop string that is one token: generation ends on them without decoding."""
    from loraforge.data.templates import single_token_ids

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(dict.fromkeys(eos + single_token_ids(tokenizer, stop_strings)))


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids of a prompt the training template rendered (it writes BOS itself)."""
    return tokenizer(prompt, add_special_tokens=False).input_ids


def context_length(model) -> Optional[int]:
    return getattr(model.config, "max_position_embeddings", None)


def check_fits(model, tokenizer, prompt: str, max_new_tokens: int, what: str = "the prompt") -> None:
    """Refuse a prompt that leaves no room for `max_new_tokens` in the model's context."""
    limit = context_length(model)
    n_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    if limit and n_tokens + max_new_tokens > limit:
        raise UserError(f"{what} is {n_tokens} tokens and {max_new_tokens} new tokens were asked for, but the "
                        f"model's context is {limit} tokens; shorten it or lower --max-new-tokens")


@torch.no_grad()
def generate_reply(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                   top_p: float = 1.0, stop_strings: tuple[str, ...] = (), seed: Optional[int] = None,
                   on_text: Optional[Callable[[str], None]] = None) -> str:
    """The model's continuation of `prompt`, ended by EOS or a stop string, without either.

    `temperature == 0` is greedy decoding; `seed` makes sampling repeatable; `on_text` receives the
    reply piece by piece as it is generated (what it receives joins up to the returned reply).
    """
    device = next(p for p in model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p)
        if seed is not None:
            from transformers import set_seed

            set_seed(seed)
    else:
        sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    stream = ReplyStream(tokenizer, stop_strings, on_text)
    was_training = model.training
    model.eval()
    try:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                       eos_token_id=stop_token_ids(tokenizer, stop_strings), pad_token_id=tokenizer.pad_token_id,
                       use_cache=True, streamer=stream, stopping_criteria=StoppingCriteriaList([_StopWhenDone(stream)]),
                       **sampling)
    finally:
        model.train(was_training)
    return stream.reply


class _RowsStopped(StoppingCriteria):
    """Per row of a batch: done once its reply so far contains a stop string."""

    def __init__(self, tokenizer, stop_strings, prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, [s for s in stop_strings if s], prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


def _reply_text(tokenizer, new_ids: list[int], stop_ids: set[int], stop_strings) -> str:
    """What ReplyStream returns for these new tokens, up to EOS (or a one-token stop): after it, a finished
    row of the batch holds only padding."""
    end = next((i for i, t in enumerate(new_ids) if t in stop_ids), len(new_ids))
    stream = ReplyStream(tokenizer, stop_strings)
    stream.prompt_skipped = True
    stream.put(torch.tensor(new_ids[:end], dtype=torch.long))
    stream.end()
    return stream.reply


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64,
                     stop_strings: tuple[str, ...] = (), batch_size: int = 8) -> list[str]:
    """Greedy replies to many prompts, `batch_size` at a time: each the reply `generate_reply` gives it.

    Prompts are left-padded and masked, so each row sees only its own tokens. On a CPU one decoding step
    costs about the same for 8 rows as for one (a 4-bit weight is dequantized once per step either way).
    """
    device = next(p for p in model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, stop_strings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    was_training = model.training
    model.eval()
    replies: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts[start:start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=stop_ids, pad_token_id=pad, use_cache=True, do_sample=False,
                                 temperature=None, top_p=None, top_k=None,
                                 stopping_criteria=StoppingCriteriaList([_RowsStopped(tokenizer, stop_strings, width)]))
            replies += [_reply_text(tokenizer, row[width:].tolist(), set(stop_ids), stop_strings) for row in out]
    finally:
        model.train(was_training)
    return replies
