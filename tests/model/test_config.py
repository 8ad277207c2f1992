"""config.json mapping and the preset registry."""

from __future__ import annotations

import json

import pytest

from llmexport import LLMExportError
from llmexport.model.config import config_from_hf, load_config
from llmexport.model.presets import PRESETS, get_preset


def _llama(**extra):
    return {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, **extra}


def test_transformers_4_and_5_rope_spellings_agree():
    v4 = config_from_hf(_llama(rope_theta=500000.0, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}))
    v5 = config_from_hf(_llama(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
    assert v4 == v5 and v4.rope_theta == 500000.0 and v4.rope_scaling.type == "llama3"


def test_qwen2_has_qkv_bias_and_window_only_when_enabled():
    hf = _llama(model_type="qwen2", sliding_window=32, use_sliding_window=False, max_window_layers=1)
    assert config_from_hf(hf).qkv_bias and config_from_hf(hf).sliding_window is None
    windowed = config_from_hf(hf | {"use_sliding_window": True})
    assert windowed.sliding_window_layers == (1,) and windowed.layer_window(0) == 0
    assert windowed.layer_window(1) == 32


def test_derived_values():
    c = config_from_hf(_llama())
    assert (c.head_dim, c.kv_groups) == (16, 2)


@pytest.mark.parametrize("bad, field", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "lacks field 'low_freq_factor'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ({"embedding_multiplier": 12.0}, "embedding_multiplier=12.0"),
    ({"residual_multiplier": 0.22}, "residual_multiplier=0.22"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"some_new_scaling": 2.0}, "'some_new_scaling', unknown"),
])
def test_unsupported_values_name_the_field(bad, field):
    with pytest.raises(LLMExportError, match=field):
        config_from_hf(_llama(**bad))


def test_math_keys_at_their_neutral_values_are_accepted():
    neutral = _llama(attn_logit_softcapping=None, embedding_multiplier=1.0, residual_multiplier=1.0,
                     mlp_bias=False, pretraining_tp=1, hidden_act="silu", unk_token_id=0,
                     _model_name_or_path="x")
    assert config_from_hf(neutral) == config_from_hf(_llama())


def test_missing_required_field_is_named():
    hf = _llama()
    del hf["hidden_size"]
    with pytest.raises(LLMExportError, match="'hidden_size'"):
        config_from_hf(hf)


def test_missing_config_json(tmp_path):
    with pytest.raises(LLMExportError, match="no config.json"):
        load_config(tmp_path)


def test_hf_dict_round_trips():
    for name, config in PRESETS.items():
        assert config_from_hf(json.loads(json.dumps(config.to_hf_dict()))) == config, name


def test_published_parameter_counts():
    assert round(get_preset("llama-2-7b").num_parameters() / 1e9, 3) == 6.738
    assert round(get_preset("llama-3-8b").num_parameters() / 1e9, 3) == 8.030
    assert round(get_preset("qwen2-0.5b").num_parameters() / 1e9, 3) == 0.494
    assert round(get_preset("mistral-7b").num_parameters() / 1e9, 3) == 7.242


def test_unknown_preset_lists_the_choices():
    with pytest.raises(LLMExportError, match="tiny-llama"):
        get_preset("llama-9")
