"""Perplexity: equal to transformers' own loss on the same windows, on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmexport import LLMExportError
from llmexport.exporter.quantize import QuantConfig
from llmexport.runtime.evaluate import perplexity
from llmexport.runtime.session import Session
from tests.conftest import WORDS, run_cli

TEXT = " ".join(WORDS[3 + int(i)] for i in np.random.default_rng(0).integers(0, 250, 150))


def _transformers_perplexity(checkpoint, ids: list[int], window: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start: start + window]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([chunk]), labels=torch.tensor([chunk])).loss
        total, count = total + float(loss) * (len(chunk) - 1), count + len(chunk) - 1
    return math.exp(total / count)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_perplexity_equals_transformers(bundle_factory, family, backend):
    bundle_dir, checkpoint = bundle_factory(family, "ort")
    with Session(bundle_dir, backend=backend) as session:
        ids = session.tokenizer.encode(TEXT)
        result = perplexity(session, ids, window=40)  # 4 windows, the last one short, run as one batch
    assert result.windows == 4 and result.tokens_scored == len(ids) - 4
    assert result.perplexity == pytest.approx(_transformers_perplexity(checkpoint, ids, 40), rel=1e-4)


def test_a_quantized_bundle_has_a_close_but_higher_perplexity(bundle_factory):
    with Session(bundle_factory("llama3", "ort")[0]) as full, \
            Session(bundle_factory("llama3", "ort", quant=QuantConfig("int8", accuracy_level=1))[0]) as int8:
        ids = full.tokenizer.encode(TEXT)
        a, b = perplexity(full, ids, window=64).perplexity, perplexity(int8, ids, window=64).perplexity
    assert a != b and abs(b - a) / a < 0.05


def test_eval_cli_and_errors(bundle_factory, tmp_path):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    (tmp_path / "t.txt").write_text(TEXT)
    result = run_cli("eval", "--bundle", str(bundle_dir), "--text", str(tmp_path / "t.txt"), "--window", "32")
    assert result.returncode == 0 and result.stdout.startswith("perplexity ") and "windows of 32" in result.stdout
    (tmp_path / "one.txt").write_text("w5")
    result = run_cli("eval", "--bundle", str(bundle_dir), "--text", str(tmp_path / "one.txt"))
    assert result.returncode == 1 and "at least 2" in result.stderr
    result = run_cli("eval", "--bundle", str(bundle_dir), "--text", str(tmp_path / "missing.txt"))
    assert result.returncode == 1 and "cannot read --text" in result.stderr
    with Session(bundle_dir) as session, pytest.raises(LLMExportError, match="outside the bundle's vocabulary"):
        perplexity(session, [1, 2, 10**6])


def test_eval_model_scores_the_unquantized_source_through_a_quantized_bundle(bundle_factory, tmp_path):
    """--model: the checkpoint the bundle came from, on the torch reference in float32, with the
    bundle's tokenizer and windows: transformers' figure, not the int4 bundle's own."""
    bundle_dir, checkpoint = bundle_factory("llama3", "ort", quant=QuantConfig("int4", accuracy_level=1))
    (tmp_path / "t.txt").write_text(TEXT)
    args = ["eval", "--bundle", str(bundle_dir), "--text", str(tmp_path / "t.txt"), "--window", "40"]
    with Session(bundle_dir) as session:
        ids = session.tokenizer.encode(TEXT)
        own = perplexity(session, ids, window=40).perplexity
    result = run_cli(*args, "--model", str(checkpoint))
    assert result.returncode == 0, result.stderr
    figure = float(result.stdout.split()[1])
    assert figure == pytest.approx(_transformers_perplexity(checkpoint, ids, 40), rel=1e-4)
    assert abs(figure - own) / figure > 1e-4 and "on --model" in result.stdout
    result = run_cli(*args, "--model", "tiny-qwen2")
    assert result.returncode == 1 and "is not the model" in result.stderr
    result = run_cli(*args, "--model", str(checkpoint), "--backend", "onnxruntime")
    assert result.returncode == 1 and "runs on the torch backend" in result.stderr


def _one_token_at_a_time(session, ids: list[int], window: int) -> float:
    """The mean NLL as scoring was first written: each window fed one token per step (prefill of
    its first token, then decode steps), the last-token logits of each step scoring the next."""
    from llmexport.runtime.evaluate import windows
    from llmexport.runtime.logprobs import log_softmax_at

    backend, total, count = session.backend, 0.0, 0
    for chunk in windows(ids, window):
        logits = backend.step("prefill", np.array([chunk[:1]]), np.zeros((1, 1), np.int64), np.array([1]), range(1))
        for t in range(1, len(chunk)):
            total -= float(log_softmax_at(logits, np.array([chunk[t]]))[0])
            count += 1
            if t < len(chunk) - 1:
                logits = backend.step("decode", np.array([[chunk[t]]]), np.array([[t]]), np.array([t + 1]), range(1))
    return total / count


@pytest.mark.parametrize("logits_bytes, how", [(None, "windows side by side"), (4 * 256 * 7, "chunks of 7")])
@pytest.mark.parametrize("target", ["ort", "portable"])
def test_prefill_scoring_equals_one_token_at_a_time(bundle_factory, monkeypatch, target, logits_bytes, how):
    from llmexport.runtime import scheduler

    if logits_bytes:  # a window needs several calls over its growing cache
        monkeypatch.setattr(scheduler, "LOGITS_BYTES", logits_bytes)
    seen = []
    with Session(bundle_factory("qwen2", target)[0]) as session:
        ids = session.tokenizer.encode(TEXT)
        result = perplexity(session, ids, window=40, progress=lambda done, total: seen.append((done, total)))
        want = _one_token_at_a_time(session, ids, 40)
    assert result.mean_nll == pytest.approx(want, rel=1e-5)
    assert seen[0] == (0, len(ids) - 4) and seen[-1] == (len(ids) - 4,) * 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    fed = [len(ids[i: i + 40]) - 1 for i in range(0, len(ids), 40)]  # each window's tokens but its last
    calls = session.engine.stats["prefill_calls"]
    assert calls == (1 if how == "windows side by side" else sum(-(-n // 7) for n in fed))
    # progress is reported after every engine iteration that scored something (chunks of all
    # windows in one iteration: one report)
    assert len(seen) - 1 == (1 if how == "windows side by side" else max(-(-n // 7) for n in fed))
