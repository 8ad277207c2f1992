"""`llmexport doctor`: what this machine can run, one check per line (ok / missing / fail).

Nothing here is imported at module level beyond the standard library: each check imports
(or locates) its library itself, so a missing or broken one is reported, not raised.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "missing" (not installed / not present) or "fail" (present but broken)
    detail: str
    needed_for: str  # "" (informational) or "cuda": fails `doctor --device cuda`

    def to_dict(self) -> dict:
        return asdict(self)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package(name: str, module: str, why_missing: str, needed_for: str = "") -> Check:
    version = _version(name)
    if version is None or importlib.util.find_spec(module) is None:
        return Check(name, "missing", why_missing, needed_for)
    return Check(name, "ok", version, needed_for)


def _onnxruntime() -> list[Check]:
    try:
        import onnxruntime as ort
    except Exception as e:  # ImportError, or a broken shared library
        return [Check("onnxruntime", "missing" if isinstance(e, ImportError) else "fail",
                      f"{type(e).__name__}: {e}; pip install onnxruntime (CPU) or onnxruntime-gpu", "")]
    providers = ort.get_available_providers()
    checks = [Check("onnxruntime", "ok", f"{ort.__version__}, providers {', '.join(providers)}", "")]
    if "CUDAExecutionProvider" in providers:
        checks.append(Check("onnxruntime CUDA provider", "ok", "CUDAExecutionProvider available", "cuda"))
    else:
        checks.append(Check("onnxruntime CUDA provider", "missing",
                            "this onnxruntime is a CPU build; pip install onnxruntime-gpu (uninstall onnxruntime "
                            "first: the two packages share a module)", "cuda"))
    info = getattr(ort.capi, "build_and_package_info", None)
    cuda, cudnn = getattr(info, "cuda_version", None), getattr(info, "cudnn_version", None)
    if cuda or cudnn:
        checks.append(Check("CUDA/cuDNN onnxruntime was built for", "ok", f"CUDA {cuda or '?'}, cuDNN {cudnn or '?'}",
                            "cuda"))
    else:
        checks.append(Check("CUDA/cuDNN onnxruntime was built for", "missing",
                            "not recorded: not a CUDA build of onnxruntime", "cuda"))
    return checks


def _gpu() -> Check:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Check("GPU", "missing", "no nvidia-smi on PATH: no NVIDIA driver or GPU visible", "cuda")
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("GPU", "fail", f"nvidia-smi did not answer: {e}", "cuda")
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode or not lines:
        return Check("GPU", "fail", f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[:200]}", "cuda")
    gpus = [(line.split(", ") + ["?", "?"])[:3] for line in lines]  # name, memory.total, driver_version
    return Check("GPU", "ok", "; ".join(f"{name}, {memory}, driver {driver}" for name, memory, driver in gpus), "cuda")


def _torch() -> Check:
    """From the installed distribution's version, without importing torch (the runtime stays
    torch-free): wheels carry their build in the local version, `+cpu` or `+cu128`."""
    version = _version("torch")
    if version is None or importlib.util.find_spec("torch") is None:
        return Check("torch", "missing", "not installed: the torch backend and `llmexport onnx` need it", "")
    local = version.partition("+")[2]
    digits = local[2:] if local.startswith("cu") and local[2:].isdigit() and len(local) > 3 else ""
    build = "CPU build" if local == "cpu" else f"CUDA {digits[:-1]}.{digits[-1]} build" if digits else "build unknown"
    return Check("torch", "ok", f"{version} ({build})", "")


def run_checks() -> list[Check]:
    return [
        Check("python", "ok", f"{platform.python_version()} ({sys.executable})", ""),
        Check("llmexport", "ok", _version("llmexport") or "source tree", ""),
        *_onnxruntime(),
        _gpu(),
        _torch(),
        _package("tensorrt", "tensorrt", "not installed: `llmexport build --backend tensorrt` cannot build engines "
                                         "(pip install tensorrt on a Linux GPU host)"),
        _package("triton", "triton", "not installed: no fused Triton attention (pip install triton)"),
        _package("onnxruntime-genai", "onnxruntime_genai", "not installed: `llmexport bench --genai` skips its column"),
    ]


def failures(checks: list[Check], device: str) -> list[Check]:
    """The checks `device` needs that did not pass."""
    return [c for c in checks if c.status != "ok" and device == "cuda" and c.needed_for == "cuda"]


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.name:<{width}}  {c.status:<7}  {c.detail}" for c in checks)
