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


class TextStream:
    """Turns one sequence's growing token ids into text deltas, honouring stop strings.

    The whole suffix is decoded each time so multi-token characters and word-piece spacing come
    out right; a trailing U+FFFD (an unfinished UTF-8 sequence) is held back until it completes,
    and so is any tail that could still grow into a stop string. `text` is the visible text.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...] = ()):
        if stop and tokenizer is None:
            raise LLMExportError("stop strings need a tokenizer; the bundle has none (use eos ids instead)")
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""
        full = self.tokenizer.decode(self.ids)
        hits = [full.find(s) for s in self.stop if s in full]
        if hits:
            self.stopped, visible = True, full[: min(hits)]
        else:
            visible = full.rstrip("\ufffd") if full.endswith("\ufffd") else full
            held = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if visible.endswith(s[:n])), default=0)
            visible = visible[: len(visible) - held]
        if not visible.startswith(self.text):  # decoding changed earlier text: emit nothing new
            return ""
        delta, self.text = visible[len(self.text):], visible
        return delta

    def flush(self) -> str:
        """At the end: whatever was held back for a stop string that never came."""
        if self.tokenizer is None or self.stopped:
            return ""
        full = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta
