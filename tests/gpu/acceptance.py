"""Every GPU check in one run, one report: `python tests/gpu/acceptance.py --out DIR` (what
tests/gpu/acceptance.sh runs after installing the GPU packages).

Checks, each a command whose exit status (and, for pytest, each test's outcome) decides pass /
fail / skip, with the reason:
  doctor          llmexport doctor --device cuda (GPU, driver, onnxruntime-gpu, CUDA/cuDNN, TensorRT)
  gpu tests       pytest -m gpu: ONNX Runtime CUDA against the reference (tiny and llama-2-7b
                  shapes), CUDA-graph decode (ONNX Runtime and torch), cache addresses stable,
                  one weight copy measured from the driver
  triton kernels  llmexport bench-kernels --device cuda (decode kernel vs the reference, fp16 and bf16)
  bench 7B fp16   llmexport bench --model llama-2-7b --dtype float16 --device cuda
Without a CUDA GPU the GPU-only commands are not started: they are reported as skipped, so the
report itself can be produced (and tested) anywhere.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

CLI = [sys.executable, "-c", "from llmexport.cli import main; main()"]


def _gpu() -> str | None:
    """Why GPU-only checks cannot run here, or None when a CUDA GPU is visible to torch."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU visible to torch"


def checks(out: Path) -> list[dict]:
    return [
        {"name": "doctor", "command": [*CLI, "doctor", "--device", "cuda"], "gpu_only": False},
        {"name": "gpu tests", "command": [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                          f"--junitxml={out / 'gpu-tests.xml'}", "tests"], "gpu_only": False},
        {"name": "triton kernels", "command": [*CLI, "bench-kernels", "--device", "cuda", "--out", str(out)],
         "gpu_only": True},
        {"name": "bench llama-2-7b fp16", "command": [*CLI, "bench", "--model", "llama-2-7b", "--dtype", "float16",
                                                      "--device", "cuda", "--prompt-lens", "128,512,2048",
                                                      "--batches", "1,8,32", "--out", str(out),
                                                      "--workdir", str(out / "bench-work")], "gpu_only": True},
    ]


def _pytest_rows(xml: Path) -> list[dict]:
    """One row per test of a junit XML report: pass, fail (with the message) or skip (with the reason)."""
    if not xml.exists():
        return []
    rows = []
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            rows.append({"check": name, "status": "fail", "detail": (failure.get("message") or "")[:300]})
        elif skipped is not None:
            rows.append({"check": name, "status": "skip", "detail": (skipped.get("message") or "")[:300]})
        else:
            rows.append({"check": name, "status": "pass", "detail": ""})
    return rows


def run(out: Path, timeout: int = 3600) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    no_gpu = _gpu()
    rows = []
    for check in checks(out):
        if check["gpu_only"] and no_gpu:
            rows.append({"check": check["name"], "status": "skip", "detail": no_gpu, "seconds": 0.0})
            continue
        started = time.perf_counter()
        try:
            done = subprocess.run(check["command"], capture_output=True, text=True, timeout=timeout)
            status = "pass" if done.returncode == 0 else "fail"
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            status, tail = "fail", [f"timed out after {timeout} s"]
        (out / f"{check['name'].replace(' ', '-')}.log").write_text("\n".join(tail))
        row = {"check": check["name"], "status": status, "detail": " / ".join(tail)[:300],
               "seconds": round(time.perf_counter() - started, 1)}
        if check["name"] == "gpu tests":
            tests = _pytest_rows(out / "gpu-tests.xml")
            outcomes = {t["status"] for t in tests}
            if "fail" in outcomes or not tests:
                row["status"] = "fail"
            else:  # every test must pass on the GPU host: one skipped leaves the check unproven
                row["status"] = "pass" if outcomes == {"pass"} else "skip"
            rows.append(row)
            rows.extend({**t, "check": "  " + t["check"]} for t in tests)
            continue
        rows.append(row)
    report = {"gpu": no_gpu is None, "why_not": no_gpu, "rows": rows,
              "passed": all(r["status"] == "pass" for r in rows if not r["check"].startswith("  "))}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["# GPU acceptance report", "", f"GPU: {'yes' if report['gpu'] else 'no (' + no_gpu + ')'}; "
             f"all checks passed: {report['passed']}", "", "| check | status | detail |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['status']} | {r['detail'].replace('|', '/')} |" for r in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-acceptance"))
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per check")
    args = parser.parse_args()
    report = run(args.out, args.timeout)
    print((args.out / "report.md").read_text())
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
