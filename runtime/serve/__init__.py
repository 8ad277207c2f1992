"""`llmexport serve`: an OpenAI-compatible HTTP server on a bundle (optional extra `.[serve]`:
FastAPI and uvicorn). runtime/serve/app.py is the app; this module only runs it."""

from __future__ import annotations

import signal

from llmexport import LLMExportError

from .. import defaults

INSTALL_HINT = "llmexport serve needs FastAPI and uvicorn: pip install 'llmexport[serve]'"


def serve(bundle_dir: str, host: str = "127.0.0.1", port: int = defaults.SERVE_PORT, *, backend: str = "onnxruntime",
          device: str = "cpu", threads: int | None = None, max_queue: int | None = defaults.SERVE_MAX_QUEUE,
          prefill_chunk: int = defaults.PREFILL_CHUNK, prefill_stall: float = defaults.PREFILL_STALL,
          prompt_reuse: bool = defaults.PROMPT_REUSE, speculative: str | None = None,
          speculative_tokens: int = defaults.SPECULATIVE_TOKENS, draft: str | None = None,
          model_name: str | None = None,
          shutdown_timeout: float = 30.0) -> None:
    """Serve until SIGINT/SIGTERM: uvicorn stops accepting connections, waits up to
    `shutdown_timeout` seconds for in-flight requests to finish, then the engine cancels the rest."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError:
        raise LLMExportError(INSTALL_HINT) from None
    from ..session import Session

    with Session(bundle_dir, backend, device, threads=threads, max_queue=max_queue,
                 prefill_chunk=prefill_chunk, prefill_stall=prefill_stall, prompt_reuse=prompt_reuse,
                 speculative=speculative, speculative_tokens=speculative_tokens, draft=draft) as session:
        app = create_app(session, model_name)
        # uvicorn handles SIGINT/SIGTERM while it runs (graceful shutdown), then re-raises the signal
        # into the handler it found: a no-op here, so a requested stop exits 0 instead of dying of it.
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
