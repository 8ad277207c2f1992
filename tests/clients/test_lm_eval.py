"""lm-evaluation-harness against `llmexport serve` on SmolLM2-135M-Instruct, run as its docs say:
`local-completions` (token-id prompts; log-likelihoods from echo + logprobs) on a multiple-choice
task and a generative task, and `local-chat-completions` with the chat template on the generative
one. The tasks are tests/data/lm_eval/*.yaml over 16 capital-city questions; nothing is
downloaded. One log-likelihood the harness computed is checked against the model's own logits."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import numpy as np
import pytest

from tests.clients.conftest import MAX_SEQ_LEN, ROOT, log_softmax

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

pytestmark = pytest.mark.slow

TASKS = ROOT / "tests" / "data" / "lm_eval"
MC, GEN = "llmexport_capitals_mc", "llmexport_capitals_gen"
ITEMS = 16


@contextmanager
def _in_root():
    """The tasks' data_files are relative to the working directory, as for a user in the checkout."""
    before = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(before)


def _evaluate(model: str, model_args: str, tasks: list[str], **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    with _in_root():
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                       task_manager=TaskManager(include_path=str(TASKS)), **kwargs)


@pytest.fixture(scope="module")
def completions(smollm2) -> dict:
    """Both tasks through local-completions, four requests per HTTP call (a list of token-id prompts)."""
    args = (f"model={smollm2.name},base_url={smollm2.url}/completions,tokenizer_backend=huggingface,"
            f"tokenizer={smollm2.checkpoint},max_length={MAX_SEQ_LEN},max_retries=1")
    return _evaluate("local-completions", args, [MC, GEN], batch_size=4)


def _in_unit_interval(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_the_multiple_choice_task_gets_real_accuracies(completions):
    metrics = completions["results"][MC]
    assert metrics["sample_len"] == ITEMS
    assert _in_unit_interval(metrics["acc,none"]) and _in_unit_interval(metrics["acc_norm,none"])
    assert metrics["acc,none"] > 0.25  # better than guessing among four: the scores are the model's
    for sample in completions["samples"][MC]:
        scores = [logprob for logprob, _ in sample["filtered_resps"]]
        assert len(scores) == 4 and all(math.isfinite(s) and s < 0 for s in scores)


def test_the_generative_task_gets_answers(completions):
    metrics = completions["results"][GEN]
    assert metrics["sample_len"] == ITEMS and _in_unit_interval(metrics["exact_match,none"])
    answers = [sample["filtered_resps"][0] for sample in completions["samples"][GEN]]
    assert all(isinstance(a, str) and a.strip() and "\n" not in a for a in answers)  # cut at the stop string
    assert metrics["exact_match,none"] > 0


def test_a_harness_log_likelihood_is_the_log_softmax_of_the_models_logits(completions, smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.checkpoint)
    sample = completions["samples"][MC][0]
    (context, continuation), (harness, harness_greedy) = sample["arguments"][0], sample["filtered_resps"][0]
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    assert ids[:start] == tokenizer(context, add_special_tokens=False)["input_ids"]  # a clean split
    with log_softmax(smollm2.bundle) as log_probs:
        want = log_probs(ids)
    scored = range(start, len(ids))
    assert harness == pytest.approx(sum(want[j - 1, ids[j]] for j in scored), abs=1e-3)
    assert harness_greedy == all(int(np.argmax(want[j - 1])) == ids[j] for j in scored)


def test_local_chat_completions_runs_the_generative_task_with_the_chat_template(smollm2):
    args = f"model={smollm2.name},base_url={smollm2.url}/chat/completions,num_concurrent=2,max_retries=1"
    chat = _evaluate("local-chat-completions", args, [GEN], apply_chat_template=True)
    metrics = chat["results"][GEN]
    assert metrics["sample_len"] == ITEMS and _in_unit_interval(metrics["exact_match,none"])
    answers = [sample["filtered_resps"][0] for sample in chat["samples"][GEN]]
    assert all(isinstance(a, str) and a.strip() for a in answers)
    assert metrics["exact_match,none"] > 0
