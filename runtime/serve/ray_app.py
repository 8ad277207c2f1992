"""`llmexport serve --ray`: the engine on Ray Serve (optional extra `.[ray]`; imported only then).

Ray owns placement, replica restarts, health-check scheduling, autoscaling and the HTTP proxy;
each replica owns one Session (bundle, backend, engine, KV rows) and serves the same FastAPI app
as `llmexport serve` (runtime/serve/app.py's create_app over its session: one app, not a copy).
runtime/serve/ray_router.py routes a conversation back to the replica that holds its KV rows;
runtime/serve/ray_proxy.py runs in Ray's HTTP proxy (the affinity key, OpenAI error JSON when a
replica dies); runtime/serve/ray_metrics.py exports every replica's engine metrics through Ray.

`build(args)` is the import path a Serve config (and the KubeRay manifest) names; `deploy` runs
the application on a Ray instance this process is connected to; `serve_ray` is the CLI's whole
lifetime (start or join Ray, deploy, wait for SIGINT/SIGTERM, tear down what it started).
"""

from __future__ import annotations

import os
import threading

from ray import serve

from llmexport import LLMExportError

from .. import defaults
from . import stop_signals
from .health import EngineHealth
from .ray_config import (APP_NAME, DEPLOYMENT, HEALTH_TIMEOUT_S, PROXY_CALLBACK, PROXY_CALLBACK_ENV, RayConfig,
                         deployment_options)


@serve.deployment
@serve.ingress()
class LLMReplica:
    """One replica: a Session over the bundle (integrity checked: every file's sha256) with as
    many threads as CPUs Ray assigned, and the FastAPI app over it."""

    def __init__(self, bundle_dir: str, config: dict):
        import ray

        from ..session import Session
        from .ray_metrics import RayMetrics

        self.config = RayConfig(**config)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.threads = max(1, int(round(cpus)))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.session = Session(bundle_dir, threads=self.threads, check_integrity=True, **self.config.session)
        self.metrics = RayMetrics(self.session.engine)
        self.health = EngineHealth(self.session.engine)

    def __serve_build_asgi_app__(self):
        from .app import create_app

        self.metrics.start()  # on the replica's event loop, where this runs
        return create_app(self.session, self.config.model_name, labels={"replica": self.replica}, health=self.health)

    async def check_health(self) -> None:
        """Ray calls this every HEALTH_PERIOD_S; raising marks the replica unhealthy (Ray replaces
        it): runtime/serve/health.py's check (the engine thread alive, a busy engine finishing
        iterations, an idle one answering a 1-token probe)."""
        self.metrics.start()
        self.metrics.flush()
        await self.health.check(probe_timeout_s=HEALTH_TIMEOUT_S - 5)

    def __del__(self):
        session = getattr(self, "session", None)
        if session is not None:
            session.close()


def application(bundle_dir: str, config: RayConfig):
    """The Ray Serve application: LLMReplica over `bundle_dir` (a path every node can read)."""
    from ..bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    max_batch = bundle.max_batch
    bundle.release()
    return LLMReplica.options(**deployment_options(config, max_batch)).bind(bundle_dir, config.to_dict())


def build(args: dict):
    """The application builder a Serve config names (`import_path:
    llmexport.runtime.serve.ray_app:build`, args {"bundle": DIR, ...RayConfig fields})."""
    args = dict(args)
    bundle_dir = args.pop("bundle")
    return application(str(bundle_dir), RayConfig(**args))


def deploy(bundle_dir: str, config: RayConfig, host: str = "127.0.0.1", port: int = defaults.SERVE_PORT,
           name: str = APP_NAME, route_prefix: str = "/") -> None:
    """Run the application on the Ray instance this process is connected to, and return once
    every replica is healthy. A replica that fails to start (a damaged bundle, a bundle path a
    node cannot read) fails the deployment: LLMExportError with the replica's own message."""
    quiet = {"log_level": "WARNING"}  # Ray's INFO lines; each replica still prints the app's line per request
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    try:
        serve.run(application(bundle_dir, config), name=name, route_prefix=route_prefix, blocking=False,
                  logging_config={**quiet, "enable_access_log": False})
    except RuntimeError as e:
        app = serve.status().applications.get(name)
        details = [d.message for d in app.deployments.values() if d.message] if app is not None else []
        raise LLMExportError(f"the Ray Serve deployment failed: {_cause(chr(10).join(details) or str(e))}") from None


def _cause(message: str) -> str:
    """The replica's own error line out of Ray's deployment-failure text (its traceback)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if "LLMExportError:" in line:
            return line.split("LLMExportError:", 1)[1].strip()
    return lines[-1] if lines else message


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise LLMExportError(f"cannot reach the Ray cluster at {address} ({e}); start its head with "
                             "`ray start --head`, or pass --ray-address auto on one of its nodes") from None


def serve_ray(bundle_dir: str, config: RayConfig, host: str = "127.0.0.1", port: int = defaults.SERVE_PORT,
              ray_address: str | None = None, ready=None) -> None:
    """Serve until SIGINT/SIGTERM. Without `ray_address` a local Ray instance is started (and
    stopped at the end); with one ("auto" or HOST:PORT) this joins that cluster and removes only
    its own application at the end. `ready(url)` is called once every replica is healthy."""
    import ray

    started = ray_address is None
    if ray_address and ":" in ray_address and "://" not in ray_address:
        _reachable(ray_address)  # Ray itself retries an unreachable GCS for minutes
    if started:  # Ray's proxy and workers inherit this process's environment
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    try:
        # log_to_driver: each replica's line per request shows on this process's stderr, as with plain serve
        ray.init(address=ray_address or "local", include_dashboard=False, logging_level="WARNING",
                 log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise LLMExportError(f"cannot join the Ray cluster at {ray_address!r}: {e}; start one with "
                             "`ray start --head` or leave out --ray-address") from None
    stop = threading.Event()
    try:
        with stop_signals(lambda *_: stop.set()):
            deploy(bundle_dir, config, host, port)
            if ready is not None:
                ready(f"http://{host}:{port}/v1")
            stop.wait()
    finally:
        try:
            if started:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
