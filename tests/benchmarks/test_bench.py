"""Smoke run of the benchmark suite on a tiny preset: the report's shape, never its timings."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest


def _positive_numbers(node, path="") -> list[str]:
    """Paths of every number in the tree that is not a finite positive value."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _positive_numbers(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _positive_numbers(v, f"{path}[{i}]")]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [] if math.isfinite(node) and node > 0 else [path]
    return []


def test_bench_smoke_run_writes_a_complete_report(tmp_path):
    """Without --out the reports go to bench-results/ in the current directory, never over the
    committed benchmarks/results."""
    out = subprocess.run(
        [sys.executable, "-c", "from llmexport.cli import main; main()", "bench", "--model", "tiny-llama",
         "--prompt-lens", "8,16", "--batches", "1,2", "--decode-context", "8", "--warmup", "1", "--repeats", "2",
         "--name", "smoke", "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "bench-results").iterdir()) == ["smoke.json", "smoke.md", "smoke.png"]
    assert not (tmp_path / "benchmarks").exists()
    (tmp_path / "bench-results").rename(tmp_path / "results")
    result = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert result["schema"] == "llmexport-bench/2"
    assert {"command", "config", "hardware", "versions", "read_bandwidth_bytes_per_s", "weight_bytes", "bundle",
            "roofline", "results"} <= set(result)
    ran = {r["backend"]: r for r in result["results"] if r["status"] == "ok"}
    assert {"torch-eager (transformers)", "torch-static (cpu)", "onnxruntime-cpu"} <= set(ran)
    skipped = {r["backend"]: r["reason"] for r in result["results"] if r["status"] == "skipped"}
    assert skipped["onnxruntime-cuda"] == skipped["onnxruntime-cuda + CUDA graph"] == "needs a GPU"
    assert "tensorrt" in skipped
    for r in ran.values():
        assert set(r["ttft"]) == {"8", "16"} and set(r["decode"]) == {"1", "2"}
        assert {"median_s", "min_s", "max_s", "tokens_per_s", "fraction_of_floor"} <= set(r["decode"]["1"])
    numbers = {k: result[k] for k in ("read_bandwidth_bytes_per_s", "weight_bytes", "roofline")}
    # Timings and sizes must be positive; memory growth may honestly be 0 on CPU.
    memory = ("host_rss_growth_bytes", "peak_device_bytes")
    numbers["results"] = [{k: v for k, v in r.items() if k not in memory} for r in ran.values()]
    assert _positive_numbers(numbers) == []
    assert all(isinstance(r[k], int) and r[k] >= 0 for r in ran.values() for k in memory)
    assert result["bundle"]["export_s"] > 0 and result["bundle"]["export_peak_rss_bytes"] > 0
    markdown = (tmp_path / "results" / "smoke.md").read_text()
    assert "fraction of floor" in markdown and "onnxruntime-cpu" in markdown
    assert (tmp_path / "results" / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quantized_variants_and_onnxruntime_genai_are_measured_beside(make_hf_checkpoint, tmp_path):
    """--quant adds ONNX Runtime rows on int8/int4 bundles of the same model, each against the
    floor of its own (smaller) weights; --genai int4 builds onnxruntime-genai from the same
    checkpoint and --genai bundle runs its runtime on our own bundles (their genai.onnx), each
    generator on the same work, with the same thread count."""
    from tests.conftest import write_tokenizer

    checkpoint = make_hf_checkpoint("llama2")
    write_tokenizer(checkpoint / "tokenizer.json")  # the builder saves a tokenizer beside the model
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    out = subprocess.run(
        [sys.executable, "-c", "from llmexport.cli import main; main()", "bench", "--model", str(checkpoint),
         "--prompt-lens", "8", "--batches", "1,2", "--decode-context", "8", "--warmup", "1", "--repeats", "2",
         "--threads", "2", "--quant", "int8,int4,int4+sym+head4", "--genai", "int4,bundle", "--out", str(tmp_path / "results"),
         "--name", "q", "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "results" / "q.json").read_text())
    ran = {r["backend"]: r for r in result["results"] if r["status"] == "ok"}
    assert {"onnxruntime-cpu", "onnxruntime-cpu int8", "onnxruntime-cpu int4", "onnxruntime-genai int4 (cpu)"} <= set(
        ran), [r for r in result["results"] if r["status"] != "ok"]
    sizes = [ran[name]["weight_bytes"] for name in ("onnxruntime-cpu", "onnxruntime-cpu int8", "onnxruntime-cpu int4")]
    assert sizes[0] > sizes[1] > sizes[2] > ran["onnxruntime-cpu int4+sym+head4"]["weight_bytes"] > 0
    assert ran["onnxruntime-genai int4 (cpu)"]["weight_bytes"] > 0
    on_ours = [f"onnxruntime-genai runtime on onnxruntime-cpu{v} bundle" for v in ("", " int8", " int4")]
    assert set(on_ours) <= set(ran), [r for r in result["results"] if r["status"] != "ok"]
    # each row ran on its own bundle, counted as that bundle's onnxruntime-cpu row counts it
    assert [ran[name]["weight_bytes"] for name in on_ours] == [result["weight_bytes"], *sizes[1:]]
    for name in ("onnxruntime-cpu int4", "onnxruntime-genai int4 (cpu)", *on_ours):
        decode = ran[name]["decode"]
        assert set(decode) == {"1", "2"} and all(d["median_s"] > 0 and d["fraction_of_floor"] > 0
                                                 for d in decode.values())
    assert result["config"]["threads"] == 2
    assert "| onnxruntime-genai int4 (cpu) |" in (tmp_path / "results" / "q.md").read_text()


def test_bad_variant_names_are_clear_errors(tmp_path):
    from tests.conftest import run_cli

    result = run_cli("bench", "--model", "tiny-llama", "--quant", "int3", "--out", str(tmp_path))
    assert result.returncode == 1 and "--quant int3: a variant is int8 or int4" in result.stderr
    result = run_cli("bench", "--model", "tiny-llama", "--quant", "int4+fast", "--out", str(tmp_path))
    assert result.returncode == 1 and "+sym, +asym, +head4, +head8" in result.stderr


def test_an_onnxruntime_genai_row_that_cannot_run_says_why(tmp_path):
    """The reasons the suite records on a skipped onnxruntime-genai row (checked before any work)."""
    from types import SimpleNamespace

    from llmexport.benchmarks.genai import GenaiRunner
    from llmexport.benchmarks.runners import Unavailable

    cpu, python = SimpleNamespace(device="cpu"), sys.executable
    plain, genai = tmp_path / "plain", tmp_path / "genai"
    for bundle in (plain, genai):
        bundle.mkdir()
    (genai / "genai_config.json").write_text("{}")
    cases = [(GenaiRunner("fp32", "tiny-llama", python, tmp_path, cpu), "needs a checkpoint directory"),
             (GenaiRunner("fp32", str(tmp_path), python, tmp_path, SimpleNamespace(device="cuda")), "CPU only"),
             (GenaiRunner("fp32", None, python, tmp_path, cpu, bundle=plain), "has no genai_config.json"),
             (GenaiRunner("bundle", None, "/nonexistent/python", tmp_path, cpu, bundle=genai),
              "onnxruntime-genai is not installed")]
    for runner, reason in cases:
        with pytest.raises(Unavailable, match=reason):
            runner.check()


def test_report_is_named_after_what_was_measured_and_stays_inside_out(tmp_path):
    from llmexport import LLMExportError
    from llmexport.benchmarks.report import default_name, write_reports

    assert default_name("tiny-llama", tmp_path / "my-bundle", "float32", "cpu") == "my-bundle-cpu"
    assert default_name("/abs/path/to/ckpt", None, "float16", "cuda") == "ckpt-float16-cuda"
    with pytest.raises(LLMExportError, match="plain file name"):
        write_reports({}, tmp_path, "../escape")


def test_prompt_longer_than_the_model_allows_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "from llmexport.cli import main; main()", "bench", "--model", "tiny-llama",
         "--prompt-lens", "2048", "--out", str(tmp_path), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip() == ("error: the benchmark needs max_seq_len 2049 but tiny-llama allows 256; "
                                  "pass smaller --prompt-lens / --decode-context")


def test_kernel_report_smoke_in_the_interpreter(tmp_path):
    """The harness the GPU host runs (`bench-kernels --device cuda`), at toy sizes on CPU."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton; it is in .[test])")
    script = ("from llmexport.benchmarks.kernels import kernel_report, markdown\n"
              "r = kernel_report('cpu', lengths=(16, 33), batches=(1, 2), heads={'tiny': (4, 2, 16)},"
              " dtypes=('float32',), repeats=1)\n"
              "assert all(row['max_relative_error'] < 1e-5 for row in r['rows']), r\n"
              "assert len(r['rows']) == 4 and all(v > 0 for row in r['rows'] for v in row['seconds'].values())\n"
              "print(markdown(r))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TRITON_INTERPRET="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| tiny | float32 | 2 | 33 |" in out.stdout


def test_bench_serve_smoke_run_writes_a_complete_report(bundle_factory, tmp_path):
    """bench-serve on a tiny bundle: the server comes up, every client count runs the whole
    workload, the host-work table has every sampling setting, and the reports are written."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    bundle, _ = bundle_factory("llama3", "ort")
    out = subprocess.run(
        [sys.executable, "-c", "from llmexport.cli import main; main()", "bench-serve", "--bundle", str(bundle),
         "--clients", "1,3", "--requests", "5", "--prompt-tokens", "2,9", "--max-tokens", "6", "--host-batch", "3",
         "--name", "serve"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    tmp_path = tmp_path / "bench-results"  # the default --out
    result = json.loads((tmp_path / "serve.json").read_text())
    assert [(r["clients"], r["requests"], r["tokens"]) for r in result["runs"]] == [(1, 5, 30), (3, 5, 30)]
    assert result["runs"][0]["speedup_vs_sequential"] == 1.0
    assert not _positive_numbers(result["runs"])
    assert len(result["host_work"]) == 4 and all(h["batch"] == 3 and h["iterations"] > 0 for h in result["host_work"])
    assert (tmp_path / "serve.png").stat().st_size > 0 and "| clients |" in (tmp_path / "serve.md").read_text()


@pytest.mark.slow
def test_bench_serve_drives_one_ray_replica_beside_plain_serve(bundle_factory, tmp_path):
    """--ray-replicas 1: the workload on `serve --ray` too, and plain serve and Ray alternately:
    p50s, their ratio, the per-prompt difference and each server's time outside its engine."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    bundle, _ = bundle_factory("llama3", "ort")
    out = subprocess.run(
        [sys.executable, "-c", "from llmexport.cli import main; main()", "bench-serve", "--bundle", str(bundle),
         "--clients", "1", "--requests", "4", "--prompt-tokens", "2,9", "--max-tokens", "4", "--host-batch", "2",
         "--ray-replicas", "1", "--name", "ray", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "ray.json").read_text())
    assert [(r["server"], r["requests"], r["tokens"]) for r in result["runs"]] == [("serve", 4, 16), ("ray x1", 4, 16)]
    paired = result["paired"]
    for label in ("serve", "ray x1"):
        assert paired[label]["requests"] == 4 and paired[label]["ttft_p50_s"] > 0
        assert 0 <= paired[label]["outside_engine_s"] <= max(paired[label]["ttft_s"])
    assert paired["ratio"]["ttft_p50_s"] == paired["ray x1"]["ttft_p50_s"] / paired["serve"]["ttft_p50_s"]
    assert "Ray x1 less serve, per prompt" in (tmp_path / "ray.md").read_text()


def test_the_default_prompt_lengths_fit_the_model():
    """`llmexport bench` with no options measures the tiny preset (256 positions) instead of
    failing on its own default 2,048-token prompt."""
    from llmexport.benchmarks.suite import default_prompt_lens

    assert default_prompt_lens(4096) == (128, 512, 2048)
    assert default_prompt_lens(256) == (128,)
    assert default_prompt_lens(100) == (50,)


def test_a_bad_report_name_fails_before_the_benchmark_runs(tmp_path):
    from tests.conftest import run_cli

    result = run_cli("bench", "--model", "tiny-llama", "--name", "a/b", "--out", str(tmp_path),
                     "--workdir", str(tmp_path / "w"), timeout=60)
    assert result.returncode == 1 and "must be a plain file name" in result.stderr
    assert not (tmp_path / "w").exists()  # nothing was exported


def test_peak_memory_counts_what_was_freed_before_the_reading():
    """The report's peak memory: RSS after a runner reads 0 when it freed what it used (or reused
    a previous runner's freed pages); the high-water mark since the reset does not."""
    import numpy as np

    from llmexport.benchmarks.measure import peak_rss_bytes, reset_peak_rss, rss_bytes

    if not reset_peak_rss():
        pytest.skip("this kernel does not reset the peak RSS (/proc/self/clear_refs)")
    before = rss_bytes()
    block = np.ones(96 * 2**20 // 8)  # 96 MiB, every page touched
    del block
    assert peak_rss_bytes() - before >= 90 * 2**20
    assert reset_peak_rss() and peak_rss_bytes() - rss_bytes() < 90 * 2**20
