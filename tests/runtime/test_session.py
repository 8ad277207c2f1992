"""The generation loop on bundles: parity with the reference and transformers, batching,
sampling, streaming, stopping, and in-place caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmexport.model.generate import reference_generate
from llmexport.model.weights import load_model
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

FAMILIES = ["llama2", "llama3", "qwen2"]
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 24, 25]]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def _transformers_generate(ckpt, prompt, n):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      attention_mask=torch.ones_like(ids), pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_reference_and_transformers_alone_and_batched(bundle_factory, family, target):
    bundle_dir, ckpt = bundle_factory(family, target)
    reference = load_model(ckpt, max_seq_len=64)
    with Session(bundle_dir) as session:
        batched = session.generate(PROMPTS, GREEDY).token_ids
        for row, prompt in enumerate(PROMPTS):
            alone = session.generate(prompt, GREEDY).token_ids[0]
            expected = _transformers_generate(ckpt, prompt, 24)
            assert alone == expected == batched[row], f"{family}/{target} prompt {row}"
            assert reference_generate(reference, [prompt], 24) == [expected]


def test_decode_graph_and_shared_cpu_session_agree(bundle_factory):
    from llmexport.runtime.bundle import Bundle
    from llmexport.runtime.backends.onnxruntime import OnnxRuntimeBackend

    bundle_dir, _ = bundle_factory("llama3", "ort")
    ids, positions = np.array([[5, 6, 7]]), np.array([[0, 1, 2]])
    outputs = []
    for decode_graph in (True, False):
        with OnnxRuntimeBackend(Bundle.open(bundle_dir), decode_graph=decode_graph) as backend:
            assert (backend._sessions["decode"] is backend._sessions["prefill"]) != decode_graph
            logits = [backend.step("prefill", ids, positions, np.array([3]), range(1))]
            for n in range(3, 8):
                logits.append(backend.step("decode", np.array([[n]]), np.array([[n]]), np.array([n + 1]), range(1)))
            outputs.append(np.stack(logits))
            assert not np.array_equal(logits[-1], logits[-2])  # each step's own logits, not a reused buffer
            # copy=False (the engine's): the backend's one logits buffer, equal to the copied logits
            lean = [backend.step("decode", np.array([[n]]), np.array([[n]]), np.array([n + 1]), range(1), copy=False)
                    for n in (8, 9)]
            assert np.shares_memory(lean[0], lean[1]) and np.array_equal(lean[1], backend.step(
                "decode", np.array([[9]]), np.array([[9]]), np.array([10]), range(1)))
    assert np.abs(outputs[0] - outputs[1]).max() < 1e-5


def test_seeded_sampling_is_reproducible(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2,
                            seed=11, ignore_eos=True)
    with Session(bundle_dir) as session:
        first = session.generate(PROMPTS, params).token_ids
        assert session.generate(PROMPTS, params).token_ids == first
        other = SamplingParams(**{**params.__dict__, "seed": 12})
        assert session.generate(PROMPTS, other).token_ids != first


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_decode_never_moves_or_copies_the_cache(bundle_factory, target):
    bundle_dir, _ = bundle_factory("llama3", target)
    with Session(bundle_dir) as session:
        addresses = session.backend.cache_addresses()
        in_place = session.bundle.cache_in_place
        assert in_place == (target == "ort")
        for _ in session.stream([PROMPTS[0]], SamplingParams(max_new_tokens=8, ignore_eos=True)):
            assert session.backend.cache_addresses() == addresses
        # In place: the one buffer set holds the whole sequence (3 prompt + 7 decoded tokens).
        key0 = session.backend.cache_arrays(range(1))[0][0]  # (Hkv, T, D) of row 0, layer 0
        written = np.flatnonzero(np.abs(key0).sum(axis=(0, 2)))
        assert written.tolist() == list(range(10))


def test_streaming_text_and_stop_strings(bundle_factory):
    bundle_dir, _ = bundle_factory("llama2", "ort")
    with Session(bundle_dir) as session:
        result = session.generate("w5 w6 w7", SamplingParams(max_new_tokens=12, ignore_eos=True))
        words = result.text[0].split()
        assert words == [f"w{t}" for t in result.token_ids[0] if t > 2]  # 0-2 are special tokens
        deltas = [e.text for e in session.stream("w5 w6 w7", SamplingParams(max_new_tokens=12, ignore_eos=True))]
        assert "".join(deltas) == result.text[0]
        stop = words[3]
        stopped = session.generate("w5 w6 w7", SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,)))
        assert stopped.finish_reason == ["stop"]
        assert stop not in stopped.text[0] and result.text[0].startswith(stopped.text[0])


def test_eos_and_length_and_max_seq_len_stops(bundle_factory):
    bundle_dir, _ = bundle_factory("qwen2", "ort")
    with Session(bundle_dir) as session:
        free = session.generate(PROMPTS[0], SamplingParams(max_new_tokens=10, ignore_eos=True))
        assert free.finish_reason == ["length"] and len(free.token_ids[0]) == 10
        eos = free.token_ids[0][4]
        hit = session.generate(PROMPTS[0], SamplingParams(max_new_tokens=10, eos_token_ids=(eos,)))
        assert hit.finish_reason == ["eos"] and hit.token_ids[0][-1] == eos
        assert hit.token_ids[0] == free.token_ids[0][: hit.token_ids[0].index(eos) + 1]
        long = session.generate(list(range(3, 63)), SamplingParams(max_new_tokens=50, ignore_eos=True))
        assert long.finish_reason == ["max_seq_len"] and len(long.token_ids[0]) == 64 - 60 + 1
