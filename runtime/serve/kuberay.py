"""A KubeRay `RayService` manifest for a bundle (`llmexport serve --ray --emit-kuberay FILE`).

The manifest's serveConfigV2 is a Ray Serve config whose one application is
runtime/serve/ray_app.py's `build` over the bundle, as `llmexport serve --ray` deploys it; the
RayCluster under it has a head pod (which runs no replica: num-cpus 0) and a worker group with
one pod per replica. Every pod mounts the bundle from a PersistentVolumeClaim and sets Ray's
proxy hook to runtime/serve/ray_proxy.py. The image must have llmexport[ray] installed (the
default names Ray's image of the installed version: install llmexport into it, or pass yours).
Checked here by parsing against the RayService fields it uses (tests/runtime/test_kuberay.py);
UNTESTED on a Kubernetes cluster (none here).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from .. import defaults
from .ray_config import APP_NAME, PROXY_CALLBACK, PROXY_CALLBACK_ENV, RayConfig

MOUNT = "/bundles"
CLAIM = "llmexport-bundles"


def _ray_version() -> str:
    try:
        from importlib.metadata import version

        return version("ray")
    except Exception:  # noqa: BLE001  (ray not installed here: the version the extra was tested with)
        return "2.60.0"


def rayservice(bundle_dir: str, *, name: str | None = None, port: int = defaults.SERVE_PORT,
               replicas: int | None = None, min_replicas: int | None = None, max_replicas: int | None = None,
               replica_cpus: float = 1.0, model_name: str | None = None, session: dict | None = None,
               image: str | None = None, claim: str = CLAIM, memory: str = "8Gi") -> dict:
    """The RayService object (a dict). The bundle is read at MOUNT/<its directory name> on every
    pod, from the PersistentVolumeClaim `claim` (copy the bundle there, checksums and all)."""
    RayConfig(replicas, min_replicas, max_replicas, replica_cpus, model_name, session or {})  # checks the flags
    bundle = PurePosixPath(MOUNT) / Path(bundle_dir).resolve().name
    version = _ray_version()
    image = image or f"rayproject/ray:{version}-py311-cpu"
    name = name or "llmexport-" + "".join(c if c.isalnum() else "-" for c in bundle.name.lower()).strip("-")
    args = {"bundle": str(bundle), "replica_cpus": replica_cpus, "model_name": model_name,
            "session": {k: v for k, v in (session or {}).items() if v is not None}}
    if min_replicas is not None:
        args |= {"min_replicas": min_replicas, "max_replicas": max_replicas}
        low, high = max(min_replicas, 1), max_replicas
    else:
        args["replicas"] = replicas or 1
        low = high = replicas or 1
    serve_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": port},
        "applications": [{"name": APP_NAME, "route_prefix": "/",
                          "import_path": "llmexport.runtime.serve.ray_app:build", "args": args}],
    }
    cpus = max(1, int(round(replica_cpus)))

    def pod(container: str, cpu: int) -> dict:
        return {"spec": {
            "containers": [{
                "name": container, "image": image,
                "env": [{"name": PROXY_CALLBACK_ENV, "value": PROXY_CALLBACK}],
                # Ray Serve runs an HTTP proxy on every node with a replica
                "ports": ([{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                           {"containerPort": 10001, "name": "client"}] if container == "ray-head" else [])
                + [{"containerPort": port, "name": "serve"}],
                "resources": {"requests": {"cpu": str(cpu), "memory": memory},
                              "limits": {"cpu": str(cpu), "memory": memory}},
                "volumeMounts": [{"name": "bundles", "mountPath": MOUNT, "readOnly": True}],
            }],
            "volumes": [{"name": "bundles", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}],
        }}

    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": _yaml(serve_config),
            "rayClusterConfig": {
                "rayVersion": version,
                "enableInTreeAutoscaling": min_replicas is not None,
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                                  "template": pod("ray-head", 1)},
                "workerGroupSpecs": [{
                    "groupName": "replicas", "replicas": low, "minReplicas": low, "maxReplicas": high,
                    "rayStartParams": {"num-cpus": str(cpus)},
                    "template": pod("ray-worker", cpus),
                }],
            },
        },
    }


def _yaml(data) -> str:
    """YAML when PyYAML is there (Ray depends on it), else JSON (which is YAML too)."""
    try:
        import yaml

        return yaml.safe_dump(data, sort_keys=False)
    except ImportError:
        return json.dumps(data, indent=2) + "\n"


def write_rayservice(path: Path, bundle_dir: str, **kwargs) -> Path:
    from ..bundle import Bundle

    Bundle.open(bundle_dir)  # a path that is not a bundle: say so now, not on the cluster
    manifest = rayservice(bundle_dir, **kwargs)
    header = ("# KubeRay RayService written by `llmexport serve --ray --emit-kuberay` (untested on a cluster).\n"
              f"# Copy the bundle to the PersistentVolumeClaim {kwargs.get('claim', CLAIM)!r} as "
              f"{MOUNT}/{Path(bundle_dir).resolve().name}, use an image with llmexport[ray] installed, then\n"
              "# kubectl apply -f THIS_FILE\n")
    Path(path).write_text(header + _yaml(manifest))
    return Path(path)
