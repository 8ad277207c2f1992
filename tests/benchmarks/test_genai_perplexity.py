"""The peer's perplexity on llmexport eval's terms: onnxruntime-genai's fp32 build of a checkpoint
scores the same windows as llmexport's float32 bundle of it, to float32 rounding."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llmexport.benchmarks.genai_perplexity import perplexity as genai_perplexity
from llmexport.runtime.evaluate import perplexity
from llmexport.runtime.session import Session


@pytest.mark.slow
def test_genai_fp32_scores_the_windows_llmexport_eval_scores(bundle_factory, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    bundle_dir, checkpoint = bundle_factory("llama3", "ort")
    source = shutil.copytree(checkpoint, tmp_path / "ckpt")  # the builder saves the tokenizer beside its model
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    built = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o",
                            str(tmp_path / "genai"), "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache")],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    ids = np.random.default_rng(0).integers(3, 256, size=150).tolist()  # windows of 64, 64 and 22 tokens
    with Session(bundle_dir, threads=2) as session:
        ours = perplexity(session, ids, window=64)
    theirs = genai_perplexity(tmp_path / "genai", ids, window=64, threads=2)
    assert (theirs["tokens_scored"], theirs["windows"]) == (ours.tokens_scored, ours.windows) == (147, 3)
    assert theirs["perplexity"] == pytest.approx(ours.perplexity, rel=1e-4)
