"""`verify_bundle`: the bundle's graphs in ONNX Runtime against the torch reference.

Both sides run the same random ragged prompts, then the same decode steps: the decode
tokens are the reference's greedy choices (teacher forcing), so one early disagreement does
not snowball into every later step. The reference runs in float32 on the bundle's own
weights, attending over each sequence's valid length only. An `ort` bundle's genai.onnx runs
the same steps as onnxruntime-genai feeds them (genai_graph.py), judged on its logits likewise.

Judged like Polygraphy's comparator, per output and per dtype (TOLERANCES, documented in
README): the error of every element is scaled by the output's scale (max |reference| of that
step), and the statistic checked is the maximum of that scaled error (and its 99th percentile
is reported beside it). NaN or Inf on either side fails. For logits, top-1 agreement is
counted only where the reference's top two logits differ by more than the tolerance (a
near-tie may go either way without either side being wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from llmexport import LLMExportError
from llmexport.model.config import ModelConfig
from llmexport.model.weights import ModelSource, open_source
from llmexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from llmexport.runtime.backends.torch import TorchBackend
from llmexport.runtime.bundle import Bundle
from llmexport.runtime.bundle import names as io

from .genai_graph import GenaiGraph


@dataclass(frozen=True)
class Tolerance:
    logits: float  # max |got - ref| / max |ref| per step
    caches: float  # the same for the valid slots of every present.*.key/value
    min_top1: float  # fraction of decisive rows whose argmax agrees


# float32 differs from the reference by summation order only; float16 / bfloat16 graphs compute
# in that dtype against a float32 reference (10 / 7 significand bits), compounded over layers.
# Measured on SmolLM2-135M (30 layers, max_seq_len 4096, seeds 0-9), worst element: float32
# (ort, portable) logits 6e-6, caches 1.6e-4 (one outlier; p99 2e-6); float16 (ort) logits
# 8.4e-3, caches 7.2e-2 (one outlier in a deep layer's keys; p99 1.5e-3). Limits: about 2x those.
TOLERANCES = {"float32": Tolerance(1e-4, 1e-3, 1.0), "float16": Tolerance(2e-2, 1.5e-1, 0.99),
              "bfloat16": Tolerance(1e-1, 5e-1, 0.97)}
VERIFY_BATCH = 4  # prompts per step: caches are allocated for this many rows, not max_batch


@dataclass
class OutputError:
    output: str
    max_abs: float
    max_scaled: float  # the statistic judged: max over elements of |got - ref| / scale
    p99_scaled: float
    top1: float | None  # logits only: agreement over decisive rows
    nonfinite: int  # elements that are NaN/Inf on either side (any fails)
    tolerance: float
    ok: bool


@dataclass
class VerifyReport:
    bundle: str
    dtype: str
    target: str
    prompts: int
    decode_steps: int
    rows: list[OutputError]

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)


class _Stats:
    def __init__(self, name: str, logits: bool, tolerance: Tolerance):
        self.name, self.logits, self.tol = name, logits, tolerance
        self.limit = tolerance.logits if logits else tolerance.caches
        self.max_abs = self.max_scaled = 0.0
        self.scaled: list[np.ndarray] = []  # a sample of scaled errors, for the percentile
        self.nonfinite = 0
        self.agree = self.decisive = 0

    def add(self, got: np.ndarray, ref: np.ndarray) -> None:
        got, ref = got.astype(np.float32), ref.astype(np.float32)
        bad = ~np.isfinite(got) | ~np.isfinite(ref)
        self.nonfinite += int(bad.sum())
        if bad.all():
            return
        diff = np.abs(got[~bad] - ref[~bad])
        scaled = diff / max(float(np.abs(ref[~bad]).max()), 1e-30)
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.max_scaled = max(self.max_scaled, float(scaled.max()))
        self.scaled.append(scaled.ravel()[:: max(1, scaled.size // 4096)])
        if self.logits:
            top2 = np.sort(ref, axis=-1)[:, -2:]
            scale = np.abs(ref).max(axis=-1)
            decisive = (top2[:, 1] - top2[:, 0]) > 2 * self.limit * scale
            self.agree += int((got.argmax(-1) == ref.argmax(-1))[decisive].sum())
            self.decisive += int(decisive.sum())

    def result(self) -> OutputError:
        top1 = self.agree / self.decisive if self.logits and self.decisive else (1.0 if self.logits else None)
        p99 = float(np.quantile(np.concatenate(self.scaled), 0.99)) if self.scaled else float("nan")
        ok = (self.nonfinite == 0 and bool(self.scaled) and self.max_scaled <= self.limit
              and (top1 is None or top1 >= self.tol.min_top1))
        max_scaled = self.max_scaled if self.nonfinite == 0 else float("inf")
        return OutputError(self.name, self.max_abs, max_scaled, p99, top1, self.nonfinite, self.limit, ok)


def reference_source(bundle_dir, model) -> ModelSource:
    """The model a bundle was exported from (preset name or checkpoint directory), checked to be
    that model: the reference then runs its weights instead of the bundle's weights.bin, so a
    weight damaged or changed after export shows up (`verify --model`)."""
    bundle = Bundle.open(bundle_dir)
    source = open_source(model, bundle.manifest.model.seed or 0)
    theirs, ours = source.config.to_dict(), ModelConfig.from_dict(bundle.config).to_dict()
    differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    if differ:
        raise LLMExportError(f"--model {model} is not the model {bundle_dir} was exported from (config differs in "
                             f"{', '.join(differ[:5])}); pass the checkpoint or preset it was exported from")
    return source


def verify_bundle(bundle_dir, prompts: int = 8, decode_steps: int = 16, seed: int = 0,
                  device: str = "cpu", threads: int | None = None, source: ModelSource | None = None,
                  progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """`source` (see reference_source): the reference's weights; default the bundle's own.
    `progress(done, total)` is called after each step run on both sides (a prefill of one batch of
    prompts, or one decode step of it)."""
    bundle = Bundle.open(bundle_dir)
    tol = TOLERANCES[bundle.dtype]
    rng = np.random.default_rng(seed)
    longest = max(1, min(32, bundle.max_seq_len - decode_steps))
    stats = {name: _Stats(name, name.startswith("logits"), tol)
             for name in ("logits (prefill)", "logits (decode)", "present.*.key/value", "logits (genai prefill)",
                          "logits (genai decode)")}
    rows_per_step = min(VERIFY_BATCH, bundle.max_batch, prompts)
    steps_per_batch = 1 + decode_steps  # at most: a batch of long prompts may have fewer cache slots to decode in
    total = -(-prompts // rows_per_step) * steps_per_batch
    tick = progress or (lambda done, total: None)
    # Small on purpose: caches for `rows_per_step` rows only (the reference's only as long as the
    # longest sequence), and no prepacked second copy of the weights in ONNX Runtime.
    # Unprepacked, MatMulNBits computes in float32 whatever its accuracy level: verify checks the
    # graphs' plumbing on the bundle's exact (dequantized) weights. The int8 activations of
    # accuracy level 4 (prepacked sessions) are a quality effect, measured by `llmexport eval`.
    with OnnxRuntimeBackend(bundle, device, decode_graph=True, cache_rows=rows_per_step, threads=threads,
                            prepack=False) as onnx_side, \
            TorchBackend(bundle, "cpu", "float32", cache_rows=rows_per_step, threads=threads,
                         cache_len=longest + decode_steps, source=source) as reference:
        # `ort` bundles' genai.onnx, fed the same tokens as onnxruntime-genai feeds them (an attention
        # mask); on the CPU only: its caches are host arrays (and the CPU runs no bfloat16)
        genai = (GenaiGraph(bundle, rows_per_step, min(longest + decode_steps, bundle.max_seq_len), threads)
                 if io.GENAI in bundle.manifest.graphs and device == "cpu" else None)
        for start in range(0, prompts, rows_per_step):
            batch = min(rows_per_step, prompts - start)
            lengths = rng.integers(1, longest + 1, batch)
            width = int(lengths.max())
            ids = rng.integers(0, bundle.vocab_size, (batch, width))
            positions = np.tile(np.arange(width), (batch, 1))
            rows = range(batch)
            got = onnx_side.step(io.PREFILL, ids, positions, lengths, rows)
            ref = reference.step(io.PREFILL, ids, positions, lengths, rows)
            stats["logits (prefill)"].add(got, ref)
            mask = (positions < lengths[:, None]).astype(np.int64)  # right padding: 0 after each row's end
            if genai is not None:
                stats["logits (genai prefill)"].add(genai.step(ids, mask), ref)
            done = start // rows_per_step * steps_per_batch
            tick(done + 1, total)
            for step in range(min(decode_steps, bundle.max_seq_len - width)):
                token = ref.argmax(-1)[:, None]
                lengths = lengths + 1
                got = onnx_side.step(io.DECODE, token, (lengths - 1)[:, None], lengths, rows)
                ref = reference.step(io.DECODE, token, (lengths - 1)[:, None], lengths, rows)
                stats["logits (decode)"].add(got, ref)
                mask = np.hstack([mask, np.ones((batch, 1), np.int64)])  # genai's mask grows by a column of ones
                if genai is not None:
                    stats["logits (genai decode)"].add(genai.step(token, mask), ref)
                tick(done + 2 + step, total)
            tick(done + steps_per_batch, total)
            valid = int(lengths.max())  # slots past every sequence's end are padding by design
            for got_c, ref_c in zip(onnx_side.cache_arrays(rows, valid), reference.cache_arrays(rows, valid),
                                    strict=True):
                for row, n in enumerate(lengths):
                    stats["present.*.key/value"].add(got_c[row, :, :n], ref_c[row, :, :n])
        if genai is not None:
            genai.close()
    return VerifyReport(str(bundle_dir), bundle.dtype, bundle.target, prompts, decode_steps,
                        [s.result() for s in stats.values() if s.scaled or s.nonfinite])
