"""The acceptance runner itself, on a machine without a GPU: every check gets a row with a
status and a reason, the GPU-only commands are not started, and the run does not pass."""

from __future__ import annotations

import json

import pytest
import torch

from tests.gpu import acceptance


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host the real acceptance run is the check")
def test_without_a_gpu_the_report_says_why_each_check_did_not_pass(tmp_path):
    report = acceptance.run(tmp_path, timeout=600)
    assert not report["gpu"] and not report["passed"]
    top = {r["check"]: r for r in report["rows"] if not r["check"].startswith("  ")}
    assert set(top) == {c["name"] for c in acceptance.checks(tmp_path)}
    assert top["doctor"]["status"] == "fail" and "GPU" in top["doctor"]["detail"]
    assert top["triton kernels"]["status"] == top["bench llama-2-7b fp16"]["status"] == "skip"
    assert top["triton kernels"]["detail"] == "no CUDA GPU visible to torch"
    tests = [r for r in report["rows"] if r["check"].startswith("  ")]
    assert len(tests) >= 5 and all(t["status"] == "skip" and t["detail"] for t in tests)
    assert top["gpu tests"]["status"] == "skip"
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert "| doctor | fail |" in (tmp_path / "report.md").read_text()
