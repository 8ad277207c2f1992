"""Measuring helpers: timing with warm-ups and medians, memory, the device's read bandwidth."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from llmexport.runtime.bundle import Bundle


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def timed(fn: Callable[[], None], sync: Callable[[], None], warmup: int, repeats: int) -> Timing:
    """Run fn warmup + repeats times; each repeat synchronises the device before stopping the clock."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return Timing(statistics.median(samples), min(samples), max(samples), repeats)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux >= 4.0: writing 5 to clear_refs resets VmHWM).
    False where the kernel refuses, and `peak_rss_bytes` then covers the process's lifetime."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The most resident memory this process has held since the last `reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return rss_bytes()


def host_read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of a streaming read of a buffer far larger than the caches, by every core at once.

    numpy releases the GIL in reductions; one thread alone cannot saturate memory. `max` is the
    reduction with the least arithmetic per byte (here: 31.8 GB/s, like a torch GEMV's 31.5,
    where `sum` stopped at 17 GB/s on its additions)."""
    threads = len(os.sched_getaffinity(0))
    data = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    chunks = np.array_split(data, threads)
    with ThreadPoolExecutor(threads) as pool:
        def read_all() -> None:
            list(pool.map(np.max, chunks))

        read_all()
        best = min(_seconds(read_all) for _ in range(repeats))
    return data.nbytes / best


def cuda_read_bandwidth(megabytes: int = 2048, repeats: int = 10) -> float:
    """Bytes/s of a streaming read on the GPU (torch reduction over a large fp16 tensor)."""
    import torch

    data = torch.ones(megabytes * 2**20 // 2, dtype=torch.float16, device="cuda")
    data.sum()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        data.sum()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return data.numel() * 2 / best


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stored_weight_bytes(bundle: Bundle) -> int:
    """Bytes a bundle's weight index stores for the model, packed codes, scales and offsets
    included: each byte range once (an alias, the tied table's `rows` view, names the same
    bytes), the rope tables left out."""
    tensors = bundle.manifest.weights.tensors
    return sum(length for _, length in {(t.offset, t.length) for n, t in tensors.items() if not n.startswith("rope_")})
