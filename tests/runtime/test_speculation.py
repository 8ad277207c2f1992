"""Speculative decoding by prompt lookup: the output is exactly plain decoding's (greedy, and
seeded sampling: the same draws in the same order), on ort and portable, float32 and int4; the
cache a row keeps holds exactly the keys and values plain decoding writes."""

from __future__ import annotations

import numpy as np
import pytest

from llmexport.exporter.quantize import QuantConfig
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session
from llmexport.runtime.speculation import Acceptance, PromptLookup, SpeculationConfig, SpeculationCost

REPEATING = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7]
PLAIN_PROMPT = [40, 3, 91, 17, 200, 64]
CASES = [("ort", "float32", None), ("portable", "float32", None), ("ort", "float32", QuantConfig("int4")),
         ("portable", "float16", None)]


def _run(bundle, prompts, params, speculative: bool, always: bool = True):
    with Session(bundle, speculative="ngram" if speculative else None, speculative_tokens=4,
                 prompt_reuse=False) as session:
        if always:  # verify whenever there are proposals: these tests are about correctness, not cost
            session.engine.speculation_cost.worth_it = lambda *args: True
        result = session.generate(prompts, params)
        return result.token_ids, dict(session.engine.stats)


@pytest.mark.parametrize("target, dtype, quant", CASES, ids=lambda v: getattr(v, "method", v))
def test_greedy_output_is_plain_decodings(bundle_factory, target, dtype, quant):
    extra = {"quant": quant} if quant else {}
    bundle, _ = bundle_factory("qwen2", target, dtype, **extra)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    for prompts in ([REPEATING], [PLAIN_PROMPT], [REPEATING, PLAIN_PROMPT, REPEATING[3:]]):
        plain, _ = _run(bundle, prompts, params, speculative=False)
        fast, stats = _run(bundle, prompts, params, speculative=True)
        assert fast == plain
    assert stats["speculative_calls"] > 0 and stats["accepted_tokens"] > 0  # the path ran and kept proposals


def test_seeded_sampling_uses_the_same_draws(bundle_factory):
    bundle, _ = bundle_factory("qwen2", "ort")
    for seed in range(8):
        params = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.95, seed=seed, ignore_eos=True)
        plain, _ = _run(bundle, [REPEATING], params, speculative=False)
        fast, _ = _run(bundle, [REPEATING], params, speculative=True)
        assert fast == plain


def test_the_kept_cache_equals_plain_decodings(bundle_factory):
    """Rejected proposals' keys and values lie past the row's length: every slot the row counts
    as its own holds what plain decoding wrote there."""
    bundle, _ = bundle_factory("qwen2", "ort")
    params = SamplingParams(max_new_tokens=25, ignore_eos=True)
    caches = []
    for speculative in (False, True):
        with Session(bundle, speculative="ngram" if speculative else None, speculative_tokens=4) as session:
            session.engine.speculation_cost.worth_it = lambda *args: True
            out = session.generate([REPEATING], params).token_ids[0]
            length = session.engine.rows.length(0)
            assert length == len(REPEATING) + len(out) - 1  # the last token was sampled, never fed
            caches.append(session.backend.cache_arrays(range(1), length))
        if speculative:
            assert session.engine.stats["accepted_tokens"] > 0
    for plain, fast in zip(*caches):
        np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-5)


def test_prompt_lookup_proposes_what_followed_the_latest_longest_match():
    lookup = PromptLookup(SpeculationConfig(max_ngram=3), [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3])
    assert lookup.propose(2) == [7, 8]  # "2 3" last seen before the suffix at 6..7, followed by 7 8
    lookup.extend([7])
    assert lookup.propose(5) == [8, 2, 3, 7]  # "2 3 7" at 6..8: what followed, up to the end
    assert PromptLookup(SpeculationConfig(), [1, 2, 3]).propose(4) == []  # nothing repeats


def test_the_cost_model_verifies_only_when_it_pays():
    cost = SpeculationCost()
    assert cost.worth_it(1, [(0.5, 4)], 0, 0)  # unmeasured: try it
    cost.decoded(1, 0.100)
    cost.verified(5, 0.110)
    assert cost.worth_it(1, [(0.6, 4)], 0, 0)  # 1 + .6 + .36 + ... = 2.3 tokens in 0.11 s > 1 in 0.10
    assert not cost.worth_it(1, [(0.0, 4)], 0, 0)  # nothing accepted: 1 token in 0.11 s
    cost.decoded(4, 0.130)
    assert not cost.worth_it(4, [(0.6, 4)] * 4, 0, 0)  # 4 calls of 0.11 s against one batched step
    rate = Acceptance()
    rate.update(4, 4)
    rate.update(4, 0)
    assert 0 < rate.rate < 1 and (rate.proposed, rate.accepted) == (8, 4)


