"""Log-probabilities of chosen and most likely tokens against a float64 numpy log-softmax."""

from __future__ import annotations

import numpy as np
import pytest

from llmexport.runtime.logprobs import log_softmax_at, token_logprobs


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_chosen_and_top_tokens_match_a_float64_log_softmax():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(5, 1000)) * 4).astype(np.float32)
    targets = rng.integers(0, 1000, size=5)
    want = _log_softmax(logits)
    got = token_logprobs(logits, targets, top=4)
    assert [g.logprob for g in got] == pytest.approx(want[np.arange(5), targets].tolist(), abs=1e-9)
    assert log_softmax_at(logits, targets) == pytest.approx(want[np.arange(5), targets], abs=1e-9)
    for row, g in enumerate(got):
        best = np.argsort(-want[row], kind="stable")[:4]
        assert [t for t, _ in g.top] == best.tolist()
        assert [lp for _, lp in g.top] == pytest.approx(want[row, best].tolist(), abs=1e-6)


def test_ties_list_the_lower_id_first_and_top_zero_lists_none():
    logits = np.zeros((1, 8), dtype=np.float32)
    logits[0, [6, 2]] = 1.0
    assert [t for t, _ in token_logprobs(logits, [2], top=3)[0].top] == [2, 6, 0]
    assert token_logprobs(logits, [2], top=0)[0].top == ()
