"""onnxruntime-genai as a comparison column of `llmexport bench`: its model builder on the same
checkpoint (`-p int4|fp32 -e cpu`), then its generator on the same work as every other runner.

Both run in a child process of the Python given (`--genai-python`; default this one when it has
`onnxruntime_genai`): the builder needs transformers 5 and onnxruntime-genai ships against its
own onnxruntime, so neither is imported here. The child prints one JSON object of timings in
the Timing.to_dict() form the suite uses.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

from .runners import Unavailable

# Runs in the child: argv[1] is a JSON object of settings (see GenaiRunner.measure).
_CHILD = r"""
import json, statistics, sys, time
import numpy as np
import onnxruntime_genai as og

s = json.loads(sys.argv[1])
config = og.Config(s["path"])
config.overlay(json.dumps({"model": {"decoder": {"session_options": {
    "intra_op_num_threads": s["threads"], "inter_op_num_threads": 1}}}}))
model = og.Model(config)
rng = np.random.default_rng(s["seed"])

def stats(samples):
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "repeats": len(samples)}

def generator(batch, length):
    params = og.GeneratorParams(model)
    # at most the model's context_length (a bundle's max_seq_len), which genai refuses to exceed
    params.set_search_options(max_length=min(length + s["warmup"] + s["repeats"] + 2, s["max_length"]),
                              batch_size=batch)
    return og.Generator(model, params)

out = {"ttft": {}, "decode": {}}
for length in s["prompt_lens"]:
    samples = []
    for i in range(s["warmup"] + s["repeats"]):
        g = generator(1, length)
        ids = rng.integers(0, s["vocab"], (1, length)).astype(np.int32)
        start = time.perf_counter()
        g.append_tokens(ids)  # the prefill runs here
        samples.append(time.perf_counter() - start)
        del g
    out["ttft"][str(length)] = stats(samples[s["warmup"]:])
for batch in s["batches"]:
    g = generator(batch, s["context"])
    g.append_tokens(rng.integers(0, s["vocab"], (batch, s["context"])).astype(np.int32))
    samples = []
    for i in range(s["warmup"] + s["repeats"]):
        start = time.perf_counter()
        g.generate_next_token()  # one forward pass of the whole batch, and greedy picking
        samples.append(time.perf_counter() - start)
    del g
    out["decode"][str(batch)] = stats(samples[s["warmup"]:])
print(json.dumps(out))
"""


def default_python() -> str | None:
    """This Python when it can import onnxruntime_genai, else None."""
    return sys.executable if importlib.util.find_spec("onnxruntime_genai") else None


class GenaiRunner:
    """One onnxruntime-genai precision (int4 or fp32) on the CPU, built from `checkpoint`; or, with
    `bundle`, onnxruntime-genai's runtime on an llmexport `ort` bundle (its genai.onnx), so the same
    files are timed under both runtimes."""

    def __init__(self, precision: str, checkpoint: str | None, python: str | None, workdir: Path, config,
                 bundle: Path | None = None, label: str = "", stored_bytes: int | None = None):
        """stored_bytes: the bundle's weight bytes as its onnxruntime-cpu row counts them (the same roofline)."""
        self.precision, self.checkpoint, self.python, self.config = precision, checkpoint, python, config
        self.bundle, self.stored_bytes = bundle, stored_bytes
        if bundle is not None:
            self.name = f"onnxruntime-genai runtime on onnxruntime-cpu{' ' + label if label else ''} bundle"
            self.out = Path(bundle)
        else:
            self.name = f"onnxruntime-genai {precision} (cpu)"
            self.out = Path(workdir) / f"genai-{precision}"

    def check(self) -> None:
        if self.config.device != "cpu":
            raise Unavailable("measured on the CPU only")
        if self.bundle is not None and not (self.out / "genai_config.json").is_file():
            raise Unavailable("the bundle has no genai_config.json (only --target ort bundles carry one)")
        if self.bundle is None and (not self.checkpoint or not (Path(self.checkpoint) / "config.json").is_file()):
            raise Unavailable("its model builder needs a checkpoint directory (--model DIR), not a preset")
        if not self.python or not shutil.which(self.python):
            raise Unavailable("onnxruntime-genai is not installed: pip install onnxruntime-genai (its builder "
                              "needs transformers 5), or pass --genai-python")

    def build(self) -> None:
        if (self.out / "genai_config.json").is_file():
            return
        done = subprocess.run([self.python, "-m", "onnxruntime_genai.models.builder", "-i", self.checkpoint, "-o",
                               str(self.out), "-p", self.precision, "-e", "cpu", "-c", str(self.out) + "-cache"],
                              capture_output=True, text=True)
        if done.returncode:
            raise Unavailable(f"its model builder failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")

    def weight_bytes(self) -> int:
        if self.stored_bytes is not None:
            return self.stored_bytes
        return sum(p.stat().st_size for p in self.out.iterdir() if p.name.startswith("model.onnx"))

    def measure(self, vocab: int) -> dict:
        c = self.config
        settings = {"path": str(self.out), "threads": c.threads or 0, "seed": c.seed, "vocab": vocab,
                    "prompt_lens": list(c.prompt_lens), "batches": list(c.batches), "context": c.decode_context,
                    "warmup": c.warmup, "repeats": c.repeats, "max_length": self._context_length()}
        done = subprocess.run([self.python, "-c", _CHILD, json.dumps(settings)], capture_output=True, text=True)
        if done.returncode:
            raise Unavailable(f"its generator failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def _context_length(self) -> int:
        config = json.loads((self.out / "genai_config.json").read_text())
        return int(config["model"].get("context_length") or 2**31 - 1)

    def close(self) -> None:
        pass
