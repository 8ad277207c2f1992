"""The CLI's errors and their fixes (docs/troubleshooting.md): each error is one line that names a
fix, and doing what it says makes the command succeed. Where the message spells out a command,
that exact command is run."""

from __future__ import annotations

import re
import shutil

import pytest
from typer.testing import CliRunner

from llmexport import LLMExportError
from llmexport.cli import app


def run(*args: str, input: str | None = None) -> tuple[int, str]:
    """(exit status, the `error:` line or the output) as the entry point prints them, in-process."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if isinstance(result.exception, LLMExportError):
        return 1, f"error: {result.exception}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def suggested(message: str, **fill: str) -> list[str]:
    """The `llmexport ...` command a message suggests, as arguments, placeholders filled in."""
    command = re.search(r"llmexport (.+)$", message).group(1).split()
    return [fill.get(word, word) for word in command if word != "..."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A preset's bundle: random weights, no tokenizer."""
    out = tmp_path_factory.mktemp("cli-errors") / "tiny"
    assert run("onnx", "--model", "tiny-llama", "--out", out, "--max-seq-len", "64")[0] == 0
    return out


@pytest.fixture(scope="module")
def worded(bundle_factory):
    """A checkpoint's bundle with a tokenizer ("w5 w6" <-> [5, 6]) but no chat template, and its checkpoint."""
    return bundle_factory("llama2", "ort")


