"""A checkpoint's `generation_config.json` as sampling defaults and EOS ids (torch-free).

transformers' semantics: `do_sample` false (or absent) means greedy whatever the temperature
says; when sampling, unset values take GenerationConfig's defaults (temperature 1.0, top_k 50,
top_p 1.0). The exporter stores the result in the manifest (`generation`), and the runtime
starts every request from it unless the caller says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping

from llmexport import LLMExportError

_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def sampling_defaults(gen: Mapping) -> dict:
    """SamplingParams fields implied by a generation_config.json dict."""
    try:
        out: dict = {}
        if gen.get("do_sample") and float(gen.get("temperature", 1.0) or 0.0) > 0:
            out["temperature"] = float(gen.get("temperature", _SAMPLING_DEFAULTS["temperature"]))
            top_k = gen.get("top_k", _SAMPLING_DEFAULTS["top_k"])
            out["top_k"] = int(top_k) if top_k else 0
            top_p = gen.get("top_p", _SAMPLING_DEFAULTS["top_p"])
            out["top_p"] = float(top_p) if top_p is not None else 1.0
        if gen.get("repetition_penalty") not in (None, 1, 1.0):
            out["repetition_penalty"] = float(gen["repetition_penalty"])
        if gen.get("max_new_tokens"):
            out["max_new_tokens"] = int(gen["max_new_tokens"])
        return out
    except (TypeError, ValueError) as e:
        raise LLMExportError(f"generation_config.json has an unreadable value ({e}); fix or remove the file") from None


def eos_token_ids(gen: Mapping) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an int or a list) as a tuple."""
    value = gen.get("eos_token_id")
    values = value if isinstance(value, list) else ([] if value is None else [value])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise LLMExportError(f"generation_config.json eos_token_id {value!r} is not an int or a list of ints")
    return tuple(values)
