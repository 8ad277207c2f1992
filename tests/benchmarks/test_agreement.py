"""The greedy-agreement benchmark: its comparison, and a run on tiny bundles."""

from __future__ import annotations

import json

import pytest

from llmexport import LLMExportError
from llmexport.benchmarks.agreement import agreement, compare, main, read_prompts
from llmexport.exporter.quantize import QuantConfig


def test_compare_counts_first_tokens_identical_answers_and_common_prefixes():
    reference = [[1, 2, 3], [4, 5], [6], [7, 8]]
    answers = [[1, 2, 3], [4, 9], [0], [7, 8, 9]]
    first, identical, prefix = compare(reference, answers)
    assert first == 0.75 and identical == 0.25 and prefix == (3 + 1 + 0 + 2) / 4
    with pytest.raises(LLMExportError):
        compare(reference, answers[:2])


def test_a_bundle_agrees_with_itself_and_a_quantized_one_is_measured(bundle_factory, tmp_path):
    reference, _ = bundle_factory("llama3", "ort")
    quantized, _ = bundle_factory("llama3", "ort", quant=QuantConfig("int4", 16, head="int4", symmetric=True))
    prompts = ["w5 w6 w7", "w10 w11", "w20 w30 w40 w50", "w99", "w7 w8"]  # more than the bundles' 4 rows
    rows = agreement(reference, [reference, quantized], prompts, max_new_tokens=8, threads=1)
    assert [r.prompts for r in rows] == [5, 5, 5]
    assert (rows[1].first_token, rows[1].identical, rows[1].common_prefix) == (1.0, 1.0, rows[0].common_prefix)
    assert 0 <= rows[2].identical <= rows[2].first_token <= 1
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    main(["--reference", str(reference), str(quantized), "--prompts", str(tmp_path / "p.txt"),
          "--max-new-tokens", "4", "--threads", "1", "--json", str(tmp_path / "a.json")])
    assert len(json.loads((tmp_path / "a.json").read_text())) == 2


def test_bad_prompt_files_are_clear_errors(tmp_path):
    with pytest.raises(LLMExportError, match="cannot read --prompts"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(LLMExportError, match="has no prompts"):
        read_prompts(tmp_path / "empty.txt")