def test_a_draft_model_keeps_plain_decodings_output(bundle_factory):
    """A draft with the same tokenizer proposes greedily: itself (every proposal accepted) and
    another model (most rejected); the output is plain decoding's either way."""
    target, _ = bundle_factory("qwen2", "ort")
    other, _ = bundle_factory("llama3", "ort")
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = [REPEATING, PLAIN_PROMPT]
    plain, _ = _run(target, prompts, params, speculative=False)
    for draft in (target, other):
        with Session(target, speculative="draft", draft=draft, speculative_tokens=4, prompt_reuse=False) as session:
            session.engine.speculation_cost.worth_it = lambda *args: True
            assert session.generate(prompts, params).token_ids == plain
            stats = session.engine.stats
        assert stats["speculative_calls"] > 0
        if draft == target:
            assert stats["accepted_tokens"] == stats["proposed_tokens"]  # the target agrees with itself


def test_bad_speculation_settings_are_one_line_errors(bundle_factory):
    from llmexport import LLMExportError

    target, _ = bundle_factory("qwen2", "ort")
    small, _ = bundle_factory("qwen2", "ort", max_batch=2)
    for kwargs, message in (({"speculative": "medusa"}, "not one of ngram, draft"),
                            ({"speculative": "draft"}, "needs a draft bundle"),
                            ({"draft": target}, "pass speculative='draft'"),
                            ({"speculative": "ngram", "speculative_tokens": 0}, "must be in 1..32"),
                            ({"speculative": "draft", "draft": small}, "re-export the draft with --max-batch 4")):
        with pytest.raises(LLMExportError, match=message):
            Session(target, **kwargs)


def test_the_cli_gives_the_same_tokens_with_speculation(bundle_factory):
    import json

    from tests.conftest import run_cli

    bundle, _ = bundle_factory("qwen2", "ort")
    ids = ",".join(str(t) for t in REPEATING)
    base = ["generate", "--bundle", str(bundle), "--token-ids", ids, "--max-new-tokens", "16", "--ignore-eos", "--json"]
    plain = run_cli(*base)
    fast = run_cli(*base, "--speculative", "ngram", "--speculative-tokens", "3")
    assert plain.returncode == fast.returncode == 0, fast.stderr
    assert json.loads(fast.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
    bad = run_cli(*base, "--speculative", "medusa")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "not one of ngram, draft" in bad.stderr


class _FixedBackend:
    """A backend whose every position has the same 4-token distribution: enough to count what
    speculative verification emits against what the distribution says."""

    name, run_s = "fixed", 0.0

    def __init__(self, probs):
        from types import SimpleNamespace

        self.logits = np.log(np.asarray(probs, dtype=np.float32))
        self.bundle = SimpleNamespace(max_seq_len=64, vocab_size=len(probs), max_batch=1)
        self.cache_rows = 1

    def step(self, phase, ids, positions, lengths, rows, copy=True, logits_at=None):
        shape = (ids.shape[0], logits_at.shape[1]) if logits_at is not None else (ids.shape[0],)
        return np.broadcast_to(self.logits, (*shape, len(self.logits))).copy()

    def copy_row(self, src, dst, length):
        pass


def test_verification_keeps_the_sampled_distribution_on_a_tiny_vocabulary():
    """Frequency test: every token is followed by 0 in the prompt, so after any token the proposal
    is 0; the model's distribution is fixed; each request's second token, always emitted by a
    verification (accepted proposal or correction), follows that distribution, not the proposals."""
    from llmexport.runtime.engine import Engine

    probs = [0.1, 0.2, 0.3, 0.4]
    engine = Engine(_FixedBackend(probs), speculation=SpeculationConfig(tokens=3), prompt_reuse=False)
    engine.speculation_cost.worth_it = lambda *args: True
    counts = np.zeros(4)
    for seed in range(3000):
        request = engine.submit([1, 0, 2, 0, 3, 0, 0, 0], SamplingParams(max_new_tokens=3, temperature=1.0, seed=seed))
        list(request)
        counts[request.tokens[1]] += 1
    assert engine.stats["speculative_calls"] == 3000 and engine.stats["accepted_tokens"] > 0
    expected = np.array(probs) * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, (counts, expected)  # 3 degrees of freedom: p = 0.001
