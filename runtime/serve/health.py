"""Whether a server's engine can still make progress: its thread is alive, and a busy engine
finishes iterations. Plain `serve`'s /health answers 503 when it cannot (a load balancer or a
Kubernetes probe then stops sending it work); a Ray Serve replica's check_health raises, and Ray
replaces the replica. Only the Ray check runs a probe (a 1-token request when the engine is idle):
/health may be polled often, and a probe costs a backend step. A probe is quiet: it does not
show in the metrics (no request, token or time to first token of a client).

Progress is sampled: each check notes the engine's iteration count and when it last changed, so a
busy engine that has finished no iteration for `stall_s` between two checks is hung. Plain
serve's /health and a Ray replica's check_health share one record (a /health call can make the
next check_health skip its probe or run one more: harmless)."""

from __future__ import annotations

import asyncio
import time

from llmexport import LLMExportError

from ..engine import Engine
from ..sampling import SamplingParams

STALL_S = 120.0  # a busy engine that has not finished an iteration for this long is hung


class EngineHealth:
    def __init__(self, engine: Engine, stall_s: float | None = None):
        self.engine, self.stall_s = engine, STALL_S if stall_s is None else stall_s
        # (iteration count, when a check first saw it, whether the engine was busy then)
        self._progress = (self._iterations(), time.monotonic(), False)

    def _iterations(self) -> int:
        stats = self.engine.stats
        return stats["decode_steps"] + stats["prefill_calls"] + stats["speculative_calls"]

    def problem(self) -> str | None:
        """Why the engine cannot serve, or None: its thread has stopped, or two checks stall_s or
        more apart both found it busy with the same iteration count (the clock starts at the first
        busy check after progress or idleness, so rare checks cannot mistake a new request's
        first iteration for a stall)."""
        if not self.engine.alive:
            return "the engine thread is not running"
        now, iterations, busy = time.monotonic(), self._iterations(), self.engine.busy
        count, since, was_busy = self._progress
        if iterations != count or not busy or not was_busy:
            self._progress = (iterations, now, busy)
            return None
        if now - since > self.stall_s:
            return f"the engine has not finished an iteration in {now - since:.0f} s"
        return None

    async def check(self, probe_timeout_s: float) -> None:
        """problem(), raised as LLMExportError; and when the engine is idle and has finished no
        iteration since the last check, a 1-token probe request must finish within
        probe_timeout_s (a backend step is still possible)."""
        seen = self._progress[0]
        problem = self.problem()
        if problem is not None:
            raise LLMExportError(problem)
        if self.engine.busy or self._progress[0] != seen:  # working, or worked since the last check
            return
        probe = self.engine.submit_async([0], SamplingParams(max_new_tokens=1, ignore_eos=True), quiet=True)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(probe.next_event(), probe_timeout_s)
                except asyncio.TimeoutError:
                    raise LLMExportError(f"a 1-token probe request did not finish in {probe_timeout_s:g} s") from None
                if event.finish_reason == "error":
                    raise LLMExportError(f"a probe step failed: {probe.error}")
                if event.finish_reason:
                    break
        finally:
            probe.cancel()
        self._progress = (self._iterations(), time.monotonic(), self.engine.busy)
