"""OpenAI's request and response shapes for chat completions, completions and models, and its error shape.

Requests are validated with pydantic: an argument loraforge does not take is refused (400), never silently
ignored, and so is one it cannot honour (n > 1, penalties, logprobs, tools)."""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_TOKENS = 256  # as `loraforge chat` and `generate`
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """What both endpoints take."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    frequency_penalty: float = Field(0.0, ge=0, le=0)  # only the default: no penalties are applied
    presence_penalty: float = Field(0.0, ge=0, le=0)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} sequences", param="stop")
        return tuple(s for s in stops if s)

    def sampling(self) -> tuple[float, float]:
        """(temperature, top_p): temperature 0 is greedy, as `loraforge generate --greedy`."""
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        top_p = DEFAULT_TOP_P if self.top_p is None else self.top_p
        return temperature, top_p

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def as_turn(self) -> dict:
        """A loraforge turn: `developer` is OpenAI's newer name for the system turn."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Generation):
    prompt: Union[str, list[str]]

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, "prompt: one prompt per request (a list of several is not supported)", param="prompt")
        return self.prompt[0]

    def token_limit(self) -> Optional[int]:
        return self.max_tokens


def validation_message(errors: list[dict]) -> tuple[str, Optional[str]]:
    """One message for pydantic's errors (all of them, each with its field), and the first field's name."""
    lines, params = [], []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        kind = error.get("type", "")
        if kind == "json_invalid":
            return "the request body is not valid JSON", None
        if kind in ("model_attributes_type", "dict_type") and not loc:
            return "send a JSON object with the header Content-Type: application/json", None
        where = ".".join(loc)
        if kind == "extra_forbidden":
            lines.append(f"unrecognized request argument: {where} (loraforge serve does not take it)")
        elif where in ("n", "frequency_penalty", "presence_penalty"):
            lines.append(f"{where}: only {'1' if where == 'n' else '0'} is supported by loraforge serve")
        else:
            lines.append(f"{where}: {error.get('msg', 'invalid')}")
        params.append(where)
    return "; ".join(dict.fromkeys(lines)), (params[0] if params else None)


def _stamp(prefix: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time())}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """The response objects of one request, for either endpoint, streamed or whole."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.head = _stamp("chatcmpl" if chat else "cmpl")

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
                  if self.chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion", "model": self.model,
                "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: Optional[str] = None, finish_reason: Optional[str] = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "model": self.model, "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "model": self.model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "loraforge"}
