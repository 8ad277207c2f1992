"""Backend.copy_row: a prompt prefilled once in one KV row serves another row (n > 1, a shared
system prompt). After the copy, the destination decodes exactly as the source does, on every
backend, target (in place or two cache sets) and dtype."""

from __future__ import annotations

import numpy as np
import pytest

from llmexport import LLMExportError
from llmexport.runtime.backends.onnxruntime import OnnxRuntimeBackend
from llmexport.runtime.backends.torch import TorchBackend
from llmexport.runtime.bundle import Bundle

PREFILL, DECODE = "prefill", "decode"
PROMPT = np.array([[5, 17, 33, 9, 120, 77]])  # copied from row 0
OTHER = np.array([[40, 41, 42, 43, 44, 45, 46, 47, 48]])  # what row 2 held before: longer, different
BACKENDS = {
    "onnxruntime": lambda bundle: OnnxRuntimeBackend(bundle, cache_rows=3),
    "onnxruntime-device-path": lambda bundle: OnnxRuntimeBackend(bundle, cache_rows=3, device_path=True),
    "torch": lambda bundle: TorchBackend(bundle, cache_rows=3),
}


@pytest.fixture(params=["ort", "portable"])
def target(request):
    return request.param


@pytest.fixture(params=["float32", "float16"])
def dtype(request):
    return request.param


@pytest.fixture(params=list(BACKENDS))
def backend(request, bundle_factory, target, dtype):
    with BACKENDS[request.param](Bundle.open(bundle_factory("llama3", target, dtype)[0])) as backend:
        yield backend


def _prefill(backend, ids: np.ndarray, row: int, start: int = 0) -> None:
    n = ids.shape[1]
    backend.step(PREFILL, ids, np.arange(start, start + n)[None], np.array([start + n]), range(row, row + 1))


def _fill_rows(backend) -> None:
    """Row 2 holds another prompt (prefilled in two chunks: with two cache sets it ends in the
    other set from row 0's), then row 0 holds PROMPT."""
    _prefill(backend, OTHER[:, :4], 2)
    _prefill(backend, OTHER[:, 4:], 2, start=4)
    _prefill(backend, PROMPT, 0)


def _decode(backend, row: int) -> np.ndarray:
    n = PROMPT.shape[1]
    return backend.step(DECODE, np.array([[200]]), np.array([[n]]), np.array([n + 1]), range(row, row + 1))


def test_a_copied_row_decodes_like_its_source(backend):
    n = PROMPT.shape[1]
    _fill_rows(backend)
    backend.copy_row(0, 2, n)
    for key, value in zip(backend.cache_arrays(range(0, 1), n), backend.cache_arrays(range(2, 3), n)):
        np.testing.assert_array_equal(value, key)
    np.testing.assert_array_equal(_decode(backend, 2), _decode(backend, 0))


def test_the_copy_leaves_later_slots_alone(backend):
    n = PROMPT.shape[1]
    _fill_rows(backend)
    before = backend.cache_arrays(range(2, 3))
    backend.copy_row(0, 2, n)
    for was, now in zip(before, backend.cache_arrays(range(2, 3))):
        np.testing.assert_array_equal(now[:, :, n:], was[:, :, n:])


@pytest.mark.parametrize("src, dst, length, message", [
    (0, 3, 4, r"cache row 3 is outside the 3 allocated rows 0\.\.2"),
    (-1, 1, 4, r"cache row -1 is outside"),
    (0, 1, 65, r"cannot copy 65 cache slots: a row holds 0\.\.64"),
    (0, 1, -1, r"cannot copy -1 cache slots"),
])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_rows_outside_the_allocation_or_too_many_slots_are_errors(bundle_factory, name, src, dst, length, message):
    bundle = Bundle.open(bundle_factory("llama3", "ort")[0])  # max_seq_len 64
    with BACKENDS[name](bundle) as backend, pytest.raises(LLMExportError, match=message):
        backend.copy_row(src, dst, length)
