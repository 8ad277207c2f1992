"""`llmexport serve --ray --emit-kuberay FILE`: the RayService manifest parses, every field it sets
has the type KubeRay's CRD gives it (ray-operator/config/crd/bases/ray.io_rayservices.yaml, v1:
the subset below), and its serveConfigV2 is a valid Ray Serve config whose application builds
with the bundle. No Kubernetes here: untested on a cluster."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import run_cli

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the ray extra")

# The RayService v1 fields the manifest uses and their CRD types ("map": string -> string).
STR, INT, BOOL, MAP = "string", "integer", "boolean", "map"
FIELDS = {
    "apiVersion": STR, "kind": STR, "metadata.name": STR,
    "spec.serveConfigV2": STR,
    "spec.rayClusterConfig.rayVersion": STR,
    "spec.rayClusterConfig.enableInTreeAutoscaling": BOOL,
    "spec.rayClusterConfig.headGroupSpec.rayStartParams": MAP,
    "spec.rayClusterConfig.workerGroupSpecs[].groupName": STR,
    "spec.rayClusterConfig.workerGroupSpecs[].replicas": INT,
    "spec.rayClusterConfig.workerGroupSpecs[].minReplicas": INT,
    "spec.rayClusterConfig.workerGroupSpecs[].maxReplicas": INT,
    "spec.rayClusterConfig.workerGroupSpecs[].rayStartParams": MAP,
}
POD_FIELDS = {  # under headGroupSpec.template and workerGroupSpecs[].template (a core/v1 PodTemplateSpec)
    "spec.containers[].name": STR, "spec.containers[].image": STR,
    "spec.containers[].env[].name": STR, "spec.containers[].env[].value": STR,
    "spec.containers[].ports[].containerPort": INT, "spec.containers[].ports[].name": STR,
    "spec.containers[].resources.requests": MAP, "spec.containers[].resources.limits": MAP,
    "spec.containers[].volumeMounts[].name": STR, "spec.containers[].volumeMounts[].mountPath": STR,
    "spec.containers[].volumeMounts[].readOnly": BOOL,
    "spec.volumes[].name": STR, "spec.volumes[].persistentVolumeClaim.claimName": STR,
}


def _values(node, path: str) -> list:
    """Every value at a dotted path ("a.b[].c": each element of list b)."""
    values = [node]
    for part in path.split("."):
        many = part.endswith("[]")
        part = part.removesuffix("[]")
        values = [v[part] for v in values if isinstance(v, dict) and part in v]
        if many:
            values = [item for v in values for item in v]
    return values


def _check(node, fields: dict) -> None:
    for path, kind in fields.items():
        values = _values(node, path)
        assert values, f"{path} is missing"
        for value in values:
            if kind == MAP:
                assert isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in value.items()), f"{path}: {value!r}"
            else:
                python = {STR: str, INT: int, BOOL: bool}[kind]
                assert isinstance(value, python) and (kind != INT or not isinstance(value, bool)), \
                    f"{path} = {value!r} is not a {kind}"


@pytest.mark.parametrize("scale", [["--replicas", "2"], ["--min-replicas", "1", "--max-replicas", "4"]])
def test_the_manifest_has_the_rayservice_fields_and_a_valid_serve_config(bundle_factory, tmp_path, scale):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    out = tmp_path / "rayservice.yaml"
    done = run_cli("serve", "--bundle", str(bundle_dir), "--ray", "--emit-kuberay", str(out), *scale, "--port", "8000")
    assert done.returncode == 0, done.stderr
    manifest = yaml.safe_load(out.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    _check(manifest, FIELDS)
    cluster = manifest["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        _check(template, POD_FIELDS)
    group = cluster["workerGroupSpecs"][0]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    app = config["applications"][0]
    assert app["import_path"] == "llmexport.runtime.serve.ray_app:build"
    assert app["args"]["bundle"] == f"/bundles/{bundle_dir.name}"
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(config)  # Ray's own validation of a Serve config
    assert ("min_replicas" in app["args"]) == ("--min-replicas" in scale)
    assert cluster["enableInTreeAutoscaling"] == ("--min-replicas" in scale)


def test_the_builder_the_manifest_names_builds_the_application(bundle_factory):
    pytest.importorskip("ray.serve")
    from llmexport.runtime.serve import ray_app

    bundle_dir, _ = bundle_factory("llama3", "ort")
    app = ray_app.build({"bundle": str(bundle_dir), "min_replicas": 1, "max_replicas": 3, "replica_cpus": 2,
                         "session": {"max_queue": 8}})
    deployment = app._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 3)
    assert scaling.target_ongoing_requests == 4  # the bundle's max_batch
    assert deployment.max_ongoing_requests == 4 + 8 + 1  # rows + queue + the one that gets 429
    assert deployment.ray_actor_options["num_cpus"] == 2


def test_ray_flags_without_ray_conflicting_scales_and_an_unreachable_cluster_are_one_line_errors(bundle_factory, tmp_path):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    done = run_cli("serve", "--bundle", str(bundle_dir), "--replicas", "2")
    assert done.returncode == 1 and "--replicas work with --ray" in done.stderr
    done = run_cli("serve", "--bundle", str(bundle_dir), "--ray", "--emit-kuberay", str(tmp_path / "x.yaml"),
                   "--replicas", "2", "--min-replicas", "1", "--max-replicas", "2")
    assert done.returncode == 1 and "give one or the other" in done.stderr
    if importlib.util.find_spec("ray") is not None:  # an address nothing listens on: at once, not Ray's retries
        done = run_cli("serve", "--bundle", str(bundle_dir), "--ray", "--ray-address", "127.0.0.1:1", timeout=60)
        assert done.returncode == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in done.stderr


def test_serve_ray_on_a_damaged_bundle_is_a_one_line_error_before_ray_starts(bundle_factory, tmp_path):
    import shutil

    bundle_dir, _ = bundle_factory("llama3", "ort")
    damaged = shutil.copytree(bundle_dir, tmp_path / "damaged")
    weights = damaged / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    done = run_cli("serve", "--bundle", str(damaged), "--ray", "--replicas", "1")
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "sha256 mismatch in weights.bin" in lines[0]
