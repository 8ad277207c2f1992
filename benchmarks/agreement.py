"""Greedy agreement of bundles with a reference bundle: what a user of a quantized bundle sees,
beside perplexity. Every bundle answers every prompt greedily; per bundle, the share of prompts
whose first answer token is the reference's, the share whose whole answer (up to
`max_new_tokens`, or EOS) is identical, and the mean length of the common prefix.

    python -m llmexport.benchmarks.agreement --reference FLOAT_BUNDLE BUNDLE [BUNDLE ...] \
        [--prompts benchmarks/data/chat-prompts.txt] [--max-new-tokens 64] [--threads 2] [--json FILE]

Prompts are one per line, rendered with the reference's chat template as a single user turn
(plain text when the bundle has no template). The bundles must share the reference's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmexport import LLMExportError

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "chat-prompts.txt"


@dataclass
class Agreement:
    bundle: str
    prompts: int
    first_token: float  # share of prompts whose first answer token is the reference's
    identical: float  # share of prompts whose whole answer is the reference's
    common_prefix: float  # mean tokens before the first difference
    seconds: float


def compare(reference: list[list[int]], answers: list[list[int]]) -> tuple[float, float, float]:
    """(first-token agreement, identical answers, mean common prefix) of `answers` against `reference`."""
    if len(reference) != len(answers) or not reference:
        raise LLMExportError(f"{len(answers)} answers for {len(reference)} reference answers")
    prefixes = []
    for want, got in zip(reference, answers):
        n = 0
        while n < min(len(want), len(got)) and want[n] == got[n]:
            n += 1
        prefixes.append(n)
    first = sum(bool(w) and bool(g) and w[0] == g[0] for w, g in zip(reference, answers)) / len(reference)
    same = sum(w == g for w, g in zip(reference, answers)) / len(reference)
    return first, same, sum(prefixes) / len(prefixes)


def answers(bundle: str | Path, prompts: list[str], max_new_tokens: int, threads: int | None) -> tuple[list, float]:
    """Greedy answer token ids of each prompt, and the seconds they took."""
    from llmexport.runtime.sampling import SamplingParams
    from llmexport.runtime.session import Session

    with Session(bundle, threads=threads) as session:
        if session.tokenizer is None:
            raise LLMExportError(f"{bundle} has no tokenizer; agreement needs text prompts (export a checkpoint "
                                 f"directory that has tokenizer.json)")
        try:
            ids = [session.render_chat([{"role": "user", "content": p}]) for p in prompts]
        except LLMExportError:  # no chat template: the prompt as plain text
            ids = [session.tokenizer.encode(p) for p in prompts]
        started = time.perf_counter()
        params, rows = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0), session.bundle.max_batch
        tokens = [t for i in range(0, len(ids), rows) for t in session.generate(ids[i: i + rows], params).token_ids]
        return tokens, time.perf_counter() - started


def agreement(reference: str | Path, bundles: list[str | Path], prompts: list[str], max_new_tokens: int = 64,
              threads: int | None = None) -> list[Agreement]:
    want, seconds = answers(reference, prompts, max_new_tokens, threads)
    rows = [Agreement(str(reference), len(prompts), 1.0, 1.0, sum(map(len, want)) / len(want), seconds)]
    for bundle in bundles:
        got, seconds = answers(bundle, prompts, max_new_tokens, threads)
        rows.append(Agreement(str(bundle), len(prompts), *compare(want, got), seconds))
    return rows


def markdown(rows: list[Agreement], command: str) -> str:
    lines = [f"`{command}`", "", "| bundle | first token | identical answers | common prefix (tokens) | s |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r.bundle).name} | {r.first_token:.0%} | {r.identical:.0%} | {r.common_prefix:.1f} | "
                     f"{r.seconds:.0f} |")
    return "\n".join(lines)


def read_prompts(path: str | Path) -> list[str]:
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise LLMExportError(f"cannot read --prompts {path}: {e}; pass a UTF-8 file with one prompt per line") from None
    if not prompts:
        raise LLMExportError(f"--prompts {path} has no prompts; write one per line")
    return prompts


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", help="bundles to compare with the reference")
    parser.add_argument("--reference", required=True, help="the float bundle whose answers are the reference")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        rows = agreement(args.reference, args.bundles, read_prompts(args.prompts), args.max_new_tokens, args.threads)
    except LLMExportError as e:
        sys.exit(f"error: {e}")
    print(markdown(rows, "python -m llmexport.benchmarks.agreement " + " ".join(argv or sys.argv[1:])))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
