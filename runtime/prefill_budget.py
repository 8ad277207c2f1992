"""How many prompt tokens an engine iteration prefills while other requests decode.

Every streaming request waits for the whole iteration, so a prefill inside it delays each of
their next tokens by the prefill's time. A fixed token budget cannot bound that delay: a
256-token chunk is 10 ms on a GPU and 0.5 s for a 0.5B model on two CPU cores (issue #13's
p99 inter-token latency at 8 clients was 9x the single-stream value with it). The budget is
therefore set by time: an iteration's prefill should take about `stall` times the current
decode step, so while prompts are admitted a streaming request waits about (1 + stall) decode
steps between tokens.

Both are measured on the engine's own calls. A prefill call of n tokens costs about
fixed + per_token * n (the weights are read once per call, then compute grows with n), so the
cost per token seen at the chunk sizes in use is what predicts the next chunk: the budget
n' = stall * decode / (cost per token at n) converges to the n whose call takes stall *
decode, or shrinks to `floor` when even a small call takes longer than that (the fixed cost
alone exceeds the target; `floor` tokens per iteration still make progress). `ceiling` (the
engine's prefill_chunk) caps it. Before any measurement the budget is the ceiling.
"""

from __future__ import annotations

from llmexport import LLMExportError


class PrefillBudget:
    SMOOTHING = 0.5  # weight of the newest measurement: the chunk size, and with it the cost, moves

    def __init__(self, ceiling: int, stall: float = 1.0, floor: int = 16):
        if stall <= 0:
            raise LLMExportError(f"prefill_stall={stall} must be > 0 (the prefill time per iteration, in decode steps)")
        self.ceiling, self.stall, self.floor = ceiling, stall, min(floor, ceiling)
        self.decode_s: float | None = None  # the latest decode step, smoothed
        self.token_s: float | None = None  # prefill seconds per token at the recent chunk sizes, smoothed

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.SMOOTHING * (new - old)

    def decoded(self, seconds: float) -> None:
        """One decode call took `seconds`."""
        self.decode_s = self._smooth(self.decode_s, seconds)

    def prefilled(self, tokens: int, seconds: float) -> None:
        """One prefill call over `tokens` positions (rows x padded width) took `seconds`."""
        if tokens > 0:
            self.token_s = self._smooth(self.token_s, seconds / tokens)

    def tokens(self) -> int:
        """The prompt tokens to prefill in this iteration (others are decoding)."""
        if self.decode_s is None or self.token_s is None:
            return self.ceiling
        return max(self.floor, min(self.ceiling, int(self.stall * self.decode_s / self.token_s)))
