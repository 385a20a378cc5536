"""config.json parsing: both variants, the dense model, required fields, disputed defaults, strict mode."""

from __future__ import annotations

import json
import warnings

import pytest

from ernie_paddle.config import ErnieConfig, disputed_defaults, preset
from ernie_paddle.errors import ConfigDefaultWarning, ConfigError

# The released ERNIE-4.5-21B-A3B(-PT) config.json, every key written.
PT_21B = {
    "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "vocab_size": 103424,
    "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 28, "num_attention_heads": 20,
    "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
    "rope_theta": 500000, "use_bias": False, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "moe_num_experts": 64, "moe_k": 6, "moe_num_shared_experts": 2, "moe_intermediate_size": 1536,
    "moe_layer_start_index": 1, "moe_layer_end_index": 27, "moe_layer_interval": 1, "moe_gate": "topk",
    "moe_use_aux_free": True, "moe_capacity": [64, 64, 64], "num_nextn_predict_layers": 1, "use_cache": False,
    "dtype": "bfloat16", "use_rmsnorm": True,
}


def parse(d: dict, strict: bool = False) -> ErnieConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigDefaultWarning)
        return ErnieConfig.from_dict(d, strict=strict)


def test_released_21b_config_reads_without_warnings():
    cfg = parse(PT_21B, strict=True)
    assert (cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.shared_intermediate_size) == (
        128, 5, 3072)
    assert [cfg.is_moe_layer(i) for i in range(28)] == [False] + [True] * 27
    assert cfg.rope_theta == 500000.0 and cfg.moe_norm_min == 1e-12
    assert cfg.extra["moe_capacity"] == [64, 64, 64]
    assert cfg == preset("21b-a3b")


def test_transformers5_rope_parameters_and_paddle_variant():
    d = dict(PT_21B)
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    assert parse(d).rope_theta == 123.0
    paddle_variant = dict(PT_21B, architectures=["Ernie4_5_MoeForCausalLM"])
    del paddle_variant["model_type"]  # the model type is then read from architectures
    assert parse(paddle_variant).model_type == "ernie4_5_moe"


def test_dense_0_3b_config_with_explicit_head_dim():
    d = {"architectures": ["Ernie4_5_ForCausalLM"], "vocab_size": 103424, "hidden_size": 1024,
         "intermediate_size": 3072, "num_hidden_layers": 18, "num_attention_heads": 16, "num_key_value_heads": 2,
         "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000,
         "tie_word_embeddings": True}
    cfg = parse(d)
    assert cfg.model_type == "ernie4_5" and cfg.head_dim == 128 and not cfg.is_moe_layer(0)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                   "moe_num_experts", "moe_k", "moe_intermediate_size", "num_hidden_layers"])
def test_missing_required_field_is_an_error_naming_it(field):
    d = dict(PT_21B)
    del d[field]
    with pytest.raises(ConfigError, match=f"missing required field '{field}'"):
        parse(d)


@pytest.mark.parametrize("field,value", [("rope_theta", 500000.0), ("rms_norm_eps", 1e-5),
                                         ("moe_layer_interval", 1), ("moe_layer_start_index", 1),
                                         ("moe_num_shared_experts", 2), ("moe_use_aux_free", True),
                                         ("tie_word_embeddings", True), ("max_position_embeddings", 131072)])
def test_missing_disputed_field_warns_with_value_and_strict_refuses(field, value):
    d = dict(PT_21B)
    del d[field]
    with pytest.warns(ConfigDefaultWarning, match=f"field '{field}' is missing; using {value!r}"):
        cfg = ErnieConfig.from_dict(d)
    assert getattr(cfg, field) == value
    with pytest.raises(ConfigError, match=f"field '{field}' is missing.*strict config"):
        ErnieConfig.from_dict(d, strict=True)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "unknown model_type 'llama'"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(20\) is not a multiple of num_key_value_heads \(3\)"),
    ({"hidden_size": 2561}, r"hidden_size \(2561\) is not divisible by num_attention_heads \(20\)"),
    ({"moe_k": 65}, r"moe_k \(65\) exceeds moe_num_experts \(64\)"),
    ({"hidden_size": "2560"}, "field 'hidden_size' must be an integer, got '2560'"),
    ({"rope_theta": "big"}, "field 'rope_theta' must be a number"),
    ({"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be true or false"),
    ({"hidden_act": "gelu"}, "field 'hidden_act' is 'gelu'"),
    ({"vocab_size": 0}, "field 'vocab_size' must be positive"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4}}, "only 'default' RoPE"),
])
def test_bad_config_values(change, message):
    with pytest.raises(ConfigError, match=message):
        parse(dict(PT_21B, **change))


def test_from_file_names_the_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{p}: cannot read it as JSON"):
        ErnieConfig.from_file(str(tmp_path))
    with pytest.raises(ConfigError, match="no such file"):
        ErnieConfig.from_file(str(tmp_path / "nope"))
    p.write_bytes(b'{"model_type": "ernie4_5_moe\xff"}')  # not UTF-8: a traceback until this was tested
    with pytest.raises(ConfigError, match=f"{p}: cannot read it as JSON .*utf-8"):
        ErnieConfig.from_file(str(tmp_path))
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=f"{p}: expected a JSON object at the top level"):
        ErnieConfig.from_file(str(tmp_path))
    d = dict(PT_21B)
    del d["moe_k"]
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=f"{p}: missing required field 'moe_k'"):
        ErnieConfig.from_file(str(p))


def test_saved_config_round_trips_for_both_layouts(tmp_path):
    cfg = preset("small", tie_word_embeddings=False)
    for layout in ("pt", "paddle"):
        cfg.save(str(tmp_path), layout)
        assert parse(json.loads((tmp_path / "config.json").read_text()), strict=True) == cfg


def test_missing_disputed_fields_read_as_the_released_model():
    """The defaults a config.json may leave out are the released 21B-A3B values, declared once on the dataclass."""
    d = {k: v for k, v in PT_21B.items() if k not in disputed_defaults(moe=True)}
    assert len(PT_21B) - len(d) == 9
    with pytest.warns(ConfigDefaultWarning):
        assert ErnieConfig.from_dict(d) == preset("21b-a3b")
    assert set(disputed_defaults(moe=False)) == {"rope_theta", "rms_norm_eps", "max_position_embeddings",
                                                 "tie_word_embeddings"}


def test_zero_layers_is_refused_however_the_config_is_made():
    with pytest.raises(ConfigError, match="preset tiny: field 'num_hidden_layers' must be positive, got 0"):
        preset("tiny", num_hidden_layers=0)
    with pytest.raises(ConfigError, match="ErnieConfig: field 'num_hidden_layers' must be positive, got -1"):
        preset("tiny").replace(num_hidden_layers=-1)
    with pytest.raises(ConfigError, match=r"ErnieConfig: moe_k \(9\) exceeds moe_num_experts \(8\)"):
        preset("tiny").replace(moe_k=9)
