"""Session.close lets go of the bundle's memory even while the Session object is still
referenced (`with Session(...) as s:` keeps `s` alive after the block)."""

from __future__ import annotations

import pytest

from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_close_drops_the_weights_map_and_the_backend_state(bundle_factory, backend):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    with Session(bundle_dir, backend=backend) as session:
        session.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2, ignore_eos=True))
        assert "weights" in session.bundle.__dict__  # the memory map, cached on the bundle
    assert "weights" not in session.bundle.__dict__
    state = session.backend.__dict__
    if backend == "onnxruntime":
        assert not state["_sessions"] and not state["_weights"] and not state["_caches"]
    else:
        assert state["model"] is None and not state["k"]
    assert session.bundle.weights  # reading the weights again maps them again
