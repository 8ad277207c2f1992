"""Text <-> token ids with the `tokenizers` library reading the bundle's tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from llmexport import LLMExportError


class Tokenizer:
    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise LLMExportError("the tokenizers package is not installed; pip install tokenizers") from None
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise LLMExportError(f"cannot read tokenizer {path}: {e}; re-export the bundle") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS
        for Llama, as transformers' `tokenizer(text)` does); rendered chats pass False."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what llguidance reads, runtime/grammar.py)."""
        return self._tok.to_str()

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens included (OpenAI's `token` in logprobs); a piece
        of a multi-byte character comes out as U+FFFD."""
        return self._tok.decode([int(token_id)], skip_special_tokens=False)


class TextStream:
    """Turns one sequence's growing token ids into text deltas, honouring stop strings, in O(1)
    per token.

    Each push decodes a short window: the ids since the last emitted boundary, with the tokens
    before it as context (so word-piece spacing and multi-token characters come out as a decode
    of the whole sequence gives them; vLLM's incremental detokenizer works the same way). A
    trailing U+FFFD (an unfinished UTF-8 sequence) waits for the next token, and so does any
    tail that could still grow into a stop string; a stop string can only start in that held
    tail or in new text, so only those are searched. `text` is the visible text.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...] = ()):
        if stop and tokenizer is None:
            raise LLMExportError("stop strings need a tokenizer; the bundle has none (use eos ids instead)")
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] is the context window, already turned into text
        self._read = 0
        self._held = ""  # decoded, not yet emitted: a possible start of a stop string
        self._pieces: list[str] = []  # emitted so far
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def _fresh(self, final: bool = False) -> str:
        """Text of the ids after `_read`, given the context window; moves the window on."""
        window = self.ids[self._prefix:]
        before = self.tokenizer.decode(self.ids[self._prefix: self._read])
        after = self.tokenizer.decode(window)
        if final:
            after = after.rstrip("\ufffd")
        elif after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # an unfinished character, or nothing visible yet: wait for more ids
        if not after.startswith(before):  # the new ids changed the window's text: keep the old
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.tokenizer is None or self.stopped:
            return ""
        return self._emit(self._held + self._fresh())

    def _emit(self, pending: str) -> str:
        hits = [pending.find(s) for s in self.stop if s in pending]
        if hits:
            self.stopped, self._held = True, ""
            delta = pending[: min(hits)]
        else:
            held = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if pending.endswith(s[:n])), default=0)
            delta, self._held = pending[: len(pending) - held], pending[len(pending) - held:]
        self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """At the end: whatever was held back for a stop string that never came."""
        if self.tokenizer is None or self.stopped:
            return ""
        delta = self._held + self._fresh(final=True)
        self._held = ""
        self._pieces.append(delta)
        return delta
