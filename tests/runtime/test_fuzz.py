"""Seeded bit flips in every file of a tiny bundle: opening and generating never crash, and with
the integrity check on every damaged bundle is refused with a clear error before it runs.

The cases run in one worker process, so a crash (a segfault in a native library included) is
seen by this test as the worker dying, and counted, instead of taking pytest down with it.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import run_cli

CASES = 120
WORKER = r"""
import json, random, shutil, sys
from pathlib import Path
from llmexport import LLMExportError
from llmexport.runtime.sampling import SamplingParams
from llmexport.runtime.session import Session

src, work = Path(sys.argv[1]), Path(sys.argv[2])
first, cases, check = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
params = SamplingParams(max_new_tokens=4, ignore_eos=True)
with Session(src) as s:
    base = s.generate([[5, 6, 7]], params).token_ids
files = sorted(p.name for p in src.iterdir())
for case in range(first, cases):
    rng = random.Random(case)
    name = rng.choice(files)
    copy = work / f"case{case}"
    shutil.copytree(src, copy)
    data = bytearray((copy / name).read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)
    (copy / name).write_bytes(data)
    message = ""
    try:
        with Session(copy, check_integrity=check) as s:
            got = s.generate([[5, 6, 7]], params).token_ids
        outcome = "unchanged output" if got == base else "different output"
    except LLMExportError as e:
        outcome, message = ("detected by integrity" if "sha256" in str(e) else "rejected with a clear error"), str(e)
    except Exception as e:
        outcome, message = "crash", f"{type(e).__name__}: {e}"
    print(json.dumps({"case": case, "file": name, "offset": at, "outcome": outcome, "message": message}), flush=True)
    shutil.rmtree(copy)
"""


def fuzz(bundle_dir, work, check_integrity: bool, cases: int = CASES) -> list[dict]:
    """Run every case; a worker that dies counts its current case as a crash and a new one goes on."""
    rows: list[dict] = []
    while len(rows) < cases:
        done = subprocess.run([sys.executable, "-c", WORKER, str(bundle_dir), str(work), str(len(rows)), str(cases),
                               "1" if check_integrity else "0"], capture_output=True, text=True, timeout=900)
        rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 and len(rows) < cases:
            rows.append({"case": len(rows), "outcome": "crash", "message": f"worker exit {done.returncode}: "
                                                                             f"{done.stderr[-300:]}"})
    return rows


@pytest.mark.slow
def test_every_damaged_bundle_is_refused_when_integrity_is_checked(bundle_factory, tmp_path):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    rows = fuzz(bundle_dir, tmp_path, check_integrity=True)
    counts = Counter(r["outcome"] for r in rows)
    print("with --check-integrity:", dict(counts), dict(Counter(r["file"] for r in rows if "file" in r)))
    assert len(rows) == CASES  # and every file of the bundle hit:
    assert {r.get("file") for r in rows} == {p.name for p in bundle_dir.iterdir()}
    assert set(counts) <= {"detected by integrity", "rejected with a clear error"}, \
        [r for r in rows if r["outcome"] not in ("detected by integrity", "rejected with a clear error")][:3]


@pytest.mark.slow
def test_without_the_integrity_check_nothing_crashes(bundle_factory, tmp_path):
    """Sizes, paths, the manifest's digest and graph parsing are checked on every open; flipped
    weights or constants inside a graph can still change the output silently (that is what the
    integrity check is for). Counts are in README."""
    bundle_dir, _ = bundle_factory("llama3", "ort")
    rows = fuzz(bundle_dir, tmp_path, check_integrity=False)
    counts = Counter(r["outcome"] for r in rows)
    print("sizes only:", dict(counts))
    assert counts["crash"] == 0, [r for r in rows if r["outcome"] == "crash"][:3]


@pytest.mark.slow
def test_the_cli_turns_damaged_bundles_into_one_line(bundle_factory, tmp_path):
    bundle_dir, _ = bundle_factory("llama3", "ort")
    files = sorted(p.name for p in bundle_dir.iterdir())
    for case in range(len(files) * 2):
        rng = random.Random(1000 + case)
        copy = shutil.copytree(bundle_dir, tmp_path / f"cli{case}")
        name = files[case % len(files)]
        data = bytearray((copy / name).read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (copy / name).write_bytes(data)
        result = run_cli("generate", "--bundle", str(copy), "--token-ids", "5,6,7", "--max-new-tokens", "4",
                         "--check-integrity")
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
