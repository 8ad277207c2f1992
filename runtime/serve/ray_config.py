"""What `llmexport serve --ray` deploys, without importing Ray (the CLI checks flags and writes the
KubeRay manifest with it): RayConfig and the Ray Serve deployment options it maps to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from llmexport import LLMExportError

from .. import defaults

APP_NAME = "llmexport"
DEPLOYMENT = "LLMReplica"
ROUTER = "llmexport.runtime.serve.ray_router.ConversationRouter"
# Ray Serve's hook for ASGI middleware in its HTTP proxy (runtime/serve/ray_proxy.py)
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "llmexport.runtime.serve.ray_proxy.middlewares"
HEALTH_PERIOD_S = 10.0
HEALTH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RayConfig:
    """What `llmexport serve --ray` deploys. replicas: a fixed count; or min_replicas..max_replicas
    with autoscaling on ongoing requests per replica (target: the bundle's max_batch).
    session: Session keyword arguments (backend, device, max_queue, prefill_chunk, ...); threads
    come from the CPUs Ray gives each replica (replica_cpus)."""
    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    replica_cpus: float = 1.0
    model_name: str | None = None
    session: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise LLMExportError("--replicas fixes the replica count; --min-replicas/--max-replicas autoscale: "
                                 "give one or the other")
        if self.replicas is not None and self.replicas < 1:
            raise LLMExportError(f"--replicas {self.replicas} must be at least 1")
        low, high = self.min_replicas, self.max_replicas
        if (low is None) != (high is None):
            raise LLMExportError("autoscaling needs both --min-replicas and --max-replicas")
        if low is not None and not 0 <= low <= high:
            raise LLMExportError(f"--min-replicas {low} --max-replicas {high}: need 0 <= min <= max and max >= 1")
        if high is not None and high < 1:
            raise LLMExportError(f"--max-replicas {high} must be at least 1")
        if self.replica_cpus <= 0:
            raise LLMExportError(f"--replica-cpus {self.replica_cpus} must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


def deployment_options(config: RayConfig, max_batch: int) -> dict:
    """serve.deployment options. A replica takes up to its KV rows plus the engine's queue plus
    one: the one past a full engine reaches it and gets 429 at once instead of waiting in Ray's
    router. Autoscaling aims at max_batch ongoing requests per replica: a replica is scaled out
    when its decode batch is full, before requests queue."""
    max_queue = config.session.get("max_queue", defaults.SERVE_MAX_QUEUE)
    options = dict(
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": config.replica_cpus},
        max_ongoing_requests=max_batch + (max_queue if max_queue is not None else 4 * max_batch) + 1,
        health_check_period_s=HEALTH_PERIOD_S,
        health_check_timeout_s=HEALTH_TIMEOUT_S,
        # a replica that cannot open its bundle fails the deployment instead of restarting in a loop
        max_constructor_retry_count=1,
        graceful_shutdown_timeout_s=30,
        request_router_config={"request_router_class": ROUTER},
    )
    if config.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
            "initial_replicas": max(config.min_replicas, 1), "target_ongoing_requests": max_batch,
            "upscale_delay_s": 10, "downscale_delay_s": 120}
    else:
        options["num_replicas"] = config.replicas or 1
    return options
