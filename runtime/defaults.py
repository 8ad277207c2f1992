"""The runtime's defaults, in one place: the engine, Session, `serve`, the CLI and the benchmarks
take them from here."""

PREFILL_CHUNK = 256  # at most this many prompt tokens prefilled per iteration while others decode
PREFILL_STALL = 1.0  # ... and about as many as take this many decode steps' time (prefill_budget.py)
PROMPT_REUSE = True  # a finished request's row keeps its tokens for the next prompt that starts with them
SERVE_MAX_QUEUE = 64  # requests a server lets wait for a row before answering 429
SERVE_PORT = 8000
TOP_LOGPROBS_MAX = 20  # OpenAI's limit on top_logprobs (completions' logprobs: 5)
SPECULATIVE_TOKENS = 5  # proposals a speculative step verifies (runtime/speculation.py)
