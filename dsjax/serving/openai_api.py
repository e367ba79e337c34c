"""OpenAI's request bodies (completions and chat completions) as pydantic models, and how each
becomes the serving engine's options.

Unknown fields are refused (extra="forbid": a client never believes a field took effect that
did not), and so are OpenAI fields the engine does not serve (penalties, logit_bias, echo,
suffix, best_of, tools, response formats) with a message naming them. Sampling follows OpenAI's
defaults, not transformers': temperature 1 (sampling) unless the request says otherwise, no
top-k; temperature 0 is greedy. vLLM's extensions top_k, min_p, min_tokens, stop_token_ids and
ignore_eos are accepted.
"""

from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request
MAX_LOGPROBS = 5  # completions' logprobs (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.status)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def refuse_unserved(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by this server", name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options needs stream: true", "stream_options")


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unserved(self) -> None:
        super().refuse_unserved()
        if self.echo:
            raise ApiError(400, "echo is not supported by this server", "echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported by this server", "suffix")
        if self.best_of not in (None, self.n):
            raise ApiError(400, "best_of other than n is not supported by this server", "best_of")

    def prompts(self) -> list:
        """The prompts: text or token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p or any(len(x) == 0 for x in p):
            raise ApiError(400, "prompt must not be empty", "prompt")
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def refuse_unserved(self) -> None:
        super().refuse_unserved()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if self.messages[-1].role == "assistant":
            raise ApiError(400, "the last message must not be the assistant's (continuing an "
                                "assistant message is not supported)", "messages")


def engine_options(req: _Request, *, eos: list[int], prompt_len: int, max_len: int,
                   default_max: int | None, top_logprobs: int, seed: int | None) -> dict:
    """The serving engine's options for one choice (see the module docstring for defaults);
    a request that cannot fit the context is a 400 here, before any compute."""
    room = max_len - prompt_len
    new = req.max_tokens or getattr(req, "max_completion_tokens", None) or default_max or room
    if room < 1 or new > room:
        raise ApiError(400, f"this model's context is {max_len} tokens; the prompt has "
                            f"{prompt_len} and {new} more were asked for", "max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(s == "" for s in stop):
        raise ApiError(400, "stop strings must not be empty", "stop")
    opts = dict(max_new_tokens=new, do_sample=temperature > 0,
                eos_token_id=([] if req.ignore_eos else list(eos)) + list(req.stop_token_ids or []),
                min_new_tokens=req.min_tokens, stop_strings=stop or None,
                top_logprobs=top_logprobs, seed=secrets.randbits(32) if seed is None else seed)
    if temperature > 0:
        opts.update(temperature=temperature, top_p=req.top_p or 1.0,
                    top_k=max(req.top_k or 0, 0), min_p=req.min_p or 0.0)
    return opts
