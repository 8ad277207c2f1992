"""Prompt reuse (runtime/kv_rows.py): a request that starts with tokens a row's cache holds
prefills only the rest, and gives exactly the tokens a fresh row gives; scoring shares the
engine with generation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from llmexport.runtime.evaluate import perplexity
from llmexport.runtime.kv_rows import KVRows
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


def _ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 250, size=n).tolist()


def _fresh(bundle, prompts, params=GREEDY) -> list[list[int]]:
    with Session(bundle, prompt_reuse=False) as session:
        return [session.generate([p], params).token_ids[0] for p in prompts]


@pytest.mark.parametrize("target, dtype", [("ort", "float32"), ("portable", "float32"), ("ort", "float16"),
                                           ("portable", "float16")])
def test_a_reused_row_gives_the_tokens_of_a_fresh_row(bundle_factory, target, dtype):
    bundle, _ = bundle_factory("qwen2", target, dtype)
    first = _ids(1, 20)
    with Session(bundle) as session:
        out = session.generate([first], GREEDY).token_ids[0]
        prompts = {
            "the same prompt again": first,
            "longer than the kept row": first + out + _ids(2, 5),
            "diverges inside the kept prefix": first[:9] + _ids(3, 7),
            "a new conversation": _ids(4, 12),
        }
        got, reused = {}, {}
        for name, prompt in prompts.items():
            before = session.engine.stats["reused_prompt_tokens"]
            got[name] = session.generate([prompt], GREEDY).token_ids[0]
            reused[name] = session.engine.stats["reused_prompt_tokens"] - before
    want = dict(zip(prompts, _fresh(bundle, list(prompts.values()))))
    assert got == want
    assert reused["the same prompt again"] == len(first) - 1  # all but the token whose logits are sampled
    assert reused["longer than the kept row"] == len(first) + len(out) - 1  # the last output token was never fed
    assert reused["diverges inside the kept prefix"] == 9
    assert reused["a new conversation"] == 0


def test_prompts_sharing_a_prefix_compute_it_once_and_match_fresh_rows(bundle_factory):
    bundle, _ = bundle_factory("qwen2", "ort")
    system = _ids(5, 30)
    prompts = [system + _ids(10 + i, 4) for i in range(3)]
    with Session(bundle) as session:
        result = session.generate(prompts, GREEDY)
        stats = session.engine.stats
    assert result.token_ids == _fresh(bundle, prompts)
    assert stats["row_copies"] == 2 and stats["reused_prompt_tokens"] == 2 * len(system)
    assert stats["prompt_tokens"] - stats["reused_prompt_tokens"] == len(system) + 3 * 4


def test_scoring_and_generation_on_one_session_give_their_alone_results(bundle_factory):
    bundle, _ = bundle_factory("qwen2", "ort")
    text = _ids(6, 150)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompt = _ids(7, 10)
    with Session(bundle) as session:
        alone_tokens = session.generate([prompt], params).token_ids[0]
        alone_nll = perplexity(session, text, window=48).mean_nll
    with Session(bundle) as session:
        session.engine.start()
        generated = {}
        thread = threading.Thread(target=lambda: generated.update(r=session.generate([prompt], params)))
        thread.start()
        while not session.engine.running:  # generation holds a row before scoring starts
            time.sleep(0.001)
        together = perplexity(session, text, window=48)
        overlapped = thread.is_alive()  # scoring took a few of the generation's 40 iterations
        thread.join()
    assert overlapped
    assert generated["r"].token_ids[0] == alone_tokens
    assert together.mean_nll == pytest.approx(alone_nll, rel=1e-5)


def test_rows_prefer_a_kept_prefix_then_empty_rows_then_the_least_recently_freed():
    rows = KVRows(3, max_seq_len=64)
    a, b = rows.take("a", [1, 2, 3]), rows.take("b", [7, 8])
    assert (a.row, a.cached, b.row) == (0, 0, 1)
    rows.wrote(0, 0, [1, 2, 3, 4])
    rows.wrote(1, 0, [7, 8, 9])
    rows.free(0)
    rows.free(1)
    follow = rows.take("c", [1, 2, 3, 4, 5, 6])  # a's row holds its start
    assert (follow.row, follow.cached, follow.copy_from) == (0, 4, None)
    other = rows.take("d", [50, 51])  # no match: the empty row
    assert other.row == 2 and other.cached == 0
    partial = rows.take("e", [7, 8, 20, 21])  # b's kept row shares two tokens: taken in place (no empty row left)
    assert (partial.row, partial.cached) == (1, 2)
    assert rows.take("f", [1]) is None  # every row held


def test_a_partial_prefix_is_copied_so_the_kept_row_keeps_its_tokens():
    rows = KVRows(3, max_seq_len=64)
    rows.take("a", [1, 2, 3, 4])
    rows.wrote(0, 0, [1, 2, 3, 4, 5])
    rows.free(0)
    lease = rows.take("b", [1, 2, 9, 9, 9])
    assert (lease.row, lease.cached, lease.copy_from) == (1, 2, 0)
    assert rows.tokens(0) == [1, 2, 3, 4, 5] and rows.tokens(1) == [1, 2]


def test_a_kept_row_leaves_the_decode_window_a_spare_slot():
    rows = KVRows(1, max_seq_len=8)
    rows.take("a", [])
    rows.wrote(0, 0, list(range(8)))
    rows.free(0)
    assert rows.tokens(0) == list(range(7)) and rows.spare_slot(0) == 7
