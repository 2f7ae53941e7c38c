"""Generation for the server: a group of requests answered by one left-padded `generate` call (transformers), or
one request at a time (llama.cpp). Each request keeps its own sampling settings, stop strings, streamed text and
cancellation; a greedy request gets exactly the reply `generate_reply` gives (`loraforge generate --greedy`)."""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from loraforge.infer.generate import ReplyStream

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


@dataclass(eq=False)
class Job:
    """One request: its prompt's token ids and settings in; the reply, token count and finish reason out."""

    prompt_ids: list[int]
    max_tokens: int
    stop_ids: frozenset  # token ids that end the reply (EOS, one-token end-of-turn markers)
    stop_strings: tuple[str, ...] = ()  # text that ends the reply (never shown)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    on_text: Optional[Callable[[str], None]] = None  # each new piece of the reply, called on the worker thread
    on_done: Optional[Callable[[], None]] = None  # called on the worker thread once the job has ended
    text: str = ""
    completion_tokens: int = 0
    finish_reason: Optional[str] = None
    error: Optional[BaseException] = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this job (its client left); the other rows of its batch go on."""
        self.cancelled.set()

    def complete(self, error: Optional[BaseException] = None) -> None:
        if error is not None and self.finish_reason is None:
            self.error = error
        if self.finish_reason is None:
            self.finish_reason = FINISH_CANCELLED if self.cancelled.is_set() else FINISH_LENGTH
        self.done.set()
        if self.on_done:
            self.on_done()


class _Row:
    """A job's state while it generates: its reply stream (cut at stop strings), and whether it has ended."""

    def __init__(self, job: Job, tokenizer):
        self.job = job
        self.stream = ReplyStream(tokenizer, job.stop_strings, self._emit)
        self.stream.prompt_skipped = True  # only new tokens are fed
        self.finished = False
        self.spaces = ""  # trailing whitespace held back: the streamed pieces join up to the (stripped) reply

    def _emit(self, piece: str) -> None:
        piece = self.spaces + piece
        kept = piece.rstrip()
        self.spaces = piece[len(kept):]
        if kept and self.job.on_text and not self.job.cancelled.is_set():
            self.job.on_text(kept)

    def feed(self, token: int) -> bool:
        """Take the next generated token; True once the reply has ended."""
        if self.finished:
            return True
        if self.job.cancelled.is_set():
            return self.finish(FINISH_CANCELLED)
        self.job.completion_tokens += 1
        if token in self.job.stop_ids:
            return self.finish(FINISH_STOP)
        self.stream.put(torch.tensor([token]))
        if self.stream.stopped:
            return self.finish(FINISH_STOP)
        if self.job.completion_tokens >= self.job.max_tokens:
            return self.finish(FINISH_LENGTH)
        return False

    def finish(self, reason: str) -> bool:
        if not self.finished:
            self.finished = True
            if reason != FINISH_CANCELLED:
                self.stream.end()  # flush text held back as a possible stop string's start
            self.job.text = self.stream.reply
            self.job.finish_reason = reason
        return True


def job_seed(job: Job) -> int:
    return job.seed if job.seed is not None else secrets.randbits(63)


class _RowsEnded(StoppingCriteria):
    """Feeds each row's newest token to its job and ends the rows whose reply is over (or whose client left).

    A stopping criterion rather than a streamer: generate calls it every step, after the token is appended, on
    the CPU and on a GPU alike (where streamers run a step behind)."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        tokens = input_ids[:, -1].tolist()
        ended = [row.feed(token) for row, token in zip(self.rows, tokens)]
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)


class _RowSampling(LogitsProcessor):
    """Temperature and top-p sampling per row, each row with its own seeded generator; greedy rows are untouched.

    Written here because generate samples every row with one setting and the global random state. The sampled
    token is left as the row's only finite score, so generate's greedy step picks it."""

    def __init__(self, rows: list[_Row], device):
        from transformers import TopPLogitsWarper

        self.rows = rows
        self.top_p = {}
        self.generators = {}
        for i, row in enumerate(rows):
            if row.job.temperature > 0:
                self.generators[i] = torch.Generator(device=device).manual_seed(job_seed(row.job))
                if row.job.top_p < 1:
                    self.top_p[i] = TopPLogitsWarper(row.job.top_p)

    def __call__(self, input_ids, scores):
        for i, generator in self.generators.items():
            if self.rows[i].finished:
                continue
            logits = scores[i:i + 1] / self.rows[i].job.temperature
            if i in self.top_p:
                logits = self.top_p[i](input_ids[i:i + 1], logits)
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


class TransformersEngine:
    """A transformers model (a run's base with its adapter, or a merged checkpoint): a group of jobs in one
    left-padded, masked `generate` call, so each row sees only its own tokens."""

    batching = True

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(p for p in model.parameters()).device

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> None:
        rows = [_Row(job, self.tokenizer) for job in jobs]
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        width = max(len(job.prompt_ids) for job in jobs)
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max(job.max_tokens for job in jobs),
                eos_token_id=[eos] if eos is not None else None, pad_token_id=pad, use_cache=True,
                do_sample=False, temperature=None, top_p=None, top_k=None,
                logits_processor=LogitsProcessorList([_RowSampling(rows, self.device)]),
                stopping_criteria=StoppingCriteriaList([_RowsEnded(rows)]))
        finally:
            self.model.train(was_training)
        for row in rows:
            row.finish(FINISH_LENGTH)  # rows still open ran out of new tokens


class LlamaCppEngine:
    """A GGUF file through llama-cpp-python: its `Llama` object decodes one sequence, so jobs run one at a time.
    Token ids and text come from the same tokenizer as for the other sources (llama.cpp's ids are identical:
    tests/export/test_gguf_llama_cpp.py)."""

    batching = False

    def __init__(self, llm, tokenizer):
        self.llm = llm
        self.tokenizer = tokenizer

    def run(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._run_one(job)

    def _run_one(self, job: Job) -> None:
        row = _Row(job, self.tokenizer)
        if job.temperature > 0:
            self.llm.set_seed(job_seed(job))
            sampling = dict(temp=job.temperature, top_p=job.top_p, top_k=0, min_p=0.0)
        else:
            sampling = dict(temp=0.0, top_k=1)
        for token in self.llm.generate(job.prompt_ids, reset=True, repeat_penalty=1.0, **sampling):
            if row.feed(int(token)):
                break
        row.finish(FINISH_LENGTH)
