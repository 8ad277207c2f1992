"""The export-time benchmark: llmexport's rows are measured, a missing peer says why it was skipped."""

from __future__ import annotations

import json

import pytest

from llmexport.benchmarks import export_time


@pytest.mark.slow
def test_rows_are_measured_and_a_missing_peer_is_skipped(make_hf_checkpoint, tmp_path):
    checkpoint = make_hf_checkpoint("llama2")
    out = tmp_path / "results"
    assert export_time.main(["--model", str(checkpoint), "--workdir", str(tmp_path / "work"), "--out", str(out),
                             "--name", "t", "--max-seq-len", "64"]) == 0
    result = json.loads((out / "t.json").read_text())
    ours = {k: v for k, v in result["rows"].items() if k.startswith("llmexport")}
    assert len(ours) == 2
    for row in ours.values():
        assert row["exit_code"] == 0 and row["wall_s"] > 0 and row["peak_rss_bytes"] > 10 * 2**20
    peers = {k: v for k, v in result["rows"].items() if k.startswith("onnxruntime-genai")}
    assert peers and all("--genai-python" in v["skipped"] for v in peers.values())
    assert "| onnxruntime-genai builder int4 (cpu) | - | - | skipped" in (out / "t.md").read_text()


def test_a_failing_export_is_reported_not_raised(tmp_path):
    row = export_time.measure(["python3", "-c", "import sys; sys.exit('no such model')"], threads=1)
    assert row["exit_code"] == 1 and row["error"] == "no such model"


def test_report_names_must_not_be_paths(make_hf_checkpoint, tmp_path):
    with pytest.raises(SystemExit):
        export_time.main(["--model", str(make_hf_checkpoint("llama2")), "--name", "../x", "--out", str(tmp_path)])
