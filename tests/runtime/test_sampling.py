"""Sampling rules against numpy-computed expectations."""

from __future__ import annotations

import numpy as np

from llmexport.runtime.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))


def _draws(params: SamplingParams, n: int = 400, logits=LOGITS, history=([],)) -> set[int]:
    sampler = Sampler(params)
    return {int(sampler(logits, list(history))[0]) for _ in range(n)}


def test_greedy_takes_the_argmax():
    assert _draws(SamplingParams(), n=5) == {0}


def test_top_k_keeps_only_the_k_most_likely():
    assert _draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    assert _draws(SamplingParams(temperature=1.0, top_p=0.75)) == {0, 1}  # 0.5 < 0.75 <= 0.8
    assert _draws(SamplingParams(temperature=1.0, top_p=0.5)) == {0}


def test_repetition_penalty_follows_transformers():
    logits = np.array([[2.0, -1.0, 1.0]], dtype=np.float32)
    # transformers: positive logits divided by the penalty, negative ones multiplied.
    picked = Sampler(SamplingParams(repetition_penalty=4.0))(logits, [[0, 1]])
    assert picked.tolist() == [2]  # 2/4 = 0.5 < 1.0


def test_same_seed_same_draws():
    params = SamplingParams(temperature=1.0, seed=3)
    a, b = Sampler(params), Sampler(params)
    assert [int(a(LOGITS, [[]])[0]) for _ in range(50)] == [int(b(LOGITS, [[]])[0]) for _ in range(50)]
