"""One Backend interface (base.py), one file per backend: onnxruntime.py, torch.py (imports torch),
tensorrt.py. Only the interface is imported here, so importing the package loads no compute library."""

from .base import Backend

__all__ = ["Backend"]
