"""llmexport: Llama-family LLMs from a torch reference model to deployable bundles.

The public API is re-exported lazily so that `import llmexport` stays cheap and the
torch-free runtime never drags torch in.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"


class LLMExportError(Exception):
    """Every error meant for a person: names the bad value and the fix, in one line."""


_LAZY = {
    "ModelConfig": "llmexport.model.config",
    "load_config": "llmexport.model.config",
    "get_preset": "llmexport.model.presets",
    "list_presets": "llmexport.model.presets",
    "LlamaModel": "llmexport.model.llama",
    "KVCache": "llmexport.model.kv_cache",
    "load_model": "llmexport.model.weights",
    "save_pretrained": "llmexport.model.weights",
    "reference_generate": "llmexport.model.generate",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmexport' has no attribute {name!r}")


__all__ = ["LLMExportError", "__version__", *_LAZY]
