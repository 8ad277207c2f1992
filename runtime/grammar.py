"""Constrained decoding: a token mask per row that keeps the output inside OpenAI's
response_format (a JSON schema, or any JSON object) or a forced tool call, applied to the row's
float32 logits before the sampler sees them.

The masks come from llguidance (torch-free, no dependencies; docs/structured-output.md has the
measurements that chose it over xgrammar). One `Grammars` per session reads the tokenizer once
(about 1-2 s at a 150k vocabulary) and keeps compiled grammars by their text; one `Matcher` per
sequence follows the tokens it accepts:

    grammars = Grammars(bundle / "tokenizer.json", vocab_size=V, eos_token_ids=[151645])
    matcher = grammars.matcher({"type": "json_object"})
    while ...:
        matcher.mask_logits(logits)      # (V,) float32, in place: disallowed -> -inf
        token = sampler(logits)
        matcher.accept(token)            # EOS is allowed exactly when the JSON is complete

`Grammars.mask_rows` masks a batch of rows at once, the masks computed on llguidance's own
threads (off the Python thread, without the GIL).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from llmexport import LLMExportError

from . import tools as tool_markup
from .tokenizer import Tokenizer

CACHED_GRAMMARS = 64  # compiled grammars kept per session (least recently used dropped)
# Between JSON tokens: at most this much whitespace, so a model cannot loop on newlines forever
# (llguidance's default is unbounded); deep indentation still fits.
WHITESPACE = r"[\x20\x0A\x0D\x09]{0,64}"


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy
    except ImportError:
        raise LLMExportError("structured output (response_format, tool_choice) needs llguidance; "
                             "pip install llguidance") from None
    return llguidance


class Grammars:
    """The session's tokenizer as llguidance sees it, and its compiled grammars.

    tokenizer: the bundle's tokenizer.json (a path) or the session's Tokenizer; vocab_size: the
    length of a logits row (the model's vocabulary, which may be padded past the tokenizer's:
    padded ids are never allowed); eos_token_ids: the ids that end a sequence, allowed exactly
    when the document is complete. threads: for mask_rows' batch call (default: up to 4 cores).
    """

    def __init__(self, tokenizer: str | Path | Tokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 threads: int | None = None):
        llg = _llguidance()
        text = _tokenizer_json(tokenizer)
        eos = [int(t) for t in eos_token_ids]
        if not eos or not all(0 <= t < vocab_size for t in eos):
            raise LLMExportError(f"eos_token_ids={eos} must be a non-empty list of ids below vocab_size={vocab_size}")
        try:
            self._tok = llg.LLTokenizer(text, n_vocab=vocab_size, eos_token=eos)
        except ValueError as e:
            if "too small" not in str(e):
                raise LLMExportError(f"llguidance cannot read this tokenizer: {_first_line(e)}") from None
            # logits shorter than the tokenizer: ids past them are never sampled, so never masked
            self._tok = llg.LLTokenizer(text, eos_token=eos)
        self._llg = llg
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos)
        self._words = (max(vocab_size, self._tok.vocab_size) + 31) // 32  # a bitmask row, in int32 words
        self._added = {t["content"]: t["id"] for t in json.loads(text).get("added_tokens", [])}
        self._executor = llg.LLExecutor(threads or min(4, os.cpu_count() or 1))
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, response_format: Mapping) -> Matcher | None:
        """A fresh matcher for OpenAI's response_format; None for {"type": "text"} (no constraint).

        {"type": "json_object"}: any JSON object (OpenAI's JSON mode). {"type": "json_schema",
        "json_schema": {"name", "schema", "strict"}}: a document valid against the schema; with
        strict true a keyword llguidance does not implement is an error, otherwise it is ignored.
        """
        kind = response_format.get("type") if isinstance(response_format, Mapping) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return self._matcher_for_schema({"type": "object"}, strict=False)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
                raise LLMExportError('response_format json_schema needs {"name": ..., "schema": {...}}')
            return self._matcher_for_schema(spec["schema"], strict=bool(spec.get("strict")))
        raise LLMExportError(f"response_format type {kind!r} is not supported; use text, json_object or json_schema")

    def tool_call_matcher(self, tools: Sequence[Mapping], name: str | None = None,
                          parallel: bool = True) -> Matcher:
        """A matcher forcing a tool call in the Qwen/Hermes markup (runtime/tools.py reads it
        back): to the function `name` (tool_choice {"type": "function", ...}), or to any of
        `tools` (tool_choice "required"). parallel: one or more calls, each block on its own
        line (OpenAI's parallel_tool_calls); otherwise exactly one."""
        schema = tool_markup.call_schema(tools, name)
        strict = all(bool(t["function"].get("strict")) for t in tools)
        schema = {**schema, "x-guidance": {"lenient": not strict, "whitespace_pattern": WHITESPACE}}
        call = f"{self._literal(tool_markup.OPEN)} \"\\n\" %json {json.dumps(schema)} \"\\n\" " \
               f"{self._literal(tool_markup.CLOSE)}"
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        return self._matcher(self._llg.LLMatcher.grammar_from_lark(f"{start}\ncall: {call}\n"), "the tools")

    def mask_rows(self, matchers: Sequence[Matcher | None], logits: np.ndarray) -> None:
        """Masks logits (B, V) in place, row i by matchers[i] (None: left as it is). The masks are
        computed in one call on llguidance's threads, then applied in numpy."""
        if logits.ndim != 2 or len(matchers) != logits.shape[0]:
            raise LLMExportError(f"mask_rows needs one matcher (or None) per row of logits {logits.shape}")
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        if len({id(matchers[r]) for r in rows}) < len(rows):
            raise LLMExportError("mask_rows got one matcher for two rows; give each row its own (Matcher.fork())")
        bitmask = np.empty((len(rows), self._words), dtype=np.int32)
        self._llg.numpy.fill_next_token_bitmask_par(self._executor, [(matchers[r]._m, k) for k, r in enumerate(rows)],
                                                    bitmask)
        for k, r in enumerate(rows):
            _apply(bitmask[k], logits[r])

    def _matcher_for_schema(self, schema: Mapping, strict: bool) -> Matcher:
        options = {"lenient": not strict, "whitespace_pattern": WHITESPACE}
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(dict(schema), defaults=options)
        except (ValueError, TypeError) as e:
            raise LLMExportError(f"response_format's JSON schema is not valid: {_first_line(e)}") from None
        return self._matcher(grammar, "response_format's JSON schema")

    def _matcher(self, grammar: str, what: str) -> Matcher:
        with self._lock:
            compiled = self._cache.get(grammar)
            if compiled is None:
                compiled = self._llg.LLMatcher(self._tok, grammar, log_level=0)
                if compiled.is_error():
                    raise LLMExportError(f"{what} cannot be used: {_first_line(compiled.get_error())}")
                self._cache[grammar] = compiled
                if len(self._cache) > CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(grammar)
            return Matcher(self, compiled.deep_copy())  # a copy of a fresh matcher: no recompiling

    def _literal(self, text: str) -> str:
        """Lark for a markup string: the token itself when the tokenizer has it as one added
        token (Qwen's <tool_call> is id 151657; the model writes that id, never the letters)."""
        token = self._added.get(text)
        return f"<[{token}]>" if token is not None else json.dumps(text)


class Matcher:
    """One sequence's place in its grammar. Not thread-safe: one sequence, one thread at a time."""

    def __init__(self, grammars: Grammars, inner):
        self._g, self._m = grammars, inner
        self._bitmask = np.empty((1, grammars._words), dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens allowed next."""
        self._g._llg.numpy.fill_next_token_bitmask(self._m, self._bitmask, 0)
        return np.unpackbits(self._bitmask[0].view(np.uint8), count=self._g.vocab_size, bitorder="little").view(bool)

    def mask_logits(self, logits: np.ndarray) -> None:
        """Sets the logits (V,) of every token not allowed next to -inf, in place."""
        if logits.shape != (self._g.vocab_size,):
            raise LLMExportError(f"logits have shape {logits.shape}; this matcher masks rows of {self._g.vocab_size}")
        self._g._llg.numpy.fill_next_token_bitmask(self._m, self._bitmask, 0)
        _apply(self._bitmask[0], logits)

    def accept(self, token: int) -> None:
        """Moves past `token`; a token the mask did not allow is an error (the matcher is then
        unusable: end the sequence)."""
        token = int(token)
        if not 0 <= token < self._g.vocab_size or not self._m.consume_token(token):
            raise LLMExportError(f"token {token} is not allowed here by the grammar "
                                 f"({_first_line(self._m.get_error()) or 'outside the vocabulary'})")

    @property
    def eos_allowed(self) -> bool:
        """The output so far is a complete document: EOS may come now."""
        return self._m.is_accepting()

    @property
    def is_finished(self) -> bool:
        """Nothing but EOS can follow (or EOS was accepted): the sequence may end here."""
        return self._m.is_stopped()

    def fork(self) -> Matcher:
        """An independent copy at the same place (n > 1 choices sharing a prompt)."""
        return Matcher(self._g, self._m.deep_copy())


def _apply(bitmask: np.ndarray, logits: np.ndarray) -> None:
    """logits (V,) float32 in place: -inf where the bitmask (32-bit words, bit 1 = allowed, the
    lowest bit first) has 0. benchmarks/grammar_mask.py measured unpackbits + putmask as the
    fastest of the plain numpy ways (~0.1 ms at V = 151,936)."""
    ok = np.unpackbits(bitmask.view(np.uint8), count=len(logits), bitorder="little")
    np.putmask(logits, ok == 0, -np.inf)


def _tokenizer_json(tokenizer: str | Path | Tokenizer) -> str:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.to_json()
    try:
        return Path(tokenizer).read_text(encoding="utf-8")
    except OSError as e:
        raise LLMExportError(f"cannot read the tokenizer {tokenizer}: {e.strerror}; re-export the bundle") from None


def _first_line(message) -> str:
    lines = str(message).strip().splitlines()
    return lines[0] if lines else ""
