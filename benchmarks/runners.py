"""One runner per backend, all with the same calls: check, load, prefill, decode_step, sync.

Every runner does the same work: a prefill of a (batch, length) prompt on a fresh cache, then
single-token decode steps that extend it. Bundle backends go through the runtime's public
`create_backend`; the eager baseline is transformers as users write it (dynamic cache, no
graphs) on the same weights.
"""

from __future__ import annotations

import numpy as np

from llmexport.runtime.bundle.names import DECODE, PREFILL


class Unavailable(Exception):
    """This backend cannot run here; the message says why (reported as skipped)."""


class BundleRunner:
    """A runtime backend (onnxruntime, torch) on a bundle."""

    def __init__(self, name: str, bundle_dir, backend: str, device: str, cuda_graph: bool | None = None,
                 threads: int | None = None, weight_bytes: int | None = None):
        """`weight_bytes`: the bundle's stored weight bytes, when they differ from the float
        model's (a quantized variant: its roofline uses them)."""
        self.name, self.bundle_dir, self.backend_name, self.device = name, bundle_dir, backend, device
        self.cuda_graph, self.threads, self.weight_bytes = cuda_graph, threads, weight_bytes
        self.backend = None

    def check(self) -> None:
        """Import what the backend needs, so memory figures exclude library imports."""
        try:
            __import__("torch" if self.backend_name == "torch" else "onnxruntime")
        except ImportError as e:
            raise Unavailable(f"needs {e.name}: pip install {e.name}") from None

    def load(self) -> None:
        from llmexport import LLMExportError
        from llmexport.runtime.bundle import Bundle
        from llmexport.runtime.session import create_backend

        try:
            self.backend = create_backend(Bundle.open(self.bundle_dir), self.backend_name, self.device,
                                          self.cuda_graph, self.threads)
        except LLMExportError as e:
            raise Unavailable(str(e)) from None

    def prefill(self, ids: np.ndarray) -> None:
        batch, length = ids.shape
        self.lengths = np.full(batch, length, dtype=np.int64)
        self.backend.step(PREFILL, ids, np.tile(np.arange(length), (batch, 1)), self.lengths.copy(), range(batch))

    def decode_step(self) -> None:
        batch = len(self.lengths)
        positions = self.lengths[:, None].copy()
        self.lengths += 1
        self.backend.step(DECODE, np.zeros((batch, 1), dtype=np.int64), positions, self.lengths.copy(), range(batch))

    def sync(self) -> None:
        pass  # step returns host logits: it has already waited for the device

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


class TransformersEagerRunner:
    """transformers' model with its dynamic cache and no graphs: eager torch as users write it."""

    name = "torch-eager (transformers)"

    def __init__(self, source, dtype: str, device: str, threads: int | None = None):
        self.source, self.dtype, self.device, self.threads = source, dtype, device, threads

    def check(self) -> None:
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError as e:
            raise Unavailable(f"needs {e.name}: pip install {e.name}") from None
        if self.device == "cuda" and not torch.cuda.is_available():
            raise Unavailable("needs a CUDA build of torch and a GPU")
        if self.threads:
            torch.set_num_threads(self.threads)
        self.torch = torch

    def load(self) -> None:
        import inspect

        import transformers

        from llmexport.model.weights import TORCH_DTYPES

        torch = self.torch
        hf = self.source.config.to_hf_dict()
        config = transformers.CONFIG_MAPPING[hf.pop("model_type")](**hf)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[self.dtype])
        state = {name: t.to(self.device) for name, t in self.source.tensors(self.dtype)}
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        rotary = model.model.rotary_emb  # a non-persistent buffer: rebuild it off `meta`
        model.model.rotary_emb = type(rotary)(config).to(self.device)
        self.model = model.eval()
        # transformers 5.2x renamed the cache argument; take whichever this version has.
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prefill(self, ids: np.ndarray) -> None:
        from transformers import DynamicCache

        torch = self.torch
        self.cache = DynamicCache()
        with torch.no_grad():
            self.model(torch.from_numpy(ids).to(self.device), use_cache=True, logits_to_keep=1,
                       **{self.cache_arg: self.cache})
        self.batch = ids.shape[0]

    def decode_step(self) -> None:
        torch = self.torch
        token = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.model(token, use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def close(self) -> None:
        self.model = self.cache = None


class MissingRunner:
    """A backend this build cannot run at all (reported as skipped with the reason)."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def check(self) -> None:
        raise Unavailable(self.reason)

    def close(self) -> None:
        pass
