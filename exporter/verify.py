"""`verify_bundle`: the bundle's graphs in ONNX Runtime against the torch reference.

Both sides run the same random ragged prompts, then the same decode steps: the decode
tokens are the reference's greedy choices (teacher forcing), so one early disagreement does
not snowball into every later step. The reference runs in float32 on the bundle's own
weights. Reported per output: max absolute error, relative error (max abs / max |reference|),
and for logits the top-1 agreement. Tolerances are per dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmexport.exporter import io_names as io
from llmexport.runtime.bundle import Bundle
from llmexport.runtime.onnxruntime_backend import OnnxRuntimeBackend
from llmexport.runtime.torch_backend import TorchBackend

# dtype -> (max abs error on logits and caches, minimum top-1 agreement)
TOLERANCE = {"float32": (1e-4, 1.0), "float16": (float("inf"), 0.99), "bfloat16": (float("inf"), 0.98)}


@dataclass
class OutputError:
    output: str
    max_abs: float
    relative: float
    top1: float | None  # logits only
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
        return all(r.ok for r in self.rows)


class _Stats:
    def __init__(self, name: str, logits: bool):
        self.name, self.logits = name, logits
        self.max_abs = self.ref_max = 0.0
        self.agree = self.total = 0

    def add(self, got: np.ndarray, ref: np.ndarray) -> None:
        got, ref = got.astype(np.float32), ref.astype(np.float32)
        self.max_abs = max(self.max_abs, float(np.abs(got - ref).max()))
        self.ref_max = max(self.ref_max, float(np.abs(ref).max()))
        if self.logits:
            self.agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            self.total += ref.shape[0]

    def result(self, dtype: str) -> OutputError:
        abs_tol, top1_tol = TOLERANCE[dtype]
        top1 = self.agree / self.total if self.logits and self.total else None
        ok = self.max_abs <= abs_tol and (top1 is None or top1 >= top1_tol)
        return OutputError(self.name, self.max_abs, self.max_abs / max(self.ref_max, 1e-30), top1, ok)


def verify_bundle(bundle_dir, prompts: int = 8, decode_steps: int = 16, seed: int = 0,
                  device: str = "cpu") -> VerifyReport:
    bundle = Bundle.open(bundle_dir)
    rng = np.random.default_rng(seed)
    longest = max(1, min(32, bundle.max_seq_len - decode_steps))
    stats = {"logits (prefill)": _Stats("logits (prefill)", True),
             "logits (decode)": _Stats("logits (decode)", True),
             "present.*.key/value": _Stats("present.*.key/value", False)}
    with OnnxRuntimeBackend(bundle, device, decode_graph=True) as onnx_side, TorchBackend(bundle, "cpu", "float32") as reference:
        for start in range(0, prompts, bundle.max_batch):
            batch = min(bundle.max_batch, prompts - start)
            lengths = rng.integers(1, longest + 1, batch)
            width = int(lengths.max())
            ids = rng.integers(0, bundle.vocab_size, (batch, width))
            positions = np.tile(np.arange(width), (batch, 1))
            rows = range(batch)
            got = onnx_side.step(io.PREFILL, ids, positions, lengths, rows)
            ref = reference.step(io.PREFILL, ids, positions, lengths, rows)
            stats["logits (prefill)"].add(got, ref)
            for _ in range(min(decode_steps, bundle.max_seq_len - width)):
                token = ref.argmax(-1)[:, None]
                lengths = lengths + 1
                got = onnx_side.step(io.DECODE, token, (lengths - 1)[:, None], lengths, rows)
                ref = reference.step(io.DECODE, token, (lengths - 1)[:, None], lengths, rows)
                stats["logits (decode)"].add(got, ref)
            for got_c, ref_c in zip(onnx_side.cache_arrays(rows), reference.cache_arrays(rows)):
                for row, n in enumerate(lengths):  # only the valid slots: padding slots differ by design
                    stats["present.*.key/value"].add(got_c[row, :, :n], ref_c[row, :, :n])
    return VerifyReport(str(bundle_dir), bundle.dtype, bundle.target, prompts, decode_steps,
                        [s.result(bundle.dtype) for s in stats.values() if s.ref_max or s.total])
