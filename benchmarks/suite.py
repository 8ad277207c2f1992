"""`run_benchmark`: the same work on every backend in one process, with a roofline.

Work: time to first token for each prompt length at batch 1, then per-step decode latency
for each batch size after a prompt of `decode_context` tokens. Roofline for a decode step:
(weight bytes + KV bytes read) / this device's measured read bandwidth; each backend's
fraction is floor / measured.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import llmexport
from llmexport import LLMExportError
from llmexport.runtime.bundle import Bundle

from .measure import (cuda_read_bandwidth, host_read_bandwidth, peak_rss_bytes, reset_peak_rss, rss_bytes,
                      stored_weight_bytes, timed)
from .genai import GenaiRunner, default_python
from .runners import BundleRunner, MissingRunner, TransformersEagerRunner, Unavailable

Progress = Callable[[str], None]


DEFAULT_PROMPT_LENS = (128, 512, 2048)


def model_limit(model: str) -> int:
    """The longest sequence a preset or checkpoint holds (its max_position_embeddings)."""
    from llmexport.model.weights import open_source

    return open_source(model).config.max_position_embeddings


def default_prompt_lens(limit: int) -> tuple[int, ...]:
    """DEFAULT_PROMPT_LENS that fit a model holding `limit` tokens (with one to decode), or, for a
    model shorter than all of them, half its limit: the default work of `llmexport bench`
    runs on every preset."""
    fitting = tuple(n for n in DEFAULT_PROMPT_LENS if n < limit)
    return fitting or (max(1, limit // 2),)


@dataclass(frozen=True)
class BenchConfig:
    model: str = "tiny-llama"
    dtype: str = "float32"
    target: str = "ort"
    device: str = "cpu"
    prompt_lens: tuple[int, ...] = DEFAULT_PROMPT_LENS
    batches: tuple[int, ...] = (1, 8, 32)
    decode_context: int = 128
    warmup: int = 2
    repeats: int = 5
    seed: int = 0
    bundle: str | None = None  # an existing bundle; otherwise one is exported into workdir
    workdir: str = "bench-work"
    threads: int | None = None  # CPU threads of every system measured (None: each library's default)
    quants: tuple[str, ...] = ()  # also export and measure these quantized variants (see quant_flags)
    genai: tuple[str, ...] = ()  # onnxruntime-genai precisions to build and measure (int4, fp32), and/or
    # "bundle": its runtime on this benchmark's own bundles (their genai.onnx)
    genai_python: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def max_seq_len(self) -> int:
        return max(max(self.prompt_lens), self.decode_context + self.warmup + self.repeats) + 1


# A variant is a --quant method with optional +modifiers: int4, int8, int4+sym+head4 ...
_MODIFIERS = {"sym": ["--quant-symmetric"], "asym": ["--quant-asymmetric"], "head4": ["--quant-head", "int4"],
              "head8": ["--quant-head", "int8"], "zp8": ["--quant-zero-point", "uint8"], "search": ["--quant-search"]}


def quant_flags(variant: str) -> list[str]:
    """`llmexport onnx` flags of a benchmark variant such as "int4+sym+head4"."""
    method, *modifiers = variant.split("+")
    bad = [m for m in modifiers if m not in _MODIFIERS]
    if method not in ("int8", "int4") or bad:
        raise LLMExportError(f"--quant {variant}: a variant is int8 or int4, optionally followed by "
                             f"+{', +'.join(_MODIFIERS)} (e.g. int4+sym+head4)")
    return ["--quant", method, *(flag for m in modifiers for flag in _MODIFIERS[m])]


def _export(config: BenchConfig, progress: Progress, quant: str | None = None) -> tuple[Path, dict]:
    """Export in a child process so its wall time and peak RSS are its own."""
    if config.bundle and quant:
        raise LLMExportError("--quant variants are exported by the benchmark: pass --model, not --bundle")
    if config.bundle:
        seconds = Bundle.open(config.bundle).manifest.export.seconds
        return Path(config.bundle), {"export_s": seconds, "export_peak_rss_bytes": None,
                                     "note": "existing bundle: export time from its manifest"}
    limit = model_limit(config.model)
    if config.max_seq_len > limit:
        raise LLMExportError(f"the benchmark needs max_seq_len {config.max_seq_len} but {config.model} allows {limit}; "
                             f"pass smaller --prompt-lens / --decode-context")
    suffix = f"-{quant}" if quant else ""
    out = Path(config.workdir) / f"{Path(config.model).name}-{config.target}-{config.dtype}{suffix}"
    progress(f"exporting {config.model} ({config.dtype}, {config.target}{', ' + quant if quant else ''})")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from llmexport.cli import main; main()", "onnx", "--model",
                           config.model, "--out", str(out), "--dtype", config.dtype, "--target", config.target,
                           "--seed", str(config.seed), "--max-seq-len", str(config.max_seq_len), "--max-batch",
                           str(max(config.batches)), "--force", *(quant_flags(quant) if quant else [])],
                          capture_output=True, text=True)
    if done.returncode:
        raise LLMExportError(f"exporting the benchmark bundle failed: {done.stderr.strip().splitlines()[-1]}")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return out, {"export_s": seconds, "export_peak_rss_bytes": peak}


def _runners(config: BenchConfig, bundle: Path, quantized: dict[str, Path]) -> list:
    """Every backend, each on the bundle's own weights so all run exactly the same model; then
    ONNX Runtime on each quantized variant, and onnxruntime-genai built from the same checkpoint."""
    from llmexport.runtime.backends.torch import BundleSource

    gpu, threads = config.device == "cuda", config.threads
    runners = [
        TransformersEagerRunner(BundleSource(Bundle.open(bundle)), config.dtype, config.device, threads),
        BundleRunner(f"torch-static ({config.device})", bundle, "torch", config.device, threads=threads),
        BundleRunner("torch-static + CUDA graph", bundle, "torch", "cuda", cuda_graph=True) if gpu
        else MissingRunner("torch-static + CUDA graph", "needs a GPU"),
        BundleRunner("onnxruntime-cpu", bundle, "onnxruntime", "cpu", threads=threads),
        BundleRunner("onnxruntime-cuda", bundle, "onnxruntime", "cuda") if gpu
        else MissingRunner("onnxruntime-cuda", "needs a GPU"),
        # unverified: no GPU run yet (if ONNX Runtime refuses the capture, this row says why)
        BundleRunner("onnxruntime-cuda + CUDA graph", bundle, "onnxruntime", "cuda", cuda_graph=True) if gpu
        else MissingRunner("onnxruntime-cuda + CUDA graph", "needs a GPU"),
        MissingRunner("tensorrt", "TensorRT is not installed (and no TensorRT backend in this version)"),
    ]
    variants = {"": bundle, **quantized}  # by label: "" the float bundle, then each --quant variant
    stored = {label: stored_weight_bytes(Bundle.open(path)) for label, path in variants.items()}
    for quant, path in quantized.items():
        runners.append(BundleRunner(f"onnxruntime-cpu {quant}", path, "onnxruntime", "cpu", threads=threads,
                                    weight_bytes=stored[quant]))
        if gpu:
            runners.append(BundleRunner(f"onnxruntime-cuda {quant}", path, "onnxruntime", "cuda",
                                        weight_bytes=stored[quant]))
    checkpoint, python = None if config.bundle else config.model, config.genai_python or default_python()
    runners += [GenaiRunner(p, checkpoint, python, Path(config.workdir), config) for p in config.genai if p != "bundle"]
    if "bundle" in config.genai:  # genai's own runtime on the very files measured above
        runners += [GenaiRunner("bundle", None, python, Path(config.workdir), config, bundle=path, label=label,
                                stored_bytes=stored[label]) for label, path in variants.items()]
    return runners


def _measure_genai(runner: GenaiRunner, vocab: int, progress: Progress) -> dict:
    runner.check()
    progress(f"{runner.name}: building")
    runner.build()
    progress(f"{runner.name}: measuring")
    timings = runner.measure(vocab)
    for batch, d in timings["decode"].items():
        d["tokens_per_s"] = int(batch) / d["median_s"]
    source = "the bundle's genai.onnx" if runner.bundle is not None else "its builder's output"
    return {"backend": runner.name, "status": "ok", "weight_bytes": runner.weight_bytes(), **timings,
            "note": f"child process; onnxruntime-genai's own generator (greedy) on {source}"}


def _measure(runner, config: BenchConfig, vocab: int, progress: Progress) -> dict:
    if isinstance(runner, GenaiRunner):
        return _measure_genai(runner, vocab, progress)
    rng = np.random.default_rng(config.seed)
    runner.check()
    before, device_before = rss_bytes(), _device_used(config.device)
    reset_peak_rss()  # the previous runner's peak is not this one's
    start = time.perf_counter()
    runner.load()
    result = {"backend": runner.name, "status": "ok", "load_s": time.perf_counter() - start, "ttft": {}, "decode": {}}
    if getattr(runner, "weight_bytes", None):  # a quantized variant: its own stored bytes
        result["weight_bytes"] = runner.weight_bytes
    for length in config.prompt_lens:
        progress(f"{runner.name}: prefill {length} tokens")
        ids = rng.integers(0, vocab, (1, length))
        result["ttft"][str(length)] = timed(lambda: runner.prefill(ids), runner.sync, config.warmup,
                                            config.repeats).to_dict()
    for batch in config.batches:
        progress(f"{runner.name}: decode at batch {batch}")
        runner.prefill(rng.integers(0, vocab, (batch, config.decode_context)))
        t = timed(runner.decode_step, runner.sync, config.warmup, config.repeats)
        result["decode"][str(batch)] = t.to_dict() | {"tokens_per_s": batch / t.median_s}
    result["host_rss_growth_bytes"] = max(rss_bytes() - before, 0)
    # CPU: the highest RSS while this runner loaded and ran, above what the process held before
    # (RSS after the run alone reads 0 when the previous runner's freed memory is reused).
    peak = _device_used(config.device) if config.device == "cuda" else peak_rss_bytes()
    result["peak_device_bytes"] = max(peak - device_before, 0)
    return result


def _device_used(device: str) -> int:
    """Device memory in use: on CUDA from the driver (so ONNX Runtime's own allocator counts
    too, which torch's allocator statistics would miss); on CPU the process's RSS."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free
    return rss_bytes()


def run_benchmark(config: BenchConfig, progress: Progress = lambda message: None) -> dict:
    from llmexport.model.config import ModelConfig
    from llmexport.runtime.bundle import Bundle

    progress("measuring memory read bandwidth")
    bandwidth = cuda_read_bandwidth() if config.device == "cuda" else host_read_bandwidth()
    bundle_dir, export = _export(config, progress)
    quantized = {q: _export(config, progress, q)[0] for q in config.quants}
    bundle = Bundle.open(bundle_dir)
    mc = ModelConfig.from_dict(bundle.config)
    weight_bytes = mc.weight_bytes(config.dtype)
    results = []
    for runner in _runners(config, bundle_dir, quantized):
        try:
            results.append(_measure(runner, config, bundle.vocab_size, progress))
        except Unavailable as e:
            results.append({"backend": runner.name, "status": "skipped", "reason": str(e)})
        finally:
            runner.close()
    roofline = {}
    context = config.decode_context + config.warmup + config.repeats // 2  # the median step's cache
    for batch in config.batches:
        kv = mc.kv_cache_bytes(batch, context, config.dtype)
        roofline[str(batch)] = {"bytes_read": weight_bytes + kv, "floor_s": (weight_bytes + kv) / bandwidth}
    for r in (r for r in results if r["status"] == "ok"):  # each against its own weights' bytes
        own = r["weight_bytes"] = r.get("weight_bytes") or weight_bytes
        for batch, d in r.get("decode", {}).items():
            read = own + mc.kv_cache_bytes(int(batch), context, config.dtype)
            d["fraction_of_floor"] = read / bandwidth / d["median_s"]
            d["achieved_bytes_per_s"] = read / d["median_s"]
    return {
        "schema": "llmexport-bench/2",
        "command": " ".join(sys.argv),
        "config": {k: v for k, v in config.__dict__.items() if k != "extra"},
        "hardware": _hardware(config.device),
        "versions": _versions(),
        "read_bandwidth_bytes_per_s": bandwidth,
        "weight_bytes": weight_bytes,
        "bundle": {"path": str(bundle_dir), **export},
        "roofline": roofline,
        "results": results,
    }


def _hardware(device: str) -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": _cpu_count(), "memory_bytes": _memory_bytes(), "device": device}
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


def _versions() -> dict:
    versions = {"llmexport": llmexport.__version__, "python": platform.python_version()}
    for name in ("torch", "onnxruntime", "onnx", "transformers", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions
