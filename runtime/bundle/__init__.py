"""The bundle format, and its one owner: manifest schema and version (manifest.py), graph I/O
and tensor names (names.py), the KV cache layout (kv.py), the weight file and its index
(weights.py), integrity records (integrity.py), path rules (paths.py), onnxruntime-genai's
genai_config.json (genai.py), writing (writer.py, manifest.write_manifest) and reading (reader.Bundle). Torch-free: the exporter writes through
it, the runtime reads through it, and nothing here imports either of them."""

from .kv import KVLayout
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, Manifest, read_manifest
from .reader import Bundle, read_json
from .weights import ALIGNMENT, DTYPE_BYTES, NUMPY_DTYPES

__all__ = ["ALIGNMENT", "DTYPE_BYTES", "FORMAT", "FORMAT_VERSION", "KVLayout", "MANIFEST", "Manifest",
           "NUMPY_DTYPES", "Bundle", "read_json", "read_manifest"]
