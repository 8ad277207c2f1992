"""The old home of Backend, kept only for runtime/engine.py and runtime/session.py, which are
being edited elsewhere; import llmexport.runtime.backends instead. Remove with their last use."""

from .backends.base import Backend

__all__ = ["Backend"]
