"""OpenAI request bodies (the fields of POST /v1/completions and /v1/chat/completions that a
server with n = 1 and no logprobs can honour) and their translation into an engine request.

Fields outside OpenAI's API are refused (400, naming the field); OpenAI fields this server does
not implement are accepted only at their neutral value, so a request is never silently served
differently from what it asked. Extensions, as vLLM names them: top_k, repetition_penalty,
ignore_eos.
"""

from __future__ import annotations

import secrets
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from llmexport import LLMExportError

from ..sampling import SamplingParams
from ..session import Session


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template as given
    role: str
    content: Union[str, list[TextPart], None] = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def _neutral(body: _Common) -> None:
    """OpenAI fields this server does not implement: refused unless at their neutral value."""
    unsupported = {
        "n": body.n != 1, "presence_penalty": body.presence_penalty != 0,
        "frequency_penalty": body.frequency_penalty != 0, "logit_bias": bool(body.logit_bias),
        "logprobs": bool(body.logprobs), "echo": bool(getattr(body, "echo", False)),
        "suffix": bool(getattr(body, "suffix", None)), "best_of": getattr(body, "best_of", None) not in (None, 1),
        "top_logprobs": bool(getattr(body, "top_logprobs", 0)),
    }
    for name, used in unsupported.items():
        if used:
            raise LLMExportError(f"{name} is not supported by this server (n=1, no logprobs, no penalties but "
                                 f"repetition_penalty); leave it out")


def prompt_ids(session: Session, body: CompletionRequest | ChatRequest) -> list[int]:
    """The prompt's token ids, checked against the vocabulary and max_seq_len."""
    return session.engine.check_prompt(_ids(session, body))


def _ids(session: Session, body: CompletionRequest | ChatRequest) -> list[int]:
    if isinstance(body, ChatRequest):
        if not body.messages:
            raise LLMExportError("messages is empty: give at least one message like {'role': 'user', 'content': 'hi'}")
        messages = []
        for m in body.messages:
            parts = m.content
            content = parts if isinstance(parts, str) or parts is None else "".join(p.text for p in parts)
            messages.append({**(m.model_extra or {}), "role": m.role, "content": content or ""})
        return session.render_chat(messages)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise LLMExportError(f"prompt has {len(prompt)} strings; this server takes one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if session.tokenizer is None:
            raise LLMExportError("this model has no tokenizer: give the prompt as a list of token ids")
        return session.tokenizer.encode(prompt)
    return [int(t) for t in prompt]


def sampling(session: Session, body: CompletionRequest | ChatRequest, n_prompt: int) -> SamplingParams:
    """The engine's SamplingParams: the checkpoint's generation_config.json, then the request."""
    _neutral(body)
    room = session.bundle.max_seq_len - n_prompt + 1  # the last prompt slot's logits give one more token
    chat = isinstance(body, ChatRequest)
    max_tokens = (body.max_completion_tokens if chat else None) or body.max_tokens
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)  # OpenAI's defaults: chat to the limit, completions 16
    if max_tokens > room:
        raise LLMExportError(f"max_tokens={max_tokens} plus the prompt's {n_prompt} tokens exceeds this model's "
                             f"context of {session.bundle.max_seq_len} tokens; ask for at most {room}")
    overrides: dict = {"max_new_tokens": max_tokens, "ignore_eos": body.ignore_eos}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if getattr(body, name) is not None:
            overrides[name] = getattr(body, name)
    if body.stop is not None:  # an empty string is refused by SamplingParams, an empty list means none
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
        if len(stop) > 4:
            raise LLMExportError(f"stop has {len(stop)} strings; at most 4")
        overrides["stop"] = stop
    params = session.default_params(**overrides)
    if body.seed is None and params.temperature > 0:  # unseeded sampling differs per request, as OpenAI's does
        params = session.default_params(**overrides, seed=secrets.randbits(63))
    return params
