"""A loaded bundle: tokenizer, chat template and a client of the one generation loop.

Session.generate / stream / chat submit each prompt to the session's Engine (runtime/engine.py),
which batches them with every other request on the same session, from any thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from llmexport import LLMExportError

from .backends import Backend
from .bundle import Bundle
from .chat import ChatTemplate, Message
from . import defaults
from .engine import Engine, TokenEvent
from .sampling import SamplingParams
from .speculation import DraftModel, SpeculationConfig
from .tokenizer import Tokenizer

BACKENDS = ("onnxruntime", "torch", "tensorrt")
Prompt = str | Sequence[int]


def create_backend(bundle: Bundle, backend: str = "onnxruntime", device: str = "cpu",
                   cuda_graph: bool | None = None, threads: int | None = None, reference=None,
                   cache_rows: int | None = None) -> Backend:
    """The named backend for `bundle`; heavy libraries are imported only for the one asked for.

    cuda_graph: capture decode as CUDA graphs (None: no; on onnxruntime UNVERIFIED, see
    runtime/backends/onnxruntime.py).
    threads: CPU threads of the compute library (None: its default, every core).
    reference: a model source (exporter.verify.reference_source: the checkpoint or preset the
    bundle came from); the torch backend then runs its weights in float32 (eval --model).
    cache_rows: KV rows to allocate (default the bundle's max_batch).
    """
    if reference is not None and backend != "torch":
        raise LLMExportError(f"a reference model runs on the torch backend, not {backend}")
    if backend == "onnxruntime":
        from .backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, device, cuda_graph=bool(cuda_graph), threads=threads,
                                  cache_rows=cache_rows)
    if backend == "torch":
        from .backends.torch import TorchBackend

        return TorchBackend(bundle, device, "float32" if reference is not None else None,
                            cuda_graph=bool(cuda_graph), threads=threads, source=reference, cache_rows=cache_rows)
    if backend == "tensorrt":
        from .backends.tensorrt import TensorRTBackend

        return TensorRTBackend(bundle, device, cache_rows=cache_rows)
    raise LLMExportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


@dataclass
class GenerationResult:
    token_ids: list[list[int]]
    text: list[str]
    finish_reason: list[str]
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"token_ids": self.token_ids, "text": self.text, "finish_reason": self.finish_reason,
                "timings": self.timings}


class Session:
    """A loaded bundle on one backend: `generate` for results, `stream` for tokens as they come."""

    def __init__(self, bundle_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                 cuda_graph: bool | None = None, threads: int | None = None, check_integrity: bool = False,
                 reference=None, max_queue: int | None = None, prefill_chunk: int = defaults.PREFILL_CHUNK,
                 prefill_stall: float = defaults.PREFILL_STALL, prompt_reuse: bool = defaults.PROMPT_REUSE,
                 speculative: str | None = None, speculative_tokens: int = defaults.SPECULATIVE_TOKENS,
                 draft: str | Path | None = None):
        """`check_integrity`: hash every bundle file against the manifest before loading (sizes,
        paths and the manifest's own digest are checked on every open). `reference`: see
        create_backend. `max_queue`, `prefill_chunk`, `prefill_stall`, `prompt_reuse`: see Engine.
        `speculative`: "ngram" proposes tokens by prompt lookup, "draft" by the bundle `draft` (a
        smaller model with the same tokenizer); up to `speculative_tokens` of them are verified
        per call where that is faster (runtime/speculation.py)."""
        self.bundle = Bundle.open(bundle_dir, check_integrity=check_integrity)
        self.tokenizer = Tokenizer(self.bundle.tokenizer_path) if self.bundle.tokenizer_path else None
        speculation = (SpeculationConfig(speculative, speculative_tokens, draft=str(draft) if draft else None)
                       if speculative else None)
        if draft is not None and speculation is None:
            raise LLMExportError("a draft bundle is used by speculative decoding: pass speculative='draft' with it")
        drafts = Bundle.open(draft) if draft is not None else None
        if drafts is not None and drafts.max_batch < self.bundle.max_batch:
            raise LLMExportError(f"the draft bundle's max_batch ({drafts.max_batch}) is below the target's "
                                 f"({self.bundle.max_batch}): re-export the draft with --max-batch "
                                 f"{self.bundle.max_batch}")
        self.backend = create_backend(self.bundle, backend, device, cuda_graph, threads, reference)
        self._drafter = None
        if drafts is not None:
            self._drafter = DraftModel(create_backend(drafts, backend, device, threads=threads,
                                                      cache_rows=self.backend.cache_rows), self.bundle)
        self.engine = Engine(self.backend, self.tokenizer, eos_token_ids=self.bundle.eos_token_ids,
                             max_queue=max_queue, prefill_chunk=prefill_chunk, prefill_stall=prefill_stall,
                             prompt_reuse=prompt_reuse,
                             speculation=speculation, drafter=self._drafter)
        self.last_timings: dict = {}
        self._chat_template: ChatTemplate | None = None
        self._grammars = None

    def default_params(self, **overrides) -> SamplingParams:
        """SamplingParams from the checkpoint's generation_config.json, with `overrides` applied
        (what `generate`/`stream`/`chat` use when given no params)."""
        return SamplingParams(**{**self.bundle.generation_defaults, **overrides})

    @property
    def chat_template(self) -> ChatTemplate:
        if self._chat_template is None:
            paths = self.bundle.chat_paths()
            template = ChatTemplate.from_files(paths["template"], paths["tokenizer_config"],
                                               paths["special_tokens_map"])
            if template is None:
                raise LLMExportError("this bundle has no chat template (its checkpoint had no chat_template.jinja or "
                                     "tokenizer_config.json chat_template); call generate() with the prompt as "
                                     "text or token ids, or export a checkpoint that has a chat template")
            self._chat_template = template
        return self._chat_template

    @property
    def grammars(self):
        """The session's runtime/grammar.py Grammars (made on first use: reading the tokenizer
        takes a second or two at a 150k vocabulary)."""
        if self._grammars is None:
            from .grammar import Grammars

            if self.bundle.tokenizer_path is None:
                raise LLMExportError("response_format and tools need the model's tokenizer; this bundle has none")
            self._grammars = Grammars(self.bundle.tokenizer_path, self.bundle.vocab_size,
                                      sorted(self.engine.eos_token_ids))
        return self._grammars

    def render_chat(self, messages: Sequence[Message], tools: Sequence[dict] | None = None) -> list[int]:
        """Prompt ids of a conversation, as transformers' apply_chat_template(add_generation_prompt=True);
        `tools` (OpenAI's function definitions) go to templates that take them."""
        if self.tokenizer is None:
            raise LLMExportError("chat needs the bundle's tokenizer; this bundle has none")
        text = self.chat_template.render(messages, tools=tools) if tools else self.chat_template.render(messages)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages: Sequence[Message], params: SamplingParams | None = None) -> GenerationResult:
        """The assistant's reply to one conversation ([{"role": ..., "content": ...}, ...])."""
        return self.generate([self.render_chat(messages)], params)

    def chat_stream(self, messages: Sequence[Message], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        yield from self.stream([self.render_chat(messages)], params)

    def close(self) -> None:
        """Cancel what still runs, free the backend (sessions, caches) and drop the bundle's memory map of the weights,
        even while this object is still referenced (qwen2-0.5b int4 on ONNX Runtime: RSS 1000
        MiB open, 156 after close; 585 before close released the map)."""
        self.engine.shutdown()
        self.backend.close()
        if self._drafter is not None:
            self._drafter.close()
        self.bundle.release()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------

    def _encode(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        if isinstance(prompts, str) or (prompts and all(isinstance(t, (int, np.integer)) for t in prompts)):
            prompts = [prompts]
        if not prompts:
            raise LLMExportError("no prompt given")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise LLMExportError("this bundle has no tokenizer; pass token ids (--token-ids) instead of text")
                p = self.tokenizer.encode(p)
            out.append(self.engine.check_prompt(p))
        if len(out) > self.bundle.max_batch:
            raise LLMExportError(f"batch of {len(out)} prompts exceeds the bundle's max_batch={self.bundle.max_batch}; "
                                 f"split the request or re-export with a larger --max-batch")
        return out

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
                 response_format: dict | None = None) -> GenerationResult:
        """params None: the bundle's generation defaults (greedy without a generation_config.json).
        response_format: OpenAI's ({"type": "json_object"}, or "json_schema" with a schema): each
        output is sampled among the tokens that keep it valid (runtime/grammar.py)."""
        ids = self._encode(prompts)
        result = GenerationResult([[] for _ in ids], ["" for _ in ids], ["" for _ in ids])
        for event in self._stream(ids, params, response_format):
            if event.token_id is not None:
                result.token_ids[event.index].append(event.token_id)
            result.text[event.index] += event.text
            if event.finish_reason:
                result.finish_reason[event.index] = event.finish_reason
        result.timings = self.last_timings
        return result

    def stream(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
               response_format: dict | None = None) -> Iterator[TokenEvent]:
        """Yield one TokenEvent per generated token of each row, in generation order."""
        yield from self._stream(self._encode(prompts), params, response_format)

    def _stream(self, prompts: list[list[int]], params: SamplingParams | None,
                response_format: dict | None = None) -> Iterator[TokenEvent]:
        """stream() on prompts already encoded and checked (generate encodes them itself). Row i
        samples with seed + i, so the rows of one call draw differently."""
        params = self.default_params() if params is None else params
        if params.stop and self.tokenizer is None:
            raise LLMExportError("stop strings need a tokenizer; the bundle has none (use eos ids instead)")
        engine, events = self.engine, deque()
        started, steps = time.perf_counter(), engine.stats["decode_steps"]
        matchers = [self.grammars.matcher(response_format) if response_format else None for _ in prompts]
        requests = [engine.submit(p, replace(params, seed=(params.seed + row) % 2**63) if row else params,
                                  index=row, sink=events.append, matcher=matchers[row])
                    for row, p in enumerate(prompts)]
        try:
            while True:
                engine.wait(lambda: events or all(r.done for r in requests))
                while events:
                    event = events.popleft()
                    if event.finish_reason == "error":
                        raise LLMExportError(requests[event.index].error)
                    yield event
                if all(r.done for r in requests) and not events:
                    break
        finally:
            for r in requests:
                r.cancel()
        self.last_timings = _timings(requests, started, engine.stats["decode_steps"] - steps, self.backend.name)


def _timings(requests, started: float, decode_steps: int, backend: str) -> dict:
    first = min(r.token_times[0] for r in requests if r.token_times)
    finished = max(r.token_times[-1] for r in requests if r.token_times)
    produced = sum(len(r.tokens) for r in requests)
    return {
        "time_to_first_token_s": first - started,
        "decode_steps": decode_steps,
        "decode_s": finished - first,
        "decode_ms_per_step": 1000 * (finished - first) / decode_steps if decode_steps else None,
        "tokens_per_s": produced / (finished - started),
        "backend": backend,
    }
