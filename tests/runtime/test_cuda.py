"""GPU paths: skipped with the reason on machines without a CUDA GPU (CI has none; run these on
the GPU host). The CPU-side argument checks run everywhere."""

from __future__ import annotations

import pytest
import torch

from llmexport import LLMExportError
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
gpu = pytest.mark.gpu
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 24, 25]]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def _ort_cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_cuda_graph_needs_device_cuda(bundle_factory):
    from llmexport.runtime.bundle import Bundle
    from llmexport.runtime.backends.torch import TorchBackend

    bundle_dir, _ = bundle_factory("llama3", "ort")
    with pytest.raises(LLMExportError, match="CUDA graphs need --device cuda"):
        TorchBackend(Bundle.open(bundle_dir), "cpu", cuda_graph=True)


@gpu
@needs_cuda
def test_torch_cuda_graph_decode_equals_eager(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort", "float16")
    tokens = []
    for graph in (False, True):
        with Session(bundle_dir, backend="torch", device="cuda", cuda_graph=graph) as session:
            tokens.append(session.generate(PROMPTS, GREEDY).token_ids)
            tokens.append(session.generate(PROMPTS, GREEDY).token_ids)  # replays the captured graphs
    assert tokens[0] == tokens[1] == tokens[2] == tokens[3]


@gpu
@needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not _ort_cuda_available(),
                    reason="needs onnxruntime-gpu and a CUDA GPU")
def test_onnxruntime_cuda_greedy_equals_the_torch_reference(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort", "float16")
    with Session(bundle_dir, backend="torch", device="cuda") as reference:
        want = reference.generate(PROMPTS, GREEDY).token_ids
    with Session(bundle_dir, backend="onnxruntime", device="cuda") as session:
        addresses = session.backend.cache_addresses()
        assert session.generate(PROMPTS, GREEDY).token_ids == want
        assert session.generate(PROMPTS, GREEDY).token_ids == want  # a second run on the same buffers
        assert session.backend.cache_addresses() == addresses
