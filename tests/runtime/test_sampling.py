"""Sampling rules against numpy-computed expectations."""

from __future__ import annotations

import numpy as np

from llmexport.runtime.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))


def _draws(params: SamplingParams, n: int = 400, logits=LOGITS) -> set[int]:
    sampler = Sampler(params)
    return {sampler(logits[0]) for _ in range(n)}


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
    assert Sampler(SamplingParams(repetition_penalty=4.0), seen=[0, 1])(logits[0]) == 2  # 2/4 = 0.5 < 1.0
    sampler = Sampler(SamplingParams(repetition_penalty=4.0))
    assert sampler(logits[0]) == 0
    sampler.observe([0, 0, 1])
    assert sampler(logits[0]) == 2


def test_incremental_repetition_penalty_equals_a_scan_of_the_history():
    """The sampler keeps the distinct seen ids as they come; on random histories its penalised
    argmax equals transformers' rule applied to np.unique of the whole history."""
    rng = np.random.default_rng(1)
    params = SamplingParams(repetition_penalty=1.7)
    for _ in range(50):
        history = rng.integers(0, 500, size=int(rng.integers(1, 300))).tolist()
        sampler = Sampler(params, seen=history[:5])
        for t in history[5:]:
            sampler.observe([t])
        logits = rng.normal(size=500).astype(np.float32)
        want = logits.copy()
        ids = np.unique(history)
        want[ids] = np.where(want[ids] > 0, want[ids] / 1.7, want[ids] * 1.7)
        assert sampler(logits) == int(np.argmax(want))


def test_same_seed_same_draws():
    params = SamplingParams(temperature=1.0, seed=3)
    a, b = Sampler(params), Sampler(params)
    assert [a(LOGITS[0]) for _ in range(50)] == [b(LOGITS[0]) for _ in range(50)]


def test_top_p_by_binned_mass_keeps_what_a_sort_of_the_whole_vocabulary_keeps():
    """_nucleus sorts only the tokens of the bin where the mass crosses top_p; on random rows, with
    ties and without, peaked and flat, it keeps exactly what a stable sort of the row keeps, and
    draws only kept tokens."""
    from llmexport.runtime.sampling import Nucleus

    def full(probs, top_p):
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order], dtype=np.float64) - probs[order]
        return np.sort(order[before < top_p * probs.sum(dtype=np.float64)])

    rng = np.random.default_rng(0)
    for trial in range(600):
        logits = (rng.normal(size=int(rng.integers(1, 5000))) * rng.choice([0.01, 0.1, 1.0, 5.0, 30.0]))
        if trial % 3 == 0:
            logits = np.round(logits)  # many ties
        if trial % 7 == 0:
            logits[:] = 0  # every token tied
        if trial % 5 == 0:
            logits[rng.integers(0, len(logits), size=len(logits) // 3)] = -np.inf  # top-k's cut tokens
        x = (logits - logits.max()).astype(np.float32)
        top_p = float(rng.choice([0.01, 0.3, 0.5, 0.9, 0.999, 0.99999]))
        want = full(np.exp(x), top_p)
        nucleus = Nucleus(x.copy(), top_p)
        assert np.array_equal(nucleus.kept(), want), trial
        assert all(nucleus.draw(u) in set(want.tolist()) for u in rng.random(20)), trial


def test_draws_follow_the_weights():
    """_draw and Nucleus.draw map u in [0, 1) onto the cumulative weights: over a grid of u, each
    token is drawn in proportion to its weight (and a zero weight never)."""
    from llmexport.runtime.sampling import Nucleus, _draw

    rng = np.random.default_rng(2)
    weights = rng.random(5000).astype(np.float32) * (rng.random(5000) > 0.3)
    grid = (np.arange(200_000) + 0.5) / 200_000
    counts = np.bincount([_draw(weights, u) for u in grid], minlength=5000)
    assert np.abs(counts / len(grid) - weights / weights.sum()).max() < 2e-5
    with np.errstate(divide="ignore"):
        x = np.log(weights)  # -inf for the zero weights
    x -= x.max()
    nucleus = Nucleus(x.copy(), 0.6)
    kept = nucleus.kept()
    counts = np.bincount([nucleus.draw(u) for u in grid[::10]], minlength=5000)
    share = np.zeros(5000)
    share[kept] = weights[kept] / weights[kept].sum()
    assert np.abs(counts / len(grid[::10]) - share).max() < 2e-4 and counts[weights == 0].sum() == 0
