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
    """Nucleus sorts only the tokens of the bin where the mass crosses top_p; on random rows, with
    ties and without, peaked and flat, it keeps exactly what a stable sort of the row keeps, and
    draws only kept tokens; the sampler's rejection test (_in_nucleus) agrees token by token."""
    from llmexport.runtime.sampling import Nucleus, _in_nucleus

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
        # the rejection test of one token: the boundary tokens in sorted order, and random ones
        probs = np.exp(x)
        order = np.argsort(-probs, kind="stable")
        edge = len(want)
        tokens = set(order[max(0, edge - 3): edge + 3].tolist()) | set(rng.integers(0, len(x), 10).tolist())
        total = float(probs.sum(dtype=np.float64))
        for token in tokens:
            inside = _in_nucleus(probs, token, top_p, total, np.empty(len(x), np.float32))
            assert inside == (token in set(want.tolist())), (trial, token)


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


def test_chunk_sums_over_the_padded_workspace_equal_reduceat():
    """The sampler sums its rows' chunks as rows of the zero-padded workspace buffer; that gives
    the draws of numpy's reduceat over the unpadded row (a vocabulary not a multiple of the chunk
    width, its last chunk short), and a row that is not the buffer's head falls back to reduceat."""
    from llmexport.runtime.sampling import _Chunks, _workspace

    rng = np.random.default_rng(3)
    work = _workspace(151_936)
    work.x[:] = rng.random(151_936).astype(np.float32) ** 8
    padded, plain = _Chunks(work.x, work.padded_x), _Chunks(work.x.copy())
    assert len(padded.cumulative) == len(plain.cumulative) == 149
    assert np.allclose(padded.cumulative, plain.cumulative, rtol=1e-6)
    assert all(padded.draw(u) == plain.draw(u) for u in rng.random(200))
    work.x[0] = 1000.0  # a row starting past the buffer's head must not be summed from the head
    shifted = _Chunks(work.x[1:], work.padded_x)
    assert np.isclose(shifted.total, work.x[1:].sum(dtype=np.float64), rtol=1e-6)


def test_top_p_draws_follow_the_nucleus_weights():
    """The sampler draws top-p by rejection from the whole row, building the nucleus only after
    TRIES rejections; either way each kept token comes with its renormalised weight. A small
    top_p on a flat row forces the fallback most of the time, a large one almost never."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=40).astype(np.float32)
    probs = np.exp(logits - logits.max())
    order = np.argsort(-probs, kind="stable")
    for top_p in (0.9, 0.3, 0.04):
        before = np.cumsum(probs[order], dtype=np.float64) - probs[order]
        kept = order[before < top_p * probs.sum(dtype=np.float64)]
        want = np.zeros(40)
        want[kept] = probs[kept] / probs[kept].sum()
        sampler = Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=5))
        n = 30_000
        got = np.bincount([sampler(logits) for _ in range(n)], minlength=40) / n
        assert got[want == 0].sum() == 0, top_p
        assert np.abs(got - want).max() < 4 * np.sqrt(want.max() / n), (top_p, np.abs(got - want).max())


def test_presence_and_frequency_penalties_follow_openai_on_generated_tokens_only():
    """OpenAI: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counting generated
    tokens (the prompt is not penalised); then the temperature."""
    rng = np.random.default_rng(2)
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=0.4)
    for _ in range(50):
        logits = rng.normal(size=300).astype(np.float32)
        sampler = Sampler(params, seen=rng.integers(0, 300, size=20).tolist())  # a prompt: not penalised
        out = rng.integers(0, 300, size=int(rng.integers(1, 40))).tolist()
        for t in out:
            sampler.generated(t)
        ids, counts = np.unique(out, return_counts=True)
        want = logits.astype(np.float64)
        want[ids] -= counts * 0.4 + 0.7
        assert sampler(logits) == int(np.argmax(want))


def test_logit_bias_is_added_before_the_temperature():
    logits = np.array([3.0, 2.0, 0.0, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(logit_bias=((3, 4.5),)))(logits) == 3
    assert _draws(SamplingParams(temperature=1.0, logit_bias=((0, -100.0), (1, -100.0))), logits=logits[None]) == {2, 3}


def test_a_mask_keeps_every_draw_inside_it_even_far_below_the_top():
    logits = np.array([0.0, -200.0, -300.0, 5.0], dtype=np.float32)

    def mask(x):
        x[[0, 3]] = -np.inf  # only the two tokens far below the (masked) top remain

    for params in (SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.9),
                   SamplingParams(temperature=1.0, top_k=3)):
        sampler = Sampler(params, mask=mask)
        assert {sampler(logits) for _ in range(100)} <= {1, 2}
    assert logits[3] == 5.0  # the caller's row is left as it is


def test_out_of_range_penalties_and_biases_are_refused():
    import pytest

    from llmexport import LLMExportError

    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"logit_bias": ((1, 101.0),)},
                {"logprobs": 21}):
        with pytest.raises(LLMExportError):
            SamplingParams(**bad)
