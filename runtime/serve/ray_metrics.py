"""One replica's engine metrics through Ray's Prometheus export (`ray.serve.metrics`, which tags
every sample with the deployment, the application and the replica).

The engine thread only appends to lists (a notice runs under the engine's lock); `flush()`,
called from the replica's event loop (a background task and every health check), records them.
Names as runtime/serve/metrics.py's, with Ray's `ray_` prefix in the export:
ray_llmexport_queue_depth, ray_llmexport_running_requests, ray_llmexport_generated_tokens_total,
ray_llmexport_requests_total, ray_llmexport_time_to_first_token_seconds and
ray_llmexport_inter_token_latency_seconds.
"""

from __future__ import annotations

import asyncio
import threading

from ray.serve import metrics as ray_metrics

from ..engine import Engine, Request
from .metrics import ITL_BUCKETS, TTFT_BUCKETS, itl_s, ttft_s

FLUSH_S = 1.0


class RayMetrics:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._ttft: list[float] = []
        self._itl: list[float] = []
        self._tokens = 0
        self._finished: list[str] = []
        self.queue = ray_metrics.Gauge("llmexport_queue_depth", description="Requests waiting for a KV row.")
        self.running = ray_metrics.Gauge("llmexport_running_requests",
                                         description="Requests holding a KV row (prefilling or decoding).")
        self.tokens = ray_metrics.Counter("llmexport_generated_tokens_total", description="Tokens sampled.")
        self.requests = ray_metrics.Counter("llmexport_requests_total", description="Finished requests.",
                                            tag_keys=("finish_reason",))
        self.ttft = ray_metrics.Histogram("llmexport_time_to_first_token_seconds", boundaries=list(TTFT_BUCKETS),
                                          description="From submission to the first sampled token.")
        self.itl = ray_metrics.Histogram("llmexport_inter_token_latency_seconds", boundaries=list(ITL_BUCKETS),
                                         description="Between consecutive tokens of one request.")
        engine.listeners.append(self._notice)
        self._task = None

    def _notice(self, kind: str, request: Request) -> None:
        with self._lock:
            if kind == "first_token":
                self._ttft.append(ttft_s(request))
                self._tokens += 1
            elif kind == "token":
                self._itl.append(itl_s(request))
                self._tokens += 1
            else:
                self._finished.append(str(request.finish_reason))

    def flush(self) -> None:
        with self._lock:
            ttft, itl, tokens, finished = self._ttft, self._itl, self._tokens, self._finished
            self._ttft, self._itl, self._tokens, self._finished = [], [], 0, []
        for value in ttft:
            self.ttft.observe(value)
        for value in itl:
            self.itl.observe(value)
        if tokens:
            self.tokens.inc(tokens)
        for reason in finished:
            self.requests.inc(1, tags={"finish_reason": reason})
        self.queue.set(len(self.engine.waiting))
        self.running.set(len(self.engine.running))

    def start(self) -> None:
        """Flush every FLUSH_S on the running event loop (the replica's)."""
        async def loop():
            while True:
                await asyncio.sleep(FLUSH_S)
                self.flush()

        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(loop())
