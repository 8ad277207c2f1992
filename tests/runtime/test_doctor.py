"""llmexport doctor: one line per check, JSON too, and --device cuda fails where a GPU run would."""

from __future__ import annotations

import json

from llmexport.runtime.doctor import _package, failures, run_checks
from tests.conftest import run_cli

NAMES = {"python", "llmexport", "onnxruntime", "onnxruntime CUDA provider", "CUDA/cuDNN onnxruntime was built for",
         "GPU", "torch", "tensorrt", "triton", "onnxruntime-genai"}


def test_every_check_reports_a_status_and_why():
    checks = run_checks()
    assert {c.name for c in checks} == NAMES
    assert all(c.status in ("ok", "missing", "fail") and c.detail for c in checks)
    assert not failures(checks, "cpu")  # nothing here is required for the CPU


def test_a_missing_package_is_missing_with_the_reason():
    check = _package("no-such-distribution", "no_such_module", "not installed: x needs it")
    assert (check.status, check.detail) == ("missing", "not installed: x needs it")


def test_cli_table_json_and_the_cuda_verdict():
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(NAMES) and all(line.split()[0] in {n.split()[0] for n in NAMES} for line in lines)
    report = json.loads(run_cli("doctor", "--json").stdout)
    assert report["ok"] and {c["name"] for c in report["checks"]} == NAMES
    gpu_ready = not failures(run_checks(), "cuda")
    result = run_cli("doctor", "--device", "cuda")
    assert result.returncode == (0 if gpu_ready else 1)
    assert gpu_ready or "--device cuda: not ready (" in result.stdout
    assert run_cli("doctor", "--device", "tpu").returncode == 1


def test_the_gpu_line_parses_nvidia_smi(tmp_path, monkeypatch):
    """The GPU check's parsing, run here against a stand-in nvidia-smi (no GPU on CI)."""
    from llmexport.runtime.doctor import _gpu

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 560.35.03'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    check = _gpu()
    assert (check.status, check.detail) == ("ok", "NVIDIA H100 80GB HBM3, 81559 MiB, driver 560.35.03")
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no devices' >&2; exit 9\n")
    assert _gpu().status == "fail" and "no devices" in _gpu().detail


def test_the_torch_build_is_read_from_its_version(monkeypatch):
    from llmexport.runtime import doctor

    for version, build in (("2.13.0+cpu", "CPU build"), ("2.13.0+cu128", "CUDA 12.8 build"), ("2.13.0", "build unknown")):
        monkeypatch.setattr(doctor, "_version", lambda name, v=version: v)
        assert doctor._torch().detail == f"{version} ({build})"
