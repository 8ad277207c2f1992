"""Prometheus text-format metrics of one engine (no client library: a few counters, gauges and
two histograms are a page of code)."""

from __future__ import annotations

import threading
from collections import Counter

from ..engine import Engine, Request

# seconds; time to first token spans prefill of long prompts, inter-token one decode step
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum, self.count = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


def _labelled(line: str, labels: str) -> str:
    """A sample line with `labels` (already formatted: 'k="v",...') added to its own."""
    name, value = line.rsplit(" ", 1)
    if name.endswith("}"):
        return f"{name[:-1]},{labels}}} {value}"
    return f"{name}{{{labels}}} {value}"


def ttft_s(request: Request) -> float:
    """Time to first token: from submission to the first sampled token (the first_token notice)."""
    return request.token_times[0] - request.submitted_at


def itl_s(request: Request) -> float:
    """Inter-token latency: since the request's previous token (a token notice)."""
    return request.token_times[-1] - request.token_times[-2]


class Metrics:
    """Listens to the engine's token and finish notices; `render()` is the /metrics page.
    `labels` go on every sample (a Ray Serve replica sets {"replica": its id})."""

    def __init__(self, engine: Engine, labels: dict[str, str] | None = None):
        self.engine = engine
        self.labels = ",".join(f'{k}="{v}"' for k, v in (labels or {}).items())
        self._lock = threading.Lock()
        self.ttft, self.itl = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS)
        self.finished: Counter[str] = Counter()
        self.rejected = 0
        engine.listeners.append(self._notice)

    def _notice(self, kind: str, request: Request) -> None:
        with self._lock:
            if kind == "first_token":
                self.ttft.observe(ttft_s(request))
            elif kind == "token":
                self.itl.observe(itl_s(request))
            else:
                self.finished[request.finish_reason] += 1

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def render(self) -> str:
        engine = self.engine
        with self._lock:
            lines = [
                "# HELP llmexport_queue_depth Requests waiting for a KV row.",
                "# TYPE llmexport_queue_depth gauge", f"llmexport_queue_depth {len(engine.waiting)}",
                "# HELP llmexport_running_requests Requests holding a KV row (prefilling or decoding).",
                "# TYPE llmexport_running_requests gauge", f"llmexport_running_requests {len(engine.running)}",
                "# HELP llmexport_kv_rows Rows of the KV buffers.",
                "# TYPE llmexport_kv_rows gauge", f"llmexport_kv_rows {engine.rows.rows}",
                "# HELP llmexport_generated_tokens_total Tokens sampled.",
                "# TYPE llmexport_generated_tokens_total counter",
                f"llmexport_generated_tokens_total {engine.stats['generated_tokens']}",
                "# HELP llmexport_prompt_tokens_total Prompt tokens of admitted requests, by where their cache "
                "came from.",
                "# TYPE llmexport_prompt_tokens_total counter",
                f'llmexport_prompt_tokens_total{{source="reused"}} {engine.stats["reused_prompt_tokens"]}',
                f'llmexport_prompt_tokens_total{{source="computed"}} '
                f'{engine.stats["prompt_tokens"] - engine.stats["reused_prompt_tokens"]}',
                "# HELP llmexport_kv_kept_tokens Tokens cached in free rows, ready for prompt reuse.",
                "# TYPE llmexport_kv_kept_tokens gauge", f"llmexport_kv_kept_tokens {engine.rows.kept_tokens()}",
                "# HELP llmexport_speculative_tokens_total Tokens proposed by speculative decoding, and accepted.",
                "# TYPE llmexport_speculative_tokens_total counter",
                f'llmexport_speculative_tokens_total{{kind="proposed"}} {engine.stats["proposed_tokens"]}',
                f'llmexport_speculative_tokens_total{{kind="accepted"}} {engine.stats["accepted_tokens"]}',
                "# HELP llmexport_speculative_calls_total Verification calls (one row's proposals each).",
                "# TYPE llmexport_speculative_calls_total counter",
                f"llmexport_speculative_calls_total {engine.stats['speculative_calls']}",
                "# HELP llmexport_decode_steps_total Decode steps run (one for every decoding request).",
                "# TYPE llmexport_decode_steps_total counter",
                f"llmexport_decode_steps_total {engine.stats['decode_steps']}",
                "# HELP llmexport_requests_total Finished requests by finish reason.",
                "# TYPE llmexport_requests_total counter",
                *(f'llmexport_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.finished.items())),
                "# HELP llmexport_rejected_requests_total Requests refused because the queue was full.",
                "# TYPE llmexport_rejected_requests_total counter",
                f"llmexport_rejected_requests_total {self.rejected}",
                "# HELP llmexport_time_to_first_token_seconds From submission to the first sampled token.",
                "# TYPE llmexport_time_to_first_token_seconds histogram",
                *self.ttft.lines("llmexport_time_to_first_token_seconds"),
                "# HELP llmexport_inter_token_latency_seconds Between consecutive tokens of one request.",
                "# TYPE llmexport_inter_token_latency_seconds histogram",
                *self.itl.lines("llmexport_inter_token_latency_seconds"),
            ]
        if self.labels:
            lines = [line if line.startswith("#") else _labelled(line, self.labels) for line in lines]
        return "\n".join(lines) + "\n"
