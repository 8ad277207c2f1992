"""Real context lengths: every target exports at 4096 and 8192 tokens (the presets used
elsewhere cap at 256), and a 4096-token ort bundle generates past its first 1024 slots."""

from __future__ import annotations

import pytest

from llmexport.exporter.export import export_bundle
from llmexport.exporter.targets import TARGETS
from llmexport.model.config import with_overrides
from llmexport.model.presets import get_preset
from llmexport.model.weights import ModelSource
from llmexport.runtime.bundle import Bundle
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

LONG = ModelSource("tiny-llama-8k", with_overrides(get_preset("tiny-llama3"), max_position_embeddings=8192))


@pytest.mark.slow
@pytest.mark.parametrize("max_seq_len", [4096, 8192])
@pytest.mark.parametrize("target", TARGETS)
def test_every_target_exports_at_real_lengths(tmp_path, target, max_seq_len):
    bundle = Bundle.open(export_bundle(LONG, tmp_path / "b", target=target, max_seq_len=max_seq_len, max_batch=2))
    assert bundle.max_seq_len == max_seq_len and bundle.kv.max_seq_len == max_seq_len
    # Graph files do not grow with the context: nothing of size max_seq_len was folded into them.
    assert all(bundle.graph_path(p).stat().st_size < 200_000 for p in ("prefill", "decode"))


@pytest.mark.slow
def test_a_4096_token_bundle_decodes_past_1024(tmp_path):
    out = export_bundle(LONG, tmp_path / "b", target="ort", max_seq_len=4096, max_batch=1)
    with Session(out) as session:
        result = session.generate([list(range(3, 253)) * 5], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert len(result.token_ids[0]) == 8 and result.finish_reason == ["length"]
