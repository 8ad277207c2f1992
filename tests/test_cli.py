"""The command line as a user runs it: the installed entry point in a fresh process."""

from __future__ import annotations

import json

from tests.conftest import run_cli


def test_help_lists_the_commands():
    out = run_cli("--help")
    assert out.returncode == 0 and "models" in out.stdout


def test_models_lists_presets_with_sizes():
    out = run_cli("models")
    assert out.returncode == 0
    assert "llama-2-7b" in out.stdout and "6.74B" in out.stdout and "12.55 GiB" in out.stdout


def test_reference_generates_the_requested_tokens():
    out = run_cli("reference", "--model", "tiny-llama", "--token-ids", "1,2,3", "--max-new-tokens", "5")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"][0]) == 5


def test_errors_are_one_line_without_traceback():
    out = run_cli("reference", "--model", "no-such-model")
    assert out.returncode == 1
    assert out.stderr.startswith("error: unknown preset 'no-such-model'")
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_onnx_verify_generate_round_trip(tmp_path):
    bundle = str(tmp_path / "bundle")
    out = run_cli("onnx", "--model", "tiny-qwen2", "--out", bundle, "--max-seq-len", "64", "--max-batch", "2")
    assert out.returncode == 0, out.stderr
    out = run_cli("verify", "--bundle", bundle, "--prompts", "4")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "logits (decode)" in out.stdout and "NO" not in out.stdout
    out = run_cli("generate", "--bundle", bundle, "--token-ids", "1,2,3", "--token-ids", "4,5",
                  "--max-new-tokens", "5", "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [len(t) for t in result["token_ids"]] == [5, 5]
    assert result["finish_reason"] == ["length", "length"]
    assert set(result["timings"]) >= {"time_to_first_token_s", "decode_ms_per_step", "tokens_per_s"}
    out = run_cli("onnx", "--model", "tiny-qwen2", "--out", bundle)
    assert out.returncode == 1 and "pass --force" in out.stderr


def test_verify_fails_loudly_on_a_wrong_graph(tmp_path):
    import onnx

    bundle = tmp_path / "bundle"
    assert run_cli("onnx", "--model", "tiny-llama", "--out", str(bundle), "--max-seq-len", "64").returncode == 0
    graph = onnx.load(bundle / "decode.onnx", load_external_data=False)
    for node in graph.graph.node:
        if node.op_type == "GroupQueryAttention":
            next(a for a in node.attribute if a.name == "scale").f = 1.0  # wrong softmax scale
    onnx.save(graph, bundle / "decode.onnx")
    out = run_cli("verify", "--bundle", str(bundle))
    assert out.returncode == 1 and "verification failed" in out.stderr
    assert "logits (decode)" in out.stdout and "NO" in out.stdout


def test_generate_without_prompt_is_an_error(tmp_path):
    bundle = str(tmp_path / "bundle")
    assert run_cli("onnx", "--out", bundle, "--max-seq-len", "32").returncode == 0
    out = run_cli("generate", "--bundle", bundle)
    assert out.returncode == 1 and out.stderr.strip() == "error: give a --prompt, --token-ids or --chat"


def test_generate_streams_text_from_a_prompt(bundle_factory):
    bundle_dir, _ = bundle_factory("llama2", "ort")  # has a word-level tokenizer.json
    out = run_cli("generate", "--bundle", str(bundle_dir), "--prompt", "w5 w6 w7", "--max-new-tokens", "6",
                  "--ignore-eos")
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert 1 <= len(words) <= 6 and all(w.startswith("w") for w in words)
    as_json = json.loads(run_cli("generate", "--bundle", str(bundle_dir), "--prompt", "w5 w6 w7",
                                 "--max-new-tokens", "6", "--ignore-eos", "--json").stdout)
    assert as_json["text"][0].split() == words
