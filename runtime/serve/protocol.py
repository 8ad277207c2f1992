"""OpenAI request bodies (POST /v1/completions and /v1/chat/completions) and their translation
into engine requests (a Job: one engine request per choice).

Every field of OpenAI's API is known here: the ones this server implements are honoured, the
ones it does not (audio, predictions, `suffix`, ...) are refused with "not supported" (400), and
metadata that changes nothing (`user`, `store`, `metadata`, ...) is accepted. A field outside
OpenAI's API is "unknown". Extensions, as vLLM names them: top_k, repetition_penalty,
ignore_eos. Errors use the API's names (max_tokens, never the engine's max_new_tokens).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from llmexport import LLMExportError

from .. import defaults
from ..sampling import SamplingParams
from ..session import Session


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # accepted, change nothing here
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # extensions
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None  # not supported
    best_of: int | None = None  # supported only as n


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, tool_calls, ...: passed to the template as given
    role: str
    content: Union[str, list[TextPart], None] = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=defaults.TOP_LOGPROBS_MAX)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    # not supported (refused unless absent)
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    functions: Any = None
    function_call: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


NOT_SUPPORTED = ("suffix", "audio", "modalities", "prediction", "reasoning_effort", "functions", "function_call",
                 "web_search_options", "verbosity")


@dataclass
class Choice:
    """One engine request of a job: which prompt, with which parameters."""
    prompt: int  # index into Job.prompts
    params: SamplingParams


@dataclass
class Job:
    """What one HTTP request asks the engine for."""
    prompts: list[list[int]]
    prompt_texts: list[str]  # what echo returns: each prompt as given (ids: their decoded text)
    choices: list[Choice]
    chat: bool
    echo: bool = False  # completions: the prompt's text (and log-probabilities) before the output
    score_only: bool = False  # echo with max_tokens 0: score the prompt, generate nothing
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k most likely
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def prompt_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None


def job(session: Session, body: CompletionRequest | ChatRequest) -> Job:
    """The engine requests `body` asks for, checked (LLMExportError with the API's names)."""
    for name in NOT_SUPPORTED:
        if getattr(body, name, None) is not None:
            raise LLMExportError(f"{name} is not supported by this server; leave it out")
    chat = isinstance(body, ChatRequest)
    n = body.n
    if not chat and body.best_of not in (None, n):
        raise LLMExportError(f"best_of={body.best_of} is not supported by this server (only best_of equal to n)")
    given = [None] if chat else _completion_prompts(body.prompt)
    prompts = [session.engine.check_prompt(_chat_ids(session, body) if chat else _ids(session, p)) for p in given]
    texts = [p if isinstance(p, str) else (session.tokenizer.decode(ids) if session.tokenizer else "")
             for p, ids in zip(given, prompts)]
    logprobs = (body.top_logprobs or 0) if chat and body.logprobs else (None if chat else body.logprobs)
    if chat and body.top_logprobs is not None and not body.logprobs:
        raise LLMExportError("top_logprobs needs logprobs: true")
    echo = bool(getattr(body, "echo", False))
    max_tokens = (body.max_completion_tokens if chat else None) or body.max_tokens
    score_only = echo and max_tokens == 0
    if max_tokens == 0 and not score_only:
        raise LLMExportError("max_tokens=0 generates nothing; it is allowed only with echo (to score the prompt)")
    if score_only and n != 1:
        raise LLMExportError("with max_tokens 0 (echo scoring) n must be 1")
    choices = []
    for i, ids in enumerate(prompts):
        params = _sampling(session, body, len(ids), max_tokens if not score_only else 1, logprobs)
        choices += [Choice(i, replace(params, seed=(params.seed + j) % 2**63) if j else params) for j in range(n)]
    return Job(prompts, texts, choices, chat, echo, score_only, logprobs,
               body.response_format if chat else None, body.tools if chat else None,
               body.tool_choice if chat else None)


def _chat_ids(session: Session, body: ChatRequest) -> list[int]:
    if not body.messages:
        raise LLMExportError("messages is empty: give at least one message like {'role': 'user', 'content': 'hi'}")
    messages = []
    for m in body.messages:
        parts = m.content
        content = parts if isinstance(parts, str) or parts is None else "".join(p.text for p in parts)
        messages.append({**(m.model_extra or {}), "role": m.role, "content": content or ""})
    return session.render_chat(messages, tools=body.tools if body.tools and body.tool_choice != "none" else None)


def _completion_prompts(prompt) -> list:
    """The prompts of a completions request: a string, token ids, or a list of either."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not prompt:
        raise LLMExportError("prompt is empty: give a string, a list of token ids, or a list of either")
    return list(prompt)


def _ids(session: Session, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if session.tokenizer is None:
            raise LLMExportError("this model has no tokenizer: give the prompt as a list of token ids")
        return session.tokenizer.encode(prompt)
    return [int(t) for t in prompt]


def _sampling(session: Session, body: CompletionRequest | ChatRequest, n_prompt: int, max_tokens: int | None,
              logprobs: int | None) -> SamplingParams:
    """The engine's SamplingParams: the checkpoint's generation_config.json, then the request."""
    room = session.bundle.max_seq_len - n_prompt + 1  # the last prompt slot's logits give one more token
    chat = isinstance(body, ChatRequest)
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)  # OpenAI's defaults: chat to the limit, completions 16
    if max_tokens > room:
        raise LLMExportError(f"max_tokens={max_tokens} plus the prompt's {n_prompt} tokens exceeds this model's "
                             f"context of {session.bundle.max_seq_len} tokens; ask for at most {room}")
    overrides: dict = {"max_new_tokens": max_tokens, "ignore_eos": body.ignore_eos, "logprobs": logprobs,
                       "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                       "logit_bias": _logit_bias(body.logit_bias, session.bundle.vocab_size)}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if getattr(body, name) is not None:
            overrides[name] = getattr(body, name)
    if body.stop is not None:  # an empty list means none
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
        if len(stop) > 4:
            raise LLMExportError(f"stop has {len(stop)} strings; at most 4")
        if not all(stop):
            raise LLMExportError("stop strings must be non-empty")
        overrides["stop"] = stop
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise LLMExportError(f"seed={body.seed} must be in 0..2**63-1")
    params = session.default_params(**overrides)
    if body.seed is None and params.temperature > 0:  # unseeded sampling differs per request, as OpenAI's does
        params = replace(params, seed=secrets.randbits(63))
    return params


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise LLMExportError(f"logit_bias key {key!r} is not a token id") from None
        if not 0 <= token < vocab:
            raise LLMExportError(f"logit_bias token {token} is outside the vocabulary (0..{vocab - 1})")
        if not -100 <= value <= 100:
            raise LLMExportError(f"logit_bias value {value} for token {token} must be in [-100, 100]")
        out.append((token, float(value)))
    return tuple(out)
