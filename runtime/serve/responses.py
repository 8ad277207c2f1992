"""OpenAI response bodies: choices, chunks, log-probabilities in the completions and chat
formats, usage. Pure functions of what the engine produced."""

from __future__ import annotations

from ..logprobs import TokenLogprob
from ..request import Request
from ..tokenizer import Tokenizer

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "max_seq_len": "length", "scored": "length"}


class TokenText:
    """Token ids -> their own text (OpenAI's `token`), cached: top_logprobs repeat tokens."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer, self._cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = (self.tokenizer.token_text(token_id) if self.tokenizer
                                            else f"token_id:{token_id}")  # vLLM's spelling without a tokenizer
        return text


def chat_logprobs(entries: list[TokenLogprob], text: TokenText) -> dict:
    """choice.logprobs of a chat completion (or one chunk's)."""
    def one(token: int, logprob: float) -> dict:
        t = text(token)
        return {"token": t, "logprob": logprob, "bytes": list(t.encode())}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob | None], text: TokenText, offset: int = 0) -> dict:
    """choice.logprobs of a (legacy) completion: parallel lists; None entries (the first prompt
    token, which nothing predicts) have no log-probability. offset: where the first token's
    text starts in the choice's text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(text(e.token_id) if e else None)
        out["token_logprobs"].append(e.logprob if e and e.logprob is not None else None)
        out["top_logprobs"].append({text(t): lp for t, lp in e.top} if e and e.logprob is not None else None)
        out["text_offset"].append(offset)
        offset += len(out["tokens"][-1] or "")
    return out


def prompt_entries(request: Request) -> list[TokenLogprob]:
    """The prompt's tokens for echo: the first with no log-probability, then what scoring found."""
    first = TokenLogprob(request.prompt[0], None)
    return [first, *request.prompt_logprobs]


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}
