"""Decode ms/step of several bundles, one after the other in one process, through the public
Session API (a quick side-by-side of dtypes and quantizations; `llmexport bench` is the full suite).

    python -m llmexport.benchmarks.decode_speed BUNDLE... [--threads 2] [--prompt-len 128]
        [--new-tokens 32] [--batches 1,8] [--repeats 3]

Prints one line per bundle: weight bytes and the median decode step per batch size.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from llmexport.benchmarks.measure import stored_weight_bytes
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session


def measure(bundle: str, threads: int, prompt_len: int, new_tokens: int, batches: list[int], repeats: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    row = {}
    with Session(bundle, threads=threads) as session:
        row["weight_bytes"] = stored_weight_bytes(session.bundle)
        for batch in batches:
            prompts = [np.random.default_rng(i).integers(3, 1000, prompt_len).tolist() for i in range(batch)]
            session.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
            steps = []
            for _ in range(repeats):
                session.generate(prompts, params)
                timings = session.last_timings
                steps.append(1000 * timings["decode_s"] / timings["decode_steps"])
            row[batch] = float(np.median(steps))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    for bundle in args.bundles:
        row = measure(bundle, args.threads, args.prompt_len, args.new_tokens, batches, args.repeats)
        steps = "  ".join(f"batch {b}: {row[b]:.1f} ms/step" for b in batches)
        print(f"{bundle}  weights {row['weight_bytes'] / 2**20:.0f} MiB  {steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
