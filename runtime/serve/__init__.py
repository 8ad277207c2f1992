"""`llmexport serve`: an OpenAI-compatible HTTP server on a bundle (optional extra `.[serve]`:
FastAPI and uvicorn). runtime/serve/app.py is the app; this module only runs it."""

from __future__ import annotations

import signal
from contextlib import contextmanager

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
        with stop_signals(lambda *_: None):
            uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)


@contextmanager
def stop_signals(handler):
    """SIGINT and SIGTERM go to `handler` inside the block; the previous handlers come back after."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before)


RAY_HINT = "llmexport serve --ray needs Ray Serve: pip install 'llmexport[ray]'"


def serve_on_ray(bundle_dir: str, host: str = "127.0.0.1", port: int = defaults.SERVE_PORT, *,
                 replicas: int | None = None, min_replicas: int | None = None, max_replicas: int | None = None,
                 replica_cpus: float = 1.0, ray_address: str | None = None, model_name: str | None = None,
                 ready=None, **session) -> None:
    """`llmexport serve --ray`: the same app on Ray Serve replicas (runtime/serve/ray_app.py).
    The bundle's files are checked against their sha256 here first when this machine can read
    it (each replica checks again where it starts); `session`: Session keyword arguments."""
    from ..bundle import Bundle
    from .ray_config import RayConfig

    config = RayConfig(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                       replica_cpus=replica_cpus, model_name=model_name, session=session)
    Bundle.open(bundle_dir, check_integrity=True).release()  # a damaged bundle: one line now, not a failed deploy
    try:
        import fastapi  # noqa: F401

        from .ray_app import serve_ray
    except ImportError as e:
        raise LLMExportError(RAY_HINT if "ray" in str(e) else INSTALL_HINT) from None
    serve_ray(bundle_dir, config, host, port, ray_address, ready)
