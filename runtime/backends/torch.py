"""The torch reference model as a backend, for comparison (imports torch; the ONNX Runtime path
does not). Weights come from the bundle's own weights.bin, so it runs exactly the exported
weights. Eager only: each step writes its new rows straight into the preallocated buffers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from llmexport import LLMExportError

from ..bundle import Bundle, kv
from ..bundle import names as io
from ..bundle.quant import unpack
from .base import Backend


class BundleSource:
    """A ModelSource-like view of a bundle's weights (what model.weights.load_model reads)."""

    def __init__(self, bundle: Bundle):
        from llmexport.model.config import ModelConfig

        self.bundle = bundle
        self.name = bundle.manifest.model.name
        self.config = ModelConfig.from_dict(bundle.config)

    def tensors(self, dtype: str) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
        """Views into the memory-mapped weights.bin where the dtype matches (no copy: ONNX Runtime
        maps the same pages), converted copies otherwise. Transposed weights stay transposed views:
        F.linear reads them in place."""
        import warnings

        import torch

        from llmexport.model.weights import TORCH_DTYPES

        stored = TORCH_DTYPES[self.bundle.dtype]
        quantization = self.bundle.quantization
        quantized = quantization.tensors if quantization else {}
        packed = {name for weight in quantized.values() for name in weight.stored}
        for name, array in self.bundle.weights.items():
            if name.startswith("rope_") or name in packed:
                continue  # rope: recomputed by the model; packed: dequantized below
            with warnings.catch_warnings():  # read-only mapping: the model never writes its weights
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.from_numpy(array).view(stored)
            name, stored_transposed = io.checkpoint_name(name)
            if stored_transposed:
                tensor = tensor.t()
            yield name, tensor.to(TORCH_DTYPES[dtype])
        weights = self.bundle.weights
        for name, weight in quantized.items():  # the exact weights the graphs compute with
            shift = weight.offsets or weight.zero_points  # the scheme's (see bundle/quant.py)
            offsets = weights[shift] if shift else None
            w = unpack(weights[weight.codes], weights[weight.scales], offsets, weight.scheme, weight.shape)
            yield name, torch.from_numpy(w).to(TORCH_DTYPES[dtype])


class TorchBackend(Backend):
    """The reference model on the bundle's weights, eager; on CUDA optionally with each decode
    shape captured once as a CUDA graph and replayed (`cuda_graph=True`, UNTESTED: no GPU here).
    Capture works because eager steps write the caches in place: a replay reads and writes the
    same buffers, and only the small token/position inputs are copied into fixed tensors."""

    def __init__(self, bundle: Bundle, device: str = "cpu", dtype: str | None = None, cuda_graph: bool = False,
                 cache_rows: int | None = None, threads: int | None = None, cache_len: int | None = None,
                 source=None):
        """`dtype` overrides the bundle's compute dtype (verify runs the reference in float32);
        `cache_len` allocates fewer cache slots than max_seq_len (the eager model needs only as
        many as the longest sequence it will see; verify uses this to stay small).
        `threads` sets torch's intra-op threads for the whole process (torch has no per-model knob).
        `source` (a model.weights.ModelSource) runs the model the bundle was exported from instead
        of the bundle's own weights (verify --model: finds weights damaged after export)."""
        super().__init__(bundle, cache_rows, threads)
        try:
            import torch
        except ImportError:
            raise LLMExportError("the torch backend needs torch; pip install torch") from None
        from llmexport.model.weights import TORCH_DTYPES, load_model

        if device not in ("cpu", "cuda"):
            raise LLMExportError(f"unknown device {device!r}; use cpu or cuda")
        if cuda_graph and device != "cuda":
            raise LLMExportError("CUDA graphs need --device cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise LLMExportError("device cuda needs a CUDA build of torch and a visible GPU; use --device cpu")
        if threads:
            torch.set_num_threads(threads)
        self.name = f"torch-{device}" + (" + CUDA graph" if cuda_graph else "")
        self._torch = torch
        self.device = device
        self._cuda_graph = cuda_graph
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None  # one memory pool shared by every captured decode shape (see _replay)
        dtype = dtype or bundle.dtype
        self.model = load_model(source or BundleSource(bundle), dtype=dtype, max_seq_len=bundle.max_seq_len,
                                device=device)
        slots = bundle.max_seq_len if cache_len is None else min(cache_len, bundle.max_seq_len)
        self._kv = replace(bundle.kv, max_seq_len=slots)
        shape, dtype = self._kv.shape(self.cache_rows), TORCH_DTYPES[dtype]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self._kv.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self._kv.num_layers)]

    def close(self) -> None:
        """Drop the model, its captured graphs and the caches: the model's weights are views of
        the bundle's memory map, which Session.close then releases."""
        self.model, self.k, self.v = None, [], []
        self._graphs.clear()
        self._pool = None

    def _forward(self, ids, pos, lens, rows, logits_at=None):
        k = [c[rows.start: rows.stop] for c in self.k]
        v = [c[rows.start: rows.stop] for c in self.v]
        with self._torch.no_grad():  # eager: the model writes the new rows into these views in place
            at = io.logits_index(lens, pos) if logits_at is None else logits_at
            logits, _, _ = self.model(ids, pos, lens, k, v, logits_index=at)
        return logits

    def step(self, phase, input_ids, position_ids, seq_lens, rows, copy=True, logits_at=None):  # a fresh array
        self.check_step(seq_lens, rows)
        self.check_logits_at(phase, input_ids, logits_at)
        torch = self._torch
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)  # noqa: E731
        inputs = (to(input_ids), to(position_ids), to(seq_lens))
        started = time.perf_counter()
        try:
            if self._cuda_graph and phase == io.DECODE:
                return self._replay(inputs, rows)
            return self._forward(*inputs, rows, None if logits_at is None else to(logits_at)).cpu().numpy()
        finally:
            self.run_s += time.perf_counter() - started

    def _replay(self, inputs, rows):
        """Decode through a CUDA graph captured per (first row, batch): fixed addresses throughout."""
        torch = self._torch
        key = (rows.start, len(rows))
        if key not in self._graphs:
            static = tuple(t.clone() for t in inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # this step itself, eagerly: warms up allocators and kernels
                logits = self._forward(*static, rows)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # One pool for every shape (torch.cuda.graph's `pool=`, a graph_pool_handle()): a private
            # pool per captured shape would hold each shape's activations apart. Sharing is safe as
            # used here: replays never overlap and each replay's logits are copied out before the
            # next one (PyTorch CUDA semantics, "Graph memory management"; UNVERIFIED: no GPU here).
            self._pool = self._pool if self._pool is not None else torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):  # recorded, not run: the step above wrote the caches
                out = self._forward(*static, rows)
            self._graphs[key] = (graph, static, out)
            return logits.cpu().numpy()
        graph, static, out = self._graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return out.cpu().numpy()

    def copy_row(self, src: int, dst: int, length: int) -> None:
        self.check_copy_row(src, dst, length, slots=self._kv.max_seq_len)
        for t in self.k + self.v:  # (B, H, S, D): in place, so captured graphs keep their addresses
            t[dst, :, :length] = t[src, :, :length]

    def cache_addresses(self) -> list[int]:
        return [t.data_ptr() for t in kv.interleave(self.k, self.v)]

    def cache_arrays(self, rows: range, length: int | None = None) -> list[np.ndarray]:
        return [t[rows.start: rows.stop, :, :length].float().cpu().numpy() for t in kv.interleave(self.k, self.v)]
