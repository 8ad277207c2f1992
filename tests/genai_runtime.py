"""onnxruntime-genai's Python API driving a bundle, and our Session beside it: the greedy tokens
tests compare (tests/exporter/test_genai_compat.py, tests/real_model/test_smollm2.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session


def genai_greedy(bundle_dir, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """onnxruntime-genai's greedy continuation of each prompt, the batch right-padded with
    genai_config.json's pad_token_id and run together: each row's tokens after the padded prompt."""
    import onnxruntime_genai as og

    pad = json.loads((Path(bundle_dir) / "genai_config.json").read_text())["model"]["pad_token_id"]
    model = og.Model(str(bundle_dir))
    params = og.GeneratorParams(model)
    width = max(map(len, prompts))
    params.set_search_options(do_sample=False, repetition_penalty=1.0, max_length=width + new_tokens,
                              batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([p + [pad] * (width - len(p)) for p in prompts], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [np.asarray(generator.get_sequence(i))[width:].tolist() for i in range(len(prompts))]


def ours_greedy(bundle_dir, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    with Session(bundle_dir) as session:
        return session.generate(prompts, SamplingParams(max_new_tokens=new_tokens)).token_ids


def same_until_eos(genai: list[int], ours: list[int], eos) -> bool:
    """The same tokens up to the first EOS (either stopping without the other is a difference).
    ours ends with the EOS it stops on; genai drops it when a lone sequence ends, and pads a row
    of a batch after it until every row is done."""
    def cut(tokens: list[int]) -> list[int]:
        return tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]

    return cut(genai) == cut(ours)
