"""OuroConfig: released keys, presets, validation messages, config.json round trip."""

import dataclasses

import pytest

from ouro_jax import OuroConfig
from ouro_jax.model import config as cfgs

# The architecture keys of the released Ouro-1.4B config.json.
RELEASED_1P4B = {
    "vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128, "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "max_position_embeddings": 65536, "rope_theta": 1000000.0,
    "rope_scaling": None, "tie_word_embeddings": False, "initializer_range": 0.02,
    "attention_dropout": 0.0, "use_sliding_window": False, "max_window_layers": 28,
    "total_ut_steps": 4, "early_exit_threshold": 1.0, "bos_token_id": 0, "eos_token_id": 0,
    "pad_token_id": 0, "use_cache": True,
}


def test_presets_match_released_configs():
    hf = cfgs.ouro_1p4b().to_hf_dict()
    for key, value in RELEASED_1P4B.items():
        assert hf[key] == value, key
    assert hf["layer_types"] == ["full_attention"] * 24
    two = cfgs.ouro_2p6b()
    assert two.num_hidden_layers == 48 and two.to_hf_dict()["layer_types"] == ["full_attention"] * 48
    assert dataclasses.replace(two, num_hidden_layers=24) == cfgs.ouro_1p4b()


def test_hf_dict_round_trip_ignores_foreign_keys_and_drops_runtime_fields():
    cfg = cfgs.tiny(dtype="bfloat16", remat_policy="full")
    hf = cfg.to_hf_dict()
    assert "dtype" not in hf and "remat_policy" not in hf and "param_dtype" not in hf
    extra = {**hf, "architectures": ["OuroForCausalLM"], "model_type": "ouro", "auto_map": {}}
    back = OuroConfig.from_hf_dict(extra, dtype="bfloat16", remat_policy="full")
    assert back == cfg


def test_head_dim_defaults_to_hidden_over_heads():
    assert OuroConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=4).head_dim == 64


@pytest.mark.parametrize("overrides, field, why", [
    ({"hidden_size": 100, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None},
     "num_attention_heads", "divide hidden_size"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads", "divide"),
    ({"total_ut_steps": 0}, "total_ut_steps", ">= 1"),
    ({"head_dim": 15}, "head_dim", "even"),
    ({"vocab_size": 0}, "vocab_size", "positive"),
    ({"hidden_act": "gelu"}, "hidden_act", "silu"),
    ({"rope_scaling": {"type": "yarn"}}, "rope_scaling", "default RoPE"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps", "> 0"),
    ({"early_exit_threshold": 1.5}, "early_exit_threshold", "[0, 1]"),
    ({"use_sliding_window": True}, "use_sliding_window", "full attention"),
    ({"attention_dropout": 0.1}, "attention_dropout", "no dropout"),
    ({"eos_token_id": 500}, "eos_token_id", "vocab_size"),
    ({"dtype": "float64"}, "dtype", "one of"),
    ({"remat_policy": "sometimes"}, "remat_policy", "one of"),
    ({"attention_impl": "flash"}, "attention_impl", "one of"),
])
def test_validation_names_field_and_reason(overrides, field, why):
    with pytest.raises(ValueError) as err:
        cfgs.tiny(**overrides)
    message = str(err.value)
    assert f"{field}=" in message and why in message, message
    assert "\n" not in message


def test_validation_reports_every_bad_field_at_once():
    with pytest.raises(ValueError) as err:
        cfgs.tiny(total_ut_steps=0, dtype="int8")
    assert "total_ut_steps=" in str(err.value) and "dtype=" in str(err.value)


def test_from_hf_dict_refuses_non_full_attention_layers():
    hf = cfgs.tiny().to_hf_dict()
    hf["layer_types"] = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="layer_types"):
        OuroConfig.from_hf_dict(hf)
