"""Services embed the runtime without torch: the ONNX Runtime path must never import it."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from llmexport.runtime.session import Session
from llmexport.runtime.sampling import SamplingParams
with Session(sys.argv[1]) as s:
    out = s.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
assert len(out.token_ids[0]) == 4
heavy = sorted(m for m in ("torch", "transformers", "onnxscript", "onnx_ir") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_runtime_generates_without_importing_torch_or_transformers(bundle_factory):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle_dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"
