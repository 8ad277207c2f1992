"""The attention kernel's correctness table and timing (`llmexport bench-kernels`).

For each head shape, dtype, batch and cache length: the Triton flash-decoding kernel against
the reference math (float32) on random valid lengths up to the cache length, then the time
of one decode-attention call over full caches for the kernel, the reference and torch's
`scaled_dot_product_attention`, with the achieved read bandwidth (K and V rows read, plus
q and out) and its fraction of the measured device bandwidth. Meant for a GPU (CUDA events);
on CPU it runs under Triton's interpreter (set TRITON_INTERPRET=1), where only correctness
means anything.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

HEADS = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}  # (Hq, Hkv, D)


def _reference(q, k, v, lens, scale):
    """model/attention.py's decode masking in float32. q (B, Hq, D); k, v (B, Hkv, T, D)."""
    import torch

    g = q.shape[1] // k.shape[1]
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k.repeat_interleave(g, 1).float()) * scale
    visible = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bht,bhtd->bhd", probs, v.repeat_interleave(g, 1).float())


LAUNCHES_PER_SAMPLE = 50  # GPU: back-to-back calls between one pair of events


def _timer(device: str) -> Callable[[Callable[[], object], int], float]:
    import time

    import torch

    def cuda_time(fn, repeats):
        """Seconds per call: each sample times LAUNCHES_PER_SAMPLE calls queued back to back
        between two events and divides. One call between events would measure launch latency
        and event overhead (several microseconds), not a kernel that itself takes microseconds."""
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(repeats):
            start.record()
            for _ in range(LAUNCHES_PER_SAMPLE):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1000 / LAUNCHES_PER_SAMPLE)
        return statistics.median(samples)

    def cpu_time(fn, repeats):
        fn()
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
        return statistics.median(samples)

    return cuda_time if device == "cuda" else cpu_time


def kernel_report(device: str = "cuda", lengths=(128, 1024, 4096), batches=(1, 16), heads=None,
                  dtypes=("float16", "bfloat16"), repeats: int = 20, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    from .measure import cuda_read_bandwidth, host_read_bandwidth
    from .triton_attention import decode_attention

    heads = heads or HEADS
    time_it = _timer(device)
    bandwidth = cuda_read_bandwidth() if device == "cuda" else host_read_bandwidth()
    torch.manual_seed(seed)
    rows = []
    for name, (hq, hkv, d) in heads.items():
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for batch in batches:
                for length in lengths:
                    q = torch.randn(batch, hq, d, device=device, dtype=dtype)
                    k = torch.randn(batch, hkv, length, d, device=device, dtype=dtype)
                    v = torch.randn(batch, hkv, length, d, device=device, dtype=dtype)
                    scale = d ** -0.5
                    ragged = torch.randint(1, length + 1, (batch,), device=device)
                    ragged[0] = length
                    want = _reference(q, k, v, ragged, scale)
                    got = decode_attention(q, k, v, ragged.to(torch.int32), scale)
                    error = ((got.float() - want).abs().max() / want.abs().max()).item()
                    full = torch.full((batch,), length, device=device, dtype=torch.int32)
                    seconds = {
                        "kernel": time_it(lambda: decode_attention(q, k, v, full, scale), repeats),
                        "reference": time_it(lambda: _reference(q, k, v, full.long(), scale), repeats),
                        "sdpa": time_it(lambda: F.scaled_dot_product_attention(
                            q[:, :, None], k, v, scale=scale, enable_gqa=True), repeats),
                    }
                    moved = (2 * batch * hkv * length * d + 2 * batch * hq * d) * q.element_size()
                    rows.append({
                        "heads": name, "dtype": dtype_name, "batch": batch, "length": length,
                        "max_relative_error": error, "seconds": seconds,
                        "kernel_bytes_per_s": moved / seconds["kernel"],
                        "kernel_fraction_of_bandwidth": moved / seconds["kernel"] / bandwidth,
                    })
    return {"schema": "llmexport-kernels/1", "device": device, "read_bandwidth_bytes_per_s": bandwidth,
            "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"device {report['device']}, measured read bandwidth {report['read_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s",
             "", "| heads | dtype | batch | length | max rel. error | kernel us | reference us | SDPA us | kernel GB/s |"
             " fraction of bandwidth |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        s = r["seconds"]
        lines.append(f"| {r['heads']} | {r['dtype']} | {r['batch']} | {r['length']} | {r['max_relative_error']:.2g} | "
                     f"{s['kernel'] * 1e6:.1f} | {s['reference'] * 1e6:.1f} | {s['sdpa'] * 1e6:.1f} | "
                     f"{r['kernel_bytes_per_s'] / 1e9:.0f} | {r['kernel_fraction_of_bandwidth']:.2f} |")
    return "\n".join(lines) + "\n"
