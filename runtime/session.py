"""The generation loop: prefill, then one decode step at a time, sampling and stopping.

Nothing here knows which backend runs the graphs. Prompts of different lengths share one
batch: they are right-padded to the longest, padding tokens take the positions after each
row's last real token (so they land in slots the row overwrites later), and each row's
logits are those of its own last real token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmexport import LLMExportError
from llmexport.runtime.bundle import names as io

from .backend import Backend
from .bundle import Bundle
from .chat import ChatTemplate, Message
from .kv_slots import KVSlots
from .sampling import Sampler, SamplingParams
from .tokenizer import TextStream, Tokenizer

BACKENDS = ("onnxruntime", "torch", "tensorrt")
Prompt = str | Sequence[int]


def create_backend(bundle: Bundle, backend: str = "onnxruntime", device: str = "cpu",
                   cuda_graph: bool | None = None, threads: int | None = None, reference=None) -> Backend:
    """The named backend for `bundle`; heavy libraries are imported only for the one asked for.

    cuda_graph: capture decode as CUDA graphs (None: yes for onnxruntime on CUDA, no for torch).
    threads: CPU threads of the compute library (None: its default, every core).
    reference: a model source (exporter.verify.reference_source: the checkpoint or preset the
    bundle came from); the torch backend then runs its weights in float32 (eval --model).
    """
    if reference is not None and backend != "torch":
        raise LLMExportError(f"a reference model runs on the torch backend, not {backend}")
    if backend == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, device, cuda_graph=True if cuda_graph is None else cuda_graph,
                                  threads=threads)
    if backend == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(bundle, device, "float32" if reference is not None else None,
                            cuda_graph=bool(cuda_graph), threads=threads, source=reference)
    if backend == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(bundle, device)
    raise LLMExportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class TokenEvent:
    row: int  # which prompt of the request
    token_id: int
    text: str  # text delta ("" without a tokenizer, or while held back)
    finish_reason: str | None  # set on a row's last event: eos, stop, length, max_seq_len


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
                 reference=None):
        """`check_integrity`: hash every bundle file against the manifest before loading (sizes,
        paths and the manifest's own digest are checked on every open). `reference`: see
        create_backend."""
        self.bundle = Bundle.open(bundle_dir, check_integrity=check_integrity)
        self.tokenizer = Tokenizer(self.bundle.tokenizer_path) if self.bundle.tokenizer_path else None
        self.backend = create_backend(self.bundle, backend, device, cuda_graph, threads, reference)
        self.slots = KVSlots(self.bundle.max_batch)
        self.last_timings: dict = {}
        self._chat_template: ChatTemplate | None = None

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
                                     "tokenizer_config.json chat_template); use a plain prompt")
            self._chat_template = template
        return self._chat_template

    def render_chat(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids of a conversation, as transformers' apply_chat_template(add_generation_prompt=True)."""
        if self.tokenizer is None:
            raise LLMExportError("chat needs the bundle's tokenizer; this bundle has none")
        return self.tokenizer.encode(self.chat_template.render(messages), add_special_tokens=False)

    def chat(self, messages: Sequence[Message], params: SamplingParams | None = None) -> GenerationResult:
        """The assistant's reply to one conversation ([{"role": ..., "content": ...}, ...])."""
        return self.generate([self.render_chat(messages)], params)

    def chat_stream(self, messages: Sequence[Message], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        yield from self.stream([self.render_chat(messages)], params)

    def close(self) -> None:
        """Free the backend (sessions, caches) and drop the bundle's memory map of the weights,
        even while this object is still referenced (qwen2-0.5b int4 on ONNX Runtime: RSS 1000
        MiB open, 156 after close; 585 before close released the map)."""
        self.backend.close()
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
            ids = [int(t) for t in p]
            if not ids:
                raise LLMExportError("empty prompt: give at least one token")
            bad = [t for t in ids if not 0 <= t < self.bundle.vocab_size]
            if bad:
                raise LLMExportError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.bundle.vocab_size - 1})")
            if len(ids) > self.bundle.max_seq_len:
                raise LLMExportError(f"prompt of {len(ids)} tokens exceeds the bundle's max_seq_len="
                                     f"{self.bundle.max_seq_len}; shorten it or re-export with a larger --max-seq-len")
            out.append(ids)
        if len(out) > self.bundle.max_batch:
            raise LLMExportError(f"batch of {len(out)} prompts exceeds the bundle's max_batch={self.bundle.max_batch}; "
                                 f"split the request or re-export with a larger --max-batch")
        return out

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None) -> GenerationResult:
        """params None: the bundle's generation defaults (greedy without a generation_config.json)."""
        ids = self._encode(prompts)
        result = GenerationResult([[] for _ in ids], ["" for _ in ids], ["" for _ in ids])
        for event in self._stream(ids, params):
            result.token_ids[event.row].append(event.token_id)
            result.text[event.row] += event.text
            if event.finish_reason:
                result.finish_reason[event.row] = event.finish_reason
        result.timings = self.last_timings
        return result

    def stream(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Yield one TokenEvent per generated token of each row, in generation order."""
        yield from self._stream(self._encode(prompts), params)

    def _stream(self, prompts: list[list[int]], params: SamplingParams | None) -> Iterator[TokenEvent]:
        """stream() on prompts already encoded and checked (generate encodes them itself)."""
        params = self.default_params() if params is None else params
        streams = [TextStream(self.tokenizer, params.stop) for _ in prompts]  # validates stop vs tokenizer
        eos = () if params.ignore_eos else (params.eos_token_ids if params.eos_token_ids is not None
                                             else self.bundle.eos_token_ids)
        rows = self.slots.allocate(len(prompts))
        try:
            yield from self._loop(prompts, params, streams, set(eos), rows)
        finally:
            self.slots.free(rows)

    def _loop(self, prompts, params, streams, eos, rows) -> Iterator[TokenEvent]:
        batch, limit = len(prompts), self.bundle.max_seq_len
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        width = int(lengths.max())
        input_ids = np.zeros((batch, width), dtype=np.int64)
        for row, p in enumerate(prompts):
            input_ids[row, : len(p)] = p
        positions = np.tile(np.arange(width, dtype=np.int64), (batch, 1))
        sampler, history = Sampler(params), [list(p) for p in prompts]
        done: list[str | None] = [None] * batch
        produced = [0] * batch
        started = time.perf_counter()
        logits = self.backend.step(io.PREFILL, input_ids, positions, lengths.copy(), rows)
        first_token = time.perf_counter()
        decode_steps = 0
        while True:
            tokens = sampler(logits, history)
            for row in range(batch):
                if done[row]:
                    continue
                token = int(tokens[row])
                history[row].append(token)
                produced[row] += 1
                text = streams[row].push(token)
                if token in eos:
                    done[row] = "eos"
                elif streams[row].stopped:
                    done[row] = "stop"
                elif produced[row] >= params.max_new_tokens:
                    done[row] = "length"
                elif lengths[row] >= limit:  # no cache slot left to decode this token into
                    done[row] = "max_seq_len"
                if done[row]:
                    text += streams[row].flush()
                yield TokenEvent(row, token, text, done[row])
            if all(done):
                break
            active = np.array([d is None for d in done])
            # Finished rows re-write their own last slot with a dummy token: harmless, never read.
            step_ids = np.where(active, tokens, 0)[:, None].astype(np.int64)
            step_pos = np.where(active, lengths, lengths - 1)[:, None]
            lengths = np.where(active, lengths + 1, lengths)
            logits = self.backend.step(io.DECODE, step_ids, step_pos, lengths.copy(), rows)
            decode_steps += 1
        finished = time.perf_counter()
        self.last_timings = {
            "time_to_first_token_s": first_token - started,
            "decode_steps": decode_steps,
            "decode_s": finished - first_token,
            "decode_ms_per_step": 1000 * (finished - first_token) / decode_steps if decode_steps else None,
            "tokens_per_s": sum(produced) / (finished - started),
            "backend": self.backend.name,
        }
