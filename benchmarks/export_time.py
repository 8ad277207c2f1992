"""Export time and peak memory of `llmexport onnx` beside onnxruntime-genai's model builder.

Both export the same Hugging Face checkpoint on this machine, one after the other, each in a
child process whose wall time and peak RSS are its own (os.wait4). onnxruntime-genai needs
transformers 5 and its own onnxruntime, so it runs from a Python given by `--genai-python`
(a second virtual environment); without one its rows say why they were skipped.

    python -m llmexport.benchmarks.export_time --model CKPT --genai-python /venv/bin/python \\
        [--workdir DIR] [--out DIR] [--name NAME] [--threads 2]

Writes NAME.json (rows, versions, the command line) and NAME.md into --out (default bench-results/;
benchmarks/results holds the committed reports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import llmexport


def measure(command: list[str], threads: int) -> dict:
    """Wall seconds and peak RSS of one child process; the last stderr line when it fails."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    row = {"wall_s": round(time.perf_counter() - start, 2), "peak_rss_bytes": usage.ru_maxrss * 1024,
           "exit_code": child.returncode}
    if child.returncode:
        row["error"] = (stderr.strip().splitlines() or ["(no output)"])[-1]
    return row


def commands(model: Path, workdir: Path, genai_python: str | None, max_seq_len: int) -> dict[str, list[str] | str]:
    """System name -> command (or the reason it cannot run)."""
    ours = [sys.executable, "-c", "from llmexport.cli import main; main()", "onnx", "--model", str(model),
            "--max-seq-len", str(max_seq_len), "--force"]
    rows: dict[str, list[str] | str] = {
        f"llmexport ort fp32 (max_seq_len {max_seq_len})": ours + ["--out", str(workdir / "ort")],
        f"llmexport portable fp32 (max_seq_len {max_seq_len})": ours + ["--target", "portable",
                                                                        "--out", str(workdir / "portable")],
    }
    for precision in ("fp32", "int4"):
        name = f"onnxruntime-genai builder {precision} (cpu)"
        if not genai_python or not shutil.which(genai_python):
            rows[name] = "skipped: pass --genai-python (a Python with onnxruntime-genai and transformers 5)"
            continue
        rows[name] = [genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o",
                      str(workdir / f"genai-{precision}"), "-p", precision, "-e", "cpu",
                      "-c", str(workdir / "genai-cache")]
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Export time: {result['model']}", "", f"`{result['command']}`", "",
             f"{result['machine']}, {result['threads']} threads each, one after the other.", "",
             "| system | wall s | peak RSS GiB | note |", "|---|---|---|---|"]
    for name, row in result["rows"].items():
        if "skipped" in row:
            lines.append(f"| {name} | - | - | {row['skipped']} |")
        else:
            lines.append(f"| {name} | {row['wall_s']:.1f} | {row['peak_rss_bytes'] / 2**30:.2f} | "
                         f"{row.get('error', '')} |")
    return "\n".join(lines) + "\n"


def run(model: Path, workdir: Path, genai_python: str | None, threads: int, max_seq_len: int) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, command in commands(model, workdir, genai_python, max_seq_len).items():
        rows[name] = {"skipped": command} if isinstance(command, str) else measure(command, threads) | {
            "command": " ".join(command)}
    return {"model": str(model), "rows": rows, "threads": threads, "llmexport": llmexport.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": " ".join(["python -m llmexport.benchmarks.export_time", *sys.argv[1:]])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint directory")
    parser.add_argument("--genai-python", help="Python of a venv with onnxruntime-genai")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work/export-time"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--name", default=None, help="report name (default export-time-<model dir name>)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=4096)
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model} is not a checkpoint directory (no config.json)")
    name = args.name or f"export-time-{args.model.resolve().name}"
    if Path(name).name != name:
        parser.error(f"--name {name!r} must be a file name, not a path")
    result = run(args.model, args.workdir, args.genai_python, args.threads, args.max_seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