@pytest.fixture(scope="module")
def chatty(worded, tmp_path_factory):
    """The same checkpoint with a chat template, exported."""
    ckpt = tmp_path_factory.mktemp("chat-ckpt") / "ckpt"
    shutil.copytree(worded[1], ckpt)
    (ckpt / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    out = ckpt.parent / "bundle"
    assert run("onnx", "--model", ckpt, "--out", out, "--max-seq-len", "64")[0] == 0
    return out


def test_an_existing_out_needs_force(tiny):
    status, message = run("onnx", "--model", "tiny-llama", "--out", tiny, "--max-seq-len", "64")
    assert status == 1 and "pass --force" in message
    assert run("onnx", "--model", "tiny-llama", "--out", tiny, "--max-seq-len", "64", "--force")[0] == 0


def test_a_bad_export_setting_names_the_values_that_work(tmp_path):
    status, message = run("onnx", "--model", "tiny-lama", "--out", tmp_path / "b")
    assert status == 1 and "choose one of" in message and "tiny-llama" in message
    status, message = run("onnx", "--model", "tiny-llama", "--out", tmp_path / "b", "--max-seq-len", "100000")
    assert status == 1 and "outside 1..256" in message and "pass a value in that range" in message
    status, message = run("onnx", "--model", "tiny-llama", "--out", tmp_path / "b", "--target", "trt")
    assert status == 1 and "choose one of portable, ort, tensorrt" in message
    assert run("onnx", "--model", "tiny-llama", "--out", tmp_path / "b", "--max-seq-len", "256",
               "--target", "tensorrt")[0] == 0


def test_generate_needs_a_prompt(tiny):
    status, message = run("generate", "--bundle", tiny)
    assert status == 1 and message.strip() == "error: give a --prompt, --token-ids or --chat"
    assert run("generate", "--bundle", tiny, "--token-ids", "1,2,3", "--max-new-tokens", "2")[0] == 0


def test_text_on_a_bundle_without_a_tokenizer_needs_token_ids(tiny):
    status, message = run("generate", "--bundle", tiny, "--prompt", "hello")
    assert status == 1 and "pass token ids (--token-ids) instead of text" in message
    assert run("generate", "--bundle", tiny, "--token-ids", "1,2,3", "--max-new-tokens", "2")[0] == 0
    status, message = run("reference", "--model", "tiny-llama", "--prompt", "hello")
    assert status == 1 and "pass --token-ids instead of --prompt" in message
    assert run("reference", "--model", "tiny-llama", "--token-ids", "1,2,3", "--max-new-tokens", "2")[0] == 0


def test_chat_without_a_tokenizer_suggests_what_works(tiny, chatty):
    status, message = run("chat", "--bundle", tiny, input="hello\n")
    assert status == 1 and "export a checkpoint directory that has tokenizer.json and a chat template" in message
    assert run(*suggested(message), "--max-new-tokens", "2")[0] == 0
    assert run("chat", "--bundle", chatty, "--max-new-tokens", "2", input="w5 w6\n")[0] == 0
    status, message = run("generate", "--bundle", tiny, "--chat", "hello")
    assert status == 1 and "--token-ids 1,2,3" in message


def test_chat_without_a_template_suggests_a_plain_prompt(worded, chatty):
    status, message = run("chat", "--bundle", worded[0], input="w5 w6\n")
    assert status == 1 and "has no chat template" in message
    assert run(*suggested(message, TEXT="w5 w6"), "--max-new-tokens", "2")[0] == 0
    status, message = run("generate", "--bundle", worded[0], "--token-ids", "5,6", "--system", "w7")
    assert status == 1 and message.strip() == "error: --system needs --chat"
    assert run("generate", "--bundle", chatty, "--chat", "w5", "--system", "w7", "--max-new-tokens", "2")[0] == 0


def test_eval_needs_a_tokenizer_and_a_readable_text(tiny, worded, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 50 + 3}" for i in range(40)))
    status, message = run("eval", "--bundle", tiny, "--text", text)
    assert status == 1 and "export a checkpoint directory that has tokenizer.json" in message
    status, message = run("eval", "--bundle", worded[0], "--text", tmp_path / "missing.txt")
    assert status == 1 and "pass a UTF-8 text file" in message
    status, output = run("eval", "--bundle", worded[0], "--text", text)
    assert status == 0 and "perplexity" in output


def test_onnxruntime_needs_no_build_step(tiny):
    status, message = run("build", "--bundle", tiny, "--backend", "onnxruntime")
    assert status == 1 and "run the bundle as it is" in message
    assert run(*suggested(message), "--token-ids", "1,2,3", "--max-new-tokens", "2")[0] == 0


def test_verify_model_must_be_the_bundles_source(tiny):
    status, message = run("verify", "--bundle", tiny, "--model", "tiny-qwen2", "--prompts", "1")
    assert status == 1 and "pass the checkpoint or preset it was exported from" in message
    assert run("verify", "--bundle", tiny, "--model", "tiny-llama", "--prompts", "1", "--decode-steps", "1")[0] == 0


def test_doctor_names_its_devices():
    status, message = run("doctor", "--device", "gpu")
    assert status == 1 and "use cpu or cuda" in message
    assert run("doctor", "--device", "cpu")[0] == 0


def test_bench_prompts_must_fit_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, message = run("bench", "--model", "tiny-llama", "--prompt-lens", "2048")
    assert status == 1 and "pass smaller --prompt-lens / --decode-context" in message
    status, message = run("bench", "--model", "tiny-llama", "--genai", "fp16")
    assert status == 1 and "choose from int4, fp32" in message
    assert run("bench", "--model", "tiny-llama", "--prompt-lens", "8", "--batches", "1", "--decode-context", "8",
               "--warmup", "0", "--repeats", "1")[0] == 0


def test_bench_serve_prompt_tokens_are_two_lengths(worded, tmp_path, monkeypatch):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    monkeypatch.chdir(tmp_path)
    status, message = run("bench-serve", "--bundle", worded[0], "--prompt-tokens", "5")
    assert status == 1 and "must be two lengths LOW,HIGH with LOW <= HIGH" in message
    assert run("bench-serve", "--bundle", worded[0], "--prompt-tokens", "2,5", "--clients", "1", "--requests", "1",
               "--max-tokens", "2", "--host-batch", "1")[0] == 0
