"""What every real trained model is checked for. A test file subclasses RealModelChecks with the
model's examples/convert_gguf.py flag, its prompts and a chat; the fixtures here convert the GGUF
file through that script (as a user would), ask transformers for its greedy tokens once, and export
a bundle at max_seq_len 4096 on each target. On every target the bundle must give transformers'
greedy tokens, for the plain prompts and the chat, and pass verify."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llmexport.exporter.export import export_bundle
from llmexport.exporter.verify import verify_bundle
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

TARGETS = ["ort", "portable", "tensorrt"]  # tensorrt's graph runs in ONNX Runtime here (its local functions)


@dataclass(frozen=True)
class Greedy:
    ids: list[int]  # the prompt as transformers' tokenizer encodes it
    tokens: list[int]  # transformers' greedy continuation


@dataclass(frozen=True)
class Oracle:
    prompts: dict[str, Greedy]
    chat: Greedy


class RealModelChecks:
    """Subclass as Test<Model>, setting the class attributes below."""

    pytestmark = pytest.mark.slow
    flag: str  # examples/convert_gguf.py --<flag>
    prompts: list[str]
    chat: list[dict[str, str]]
    new_tokens: int = 24
    verify_prompts: int = 4  # two batches of max_batch rows
    max_batch: int = 2

    # First: the shared session opens after it, so verify's two runtimes and that session (each
    # holding the weights) are never in memory together.
    def test_verify_passes(self, bundle):
        report = verify_bundle(bundle, prompts=self.verify_prompts, decode_steps=8)
        assert report.ok, report.rows

    def test_greedy_tokens_equal_transformers(self, session, oracle):
        for prompt, expected in oracle.prompts.items():
            assert session.tokenizer.encode(prompt) == expected.ids
            ours = session.generate([expected.ids], SamplingParams(max_new_tokens=self.new_tokens))
            assert ours.token_ids[0] == expected.tokens, prompt

    def test_speculative_decoding_keeps_the_greedy_tokens(self, bundle, session, oracle):
        """Prompt lookup on the real model: transformers' greedy tokens for every prompt, and plain
        decoding's for a reply that copies its prompt (where proposals are accepted)."""
        copy = [{"role": "user", "content": "Repeat this list exactly: apple, banana, cherry, damson, elderberry, "
                                            "fig, grape, apple, banana, cherry, damson, elderberry, fig, grape."}]
        plain = session.chat(copy, SamplingParams(max_new_tokens=self.new_tokens)).token_ids[0]
        with Session(bundle, speculative="ngram", speculative_tokens=4) as fast:
            fast.engine.speculation_cost.worth_it = lambda *args: True  # verify whenever there is a proposal
            for prompt, expected in oracle.prompts.items():
                ours = fast.generate([expected.ids], SamplingParams(max_new_tokens=self.new_tokens))
                assert ours.token_ids[0] == expected.tokens, prompt
            assert fast.chat(copy, SamplingParams(max_new_tokens=self.new_tokens)).token_ids[0] == plain
            assert fast.engine.stats["accepted_tokens"] > 0

    def test_chat_equals_transformers(self, session, oracle):
        assert session.render_chat(self.chat) == oracle.chat.ids
        reply = session.chat(self.chat, SamplingParams(max_new_tokens=self.new_tokens))
        assert reply.token_ids[0] == oracle.chat.tokens
        assert reply.text[0].strip()


@pytest.fixture(scope="class")
def checkpoint(request, real_checkpoint) -> Path:
    return real_checkpoint(request.cls.flag)


@pytest.fixture(scope="class")
def oracle(request, checkpoint) -> Oracle:
    """transformers' greedy tokens, computed once for every target's bundle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def greedy(ids: list[int]) -> Greedy:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=request.cls.new_tokens, do_sample=False)
        return Greedy(ids, out[0, len(ids):].tolist())

    chat_ids = tokenizer.apply_chat_template(request.cls.chat, add_generation_prompt=True)["input_ids"]
    return Oracle({prompt: greedy(tokenizer(prompt)["input_ids"]) for prompt in request.cls.prompts},
                  greedy(chat_ids))


@pytest.fixture(scope="class", params=TARGETS)
def bundle(request, checkpoint, tmp_path_factory) -> Path:
    return export_bundle(checkpoint, tmp_path_factory.mktemp("bundle") / request.param, target=request.param,
                         max_seq_len=4096, max_batch=request.cls.max_batch)


@pytest.fixture(scope="class")
def session(bundle):
    """One session per bundle for the greedy and chat checks: opening one costs more than they do."""
    with Session(bundle) as opened:
        yield opened
