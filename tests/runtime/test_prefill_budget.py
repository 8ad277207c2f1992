"""The engine's prefill budget while others decode: set by time (about `stall` decode steps of
prefill per iteration), between a floor and the prefill_chunk ceiling."""

from __future__ import annotations

import pytest

from llmexport import LLMExportError
from llmexport.runtime.prefill_budget import PrefillBudget
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session


def _settle(budget: PrefillBudget, fixed: float, per_token: float, decode: float, rounds: int = 30) -> int:
    """Feed the budget a backend whose prefill of n tokens takes fixed + per_token * n."""
    for _ in range(rounds):
        budget.decoded(decode)
        n = budget.tokens()
        budget.prefilled(n, fixed + per_token * n)
    return budget.tokens()


def test_before_any_measurement_the_budget_is_the_ceiling():
    assert PrefillBudget(256).tokens() == 256


@pytest.mark.parametrize("stall", [0.5, 1.0, 2.0])
def test_the_budget_converges_to_the_chunk_whose_prefill_takes_stall_decode_steps(stall):
    """A 0.5B model on two cores: 70 ms per call (weights) + 1.4 ms per token, decode 100 ms."""
    n = _settle(PrefillBudget(256, stall), fixed=0.070, per_token=0.0014, decode=0.100)
    want = max(16.0, min(256.0, (stall * 0.100 - 0.070) / 0.0014))  # 16 (the floor), 21.4, 92.9
    assert abs(n - want) <= 1, (n, want)
    # the iteration's prefill then takes about stall decode steps (or the floor's time)
    assert 0.070 + 0.0014 * n <= max(stall * 0.100, 0.070 + 0.0014 * 16) * 1.02


def test_a_prefill_slower_than_the_target_shrinks_to_the_floor_and_a_fast_one_to_the_ceiling():
    assert _settle(PrefillBudget(256, 1.0, floor=16), fixed=0.300, per_token=0.001, decode=0.050) == 16
    assert _settle(PrefillBudget(256, 1.0), fixed=0.0001, per_token=1e-6, decode=0.010) == 256
    assert PrefillBudget(5, floor=16).floor == 5  # never above the ceiling


def test_a_non_positive_stall_is_an_error():
    with pytest.raises(LLMExportError, match="prefill_stall"):
        PrefillBudget(256, 0.0)


def test_the_engine_prefills_a_long_prompt_in_budget_sized_chunks_while_others_decode(bundle_factory):
    """The engine asks the budget each iteration: a 40-token prompt arriving while another request
    decodes goes in chunks of at most the budget's answer, and both get their tokens alone."""
    bundle_dir, _ = bundle_factory("llama3", "ort")
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    long_prompt = list(range(3, 43))
    with Session(bundle_dir, prompt_reuse=False) as session:  # every prompt computed, not found in a row
        alone = [session.generate([p], params).token_ids[0] for p in ([5, 6, 7], long_prompt)]
        engine, real = session.engine, session.backend.step
        engine.prefill_budget.tokens = lambda: 7
        widths = []

        def recording(phase, ids, positions, lengths, rows, **kwargs):
            if phase == "prefill":
                widths.append(ids.shape[1])
            return real(phase, ids, positions, lengths, rows, **kwargs)

        session.backend.step = recording
        first = engine.submit([5, 6, 7], params)
        engine.step()  # prefilled whole (nothing was decoding), first token sampled
        second = engine.submit(long_prompt, params)
        while engine.busy:
            engine.step()
        assert widths == [3] + [7] * 5 + [5]
        assert [first.tokens, second.tokens] == alone


def test_while_others_decode_an_iteration_makes_at_most_one_prefill_call(bundle_factory):
    """Two long prompts arriving while a request decodes are prefilled one call per iteration
    (each call reads every weight: a second one would stall the decoding request twice), and
    every request gets its alone tokens."""
    bundle_dir, _ = bundle_factory("llama3", "ort")
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(3, 33)), list(range(40, 75))]
    with Session(bundle_dir, prefill_chunk=64, prompt_reuse=False) as session:  # every prompt computed
        alone = [session.generate([p], params).token_ids[0] for p in prompts]
        engine, real = session.engine, session.backend.step
        engine.prefill_budget.tokens = lambda: 25
        calls = []

        def recording(phase, *args, **kwargs):
            calls[-1].append(phase)
            return real(phase, *args, **kwargs)

        session.backend.step = recording
        requests = [engine.submit(prompts[0], params)]
        calls.append([])
        engine.step()
        requests += [engine.submit(p, params) for p in prompts[1:]]
        while engine.busy:
            calls.append([])
            engine.step()
        assert max(c.count("prefill") for c in calls) == 1
        assert sum(c.count("prefill") for c in calls) == 1 + 2 + 2  # 3 whole; 30 = 25 + 5; 35 = 25 + 10
        assert [r.tokens for r in requests] == alone
