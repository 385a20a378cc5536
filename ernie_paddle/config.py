"""ERNIE-4.5 configuration: reads the `config.json` of `-PT`, `-Paddle` and dense `ernie4_5` checkpoints.

Frameworks disagree on defaults (ERNIE: rope_theta 1e4, eps 1e-6, interval 2, ...; transformers: the released
21B-A3B values), so a missing field is never filled silently: the transformers default is used and a
`ConfigDefaultWarning` names the field, or `strict=True` makes it a `ConfigError`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from ernie_paddle import files
from ernie_paddle.errors import ConfigDefaultWarning, ConfigError
from ernie_paddle.textfile import read_json_object

MOE_TYPE = "ernie4_5_moe"
DENSE_TYPE = "ernie4_5"
SUPPORTED_MODEL_TYPES = (MOE_TYPE, DENSE_TYPE)
ARCHITECTURE_TO_TYPE = {
    "Ernie4_5_MoeForCausalLM": MOE_TYPE,
    "Ernie4_5ForCausalLM": DENSE_TYPE,  # updated HF name
    "Ernie4_5_ForCausalLM": DENSE_TYPE,  # original Paddle name
}

# Fields without a sane default: missing -> ConfigError naming the field.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")
REQUIRED_MOE = ("moe_num_experts", "moe_k", "moe_intermediate_size")
# Fields that must be > 0 (besides the MoE sizes of a MoE model, REQUIRED_MOE).
POSITIVE = REQUIRED + ("max_position_embeddings",)

# Every default lives on its `ErnieConfig` field. A field made with `_disputed` is one on whose default frameworks
# disagree: a config.json missing it gets the value named here (transformers' default, the released 21B-A3B value)
# and a ConfigDefaultWarning, or with strict=True a ConfigError. Plain defaults are agreed by every implementation
# and filled silently.
_DISPUTED, _MOE_ONLY = "disputed", "moe_only"


def _disputed(value: Any) -> Any:
    return field(default=value, metadata={_DISPUTED: value})


def _disputed_moe(value: Any, *, dense: Any) -> Any:
    """Disputed for MoE configs only; `dense` is what a dense model (which has no such setting) holds."""
    return field(default=dense, metadata={_DISPUTED: value, _MOE_ONLY: True})


@dataclass(frozen=True)
class ErnieConfig:
    """Hyper-parameters of an ERNIE-4.5 text model (MoE `ernie4_5_moe` or dense `ernie4_5`)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense FFN width (layer 0 of the MoE models)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = _disputed(131072)
    rms_norm_eps: float = _disputed(1e-5)
    rope_theta: float = _disputed(500000.0)
    tie_word_embeddings: bool = _disputed(True)
    use_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int = 0
    moe_num_experts: int = 0
    moe_k: int = 0
    moe_intermediate_size: int = 0
    moe_num_shared_experts: int = _disputed_moe(2, dense=0)
    moe_layer_start_index: int = _disputed_moe(1, dense=1)
    moe_layer_end_index: int = _disputed_moe(-1, dense=-1)  # -1: the last layer
    moe_layer_interval: int = _disputed_moe(1, dense=1)
    moe_norm_min: float = 1e-12
    moe_use_aux_free: bool = _disputed_moe(True, dense=True)
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # keys we keep but do not use

    def __post_init__(self) -> None:
        """However a config is made (`replace`, the constructor), its values hold; `from_dict` checks them first,
        naming the file."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"ErnieConfig: unknown model_type {self.model_type!r}; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        _check_geometry(values, self.is_moe_model, "ErnieConfig")
        _check_settings(values, self.is_moe_model, "ErnieConfig")

    # ---- derived -------------------------------------------------------------------------------
    @property
    def is_moe_model(self) -> bool:
        return self.model_type == MOE_TYPE

    @property
    def shared_intermediate_size(self) -> int:
        """Width of the one MLP that holds all shared experts."""
        return self.moe_intermediate_size * self.moe_num_shared_experts

    def is_moe_layer(self, layer: int) -> bool:
        """ERNIE's rule: `(l+1) % interval == 0 and start <= l <= end` (end -1 means the last layer)."""
        if not self.is_moe_model or self.moe_num_experts == 0:
            return False
        end = self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index
        return (layer + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= layer <= end

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ---- (de)serialisation -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, *, strict: bool = False, source: str = files.CONFIG) -> "ErnieConfig":
        """Validate `raw` (a parsed config.json); `source` names the file in every message."""
        return _parse(raw, strict=strict, source=source)

    @classmethod
    def from_file(cls, path: str, *, strict: bool = False) -> "ErnieConfig":
        """Read `path` (a config.json, or a directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, files.CONFIG)
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such file (a checkpoint directory needs a config.json)")
        return _parse(read_json_object(path, ConfigError), strict=strict, source=path)

    def to_dict(self, layout: str = "pt") -> dict:
        """All fields, written explicitly (no framework defaults), in the style of the given layout."""
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        if not self.is_moe_model:
            for k in list(d):
                if k.startswith("moe_"):
                    del d[k]
        if self.head_dim == self.hidden_size // self.num_attention_heads and self.is_moe_model:
            del d["head_dim"]  # the released 21B config has none; HF5's MoE config has no such field
        if self.is_moe_model:
            arch = "Ernie4_5_MoeForCausalLM"
        else:
            arch = "Ernie4_5_ForCausalLM" if layout == "paddle" else "Ernie4_5ForCausalLM"
        out = {"architectures": [arch]}
        out.update(self.extra)
        out.update(d)
        if self.is_moe_model:
            out.setdefault("moe_gate", "topk")
            out.setdefault("use_rmsnorm", True)
        return out

    def save(self, directory: str, layout: str = "pt", dtype: str | None = None) -> None:
        d = self.to_dict(layout)
        if dtype:
            d["dtype"] = dtype
            d["torch_dtype"] = dtype
        with open(os.path.join(directory, files.CONFIG), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, sort_keys=False)
            f.write("\n")

    def replace(self, **changes: Any) -> "ErnieConfig":
        return replace(self, **changes)


def _parse(raw: dict, *, strict: bool, source: str) -> ErnieConfig:
    """Validate a parsed config.json: every message names `source` and the field at fault."""
    raw = dict(raw)
    model_type = _model_type(raw, source)
    is_moe = model_type == MOE_TYPE
    _normalise(raw, source)
    values = _collect(raw, model_type, strict, source)
    _check_types(values, source)
    _check_geometry(values, is_moe, source)
    _check_settings(values, is_moe, source)
    if is_moe and values["moe_layer_end_index"] == -1:
        values["moe_layer_end_index"] = values["num_hidden_layers"] - 1
    known = {f.name for f in fields(ErnieConfig)}
    extra = {k: v for k, v in raw.items() if k not in known and k not in ("architectures", "rope_parameters")}
    return ErnieConfig(**{k: v for k, v in values.items() if k in known}, extra=extra)


def _model_type(raw: dict, source: str) -> str:
    """`model_type`, or the one type the `architectures` list names (the Paddle variant has no model_type)."""
    model_type = raw.get("model_type")
    if model_type is None:
        archs = raw.get("architectures") or []
        types = {ARCHITECTURE_TO_TYPE[a] for a in archs if a in ARCHITECTURE_TO_TYPE}
        if len(types) != 1:
            raise ConfigError(f"{source}: missing field 'model_type' (and 'architectures' {archs!r} does not name "
                              f"a supported model); expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")
        model_type = types.pop()
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: unknown model_type {model_type!r}; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def _normalise(raw: dict, source: str) -> None:
    """Bring the variants to one shape, in place: rope_theta top-level (transformers 5 nests it in
    rope_parameters), text-model MoE sizes (VL configs give per-modality lists, text first)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    if rope is not None:
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {rope!r}")
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype != "default":
            raise ConfigError(f"{source}: field 'rope_parameters.rope_type' is {rtype!r}; only 'default' "
                              f"RoPE is supported")
        if "rope_theta" in rope and "rope_theta" not in raw:
            raw["rope_theta"] = rope["rope_theta"]
    if float(raw.get("compression_ratio", 1.0) or 1.0) != 1.0:
        raise ConfigError(f"{source}: field 'compression_ratio' is {raw['compression_ratio']!r}; only 1.0 "
                          f"(text models) is supported")
    for k in ("moe_num_experts", "moe_intermediate_size"):
        if isinstance(raw.get(k), list) and raw[k]:
            raw[k] = raw[k][0]


def disputed_defaults(moe: bool) -> dict[str, Any]:
    """The disputed fields of a dense (or, `moe`, a MoE) config and the value a config missing one gets."""
    return {f.name: f.metadata[_DISPUTED] for f in fields(ErnieConfig)
            if _DISPUTED in f.metadata and (moe or not f.metadata.get(_MOE_ONLY))}


def _collect(raw: dict, model_type: str, strict: bool, source: str) -> dict[str, Any]:
    """The values the config will hold: required fields (missing: error), disputed ones (missing: warning or,
    strict, error), agreed ones (missing: left to the dataclass default), and head_dim if given."""
    is_moe = model_type == MOE_TYPE
    required = REQUIRED + (REQUIRED_MOE if is_moe else ())
    for k in required:
        if raw.get(k) is None:
            raise ConfigError(f"{source}: missing required field '{k}'")
    values: dict[str, Any] = {"model_type": model_type, "head_dim": raw.get("head_dim")}
    values.update({k: raw[k] for k in required})
    for k, default in disputed_defaults(is_moe).items():
        if raw.get(k) is not None:
            values[k] = raw[k]
            continue
        msg = (f"{source}: field '{k}' is missing; using {default!r} (the transformers default, the "
               f"released ERNIE-4.5-21B-A3B value); other frameworks default differently")
        if strict:
            raise ConfigError(msg + " (strict config)")
        warnings.warn(msg, ConfigDefaultWarning, stacklevel=4)
        values[k] = default
    for f in fields(ErnieConfig):  # agreed defaults, filled silently; a dense model has no MoE settings
        if f.name in values or f.default is MISSING or (f.name.startswith("moe_") and not is_moe):
            continue
        values[f.name] = raw[f.name] if raw.get(f.name) is not None else f.default
    return values


def _check_types(values: dict[str, Any], source: str) -> None:
    """Ints must be ints (bool is not an int here; 2.0 becomes 2), floats numbers, bools bools (in place)."""
    kinds = {f.name: f.type for f in fields(ErnieConfig)}  # the annotations as written ("int", "float", ...)
    for k, v in list(values.items()):
        if v is None:
            continue
        if kinds.get(k) == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            if isinstance(v, float) and v.is_integer():
                values[k] = int(v)
            else:
                raise ConfigError(f"{source}: field '{k}' must be an integer, got {v!r}")
        elif kinds.get(k) == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{source}: field '{k}' must be a number, got {v!r}")
            values[k] = float(v)
        elif kinds.get(k) == "bool" and not isinstance(v, bool):
            raise ConfigError(f"{source}: field '{k}' must be true or false, got {v!r}")
    eos = values["eos_token_id"]
    if not (isinstance(eos, int) or (isinstance(eos, list) and all(isinstance(e, int) for e in eos))):
        raise ConfigError(f"{source}: field 'eos_token_id' must be an integer or a list of integers, got {eos!r}")


def _check_geometry(values: dict[str, Any], is_moe: bool, source: str) -> None:
    """Sizes positive, heads grouping evenly, head_dim even (derived from hidden_size when not given)."""
    for k in POSITIVE + (REQUIRED_MOE if is_moe else ()):
        if values[k] <= 0:
            raise ConfigError(f"{source}: field '{k}' must be positive, got {values[k]}")
    nh, nkv, hidden = values["num_attention_heads"], values["num_key_value_heads"], values["hidden_size"]
    if nh % nkv:
        raise ConfigError(f"{source}: num_attention_heads ({nh}) is not a multiple of num_key_value_heads ({nkv})")
    if values["head_dim"] is None:
        if hidden % nh:
            raise ConfigError(f"{source}: hidden_size ({hidden}) is not divisible by num_attention_heads ({nh}) "
                              f"and no 'head_dim' is given")
        values["head_dim"] = hidden // nh
    if values["head_dim"] <= 0 or values["head_dim"] % 2:
        raise ConfigError(f"{source}: field 'head_dim' must be a positive even number, got {values['head_dim']}")


def _check_settings(values: dict[str, Any], is_moe: bool, source: str) -> None:
    """RoPE and norm constants, the activation and biases this model has, and the MoE layer rule."""
    for k in ("rope_theta", "rms_norm_eps"):
        if values[k] <= 0:
            raise ConfigError(f"{source}: field '{k}' must be positive, got {values[k]}")
    if values["hidden_act"] != "silu":
        raise ConfigError(f"{source}: field 'hidden_act' is {values['hidden_act']!r}; ERNIE-4.5 uses 'silu'")
    if values["use_bias"]:
        raise ConfigError(f"{source}: field 'use_bias' is true; linear biases are not supported (no released "
                          f"ERNIE-4.5 text model uses them)")
    if not is_moe:
        return
    if values["moe_k"] > values["moe_num_experts"]:
        raise ConfigError(f"{source}: moe_k ({values['moe_k']}) exceeds moe_num_experts "
                          f"({values['moe_num_experts']})")
    if values["moe_layer_interval"] <= 0:
        raise ConfigError(f"{source}: field 'moe_layer_interval' must be positive, got "
                          f"{values['moe_layer_interval']}")
    if values["moe_num_shared_experts"] < 0:
        raise ConfigError(f"{source}: field 'moe_num_shared_experts' must be >= 0")


# Named presets: the released shapes, and small ones for tests. `make-checkpoint --preset` uses these.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model_type=MOE_TYPE, vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                 moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=2,
                 moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1),
    "small": dict(model_type=MOE_TYPE, vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
                  moe_num_experts=16, moe_k=6, moe_intermediate_size=128, moe_num_shared_experts=2,
                  moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1),
    "0.3b": dict(model_type=DENSE_TYPE, vocab_size=103424, hidden_size=1024, intermediate_size=3072,
                 num_hidden_layers=18, num_attention_heads=16, num_key_value_heads=2, head_dim=128,
                 max_position_embeddings=131072),
    "21b-a3b": dict(model_type=MOE_TYPE, vocab_size=103424, hidden_size=2560, intermediate_size=12288,
                    num_hidden_layers=28, num_attention_heads=20, num_key_value_heads=4, head_dim=128,
                    max_position_embeddings=131072, moe_num_experts=64, moe_k=6, moe_intermediate_size=1536,
                    moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=27,
                    moe_layer_interval=1),
}


def preset(name: str, **overrides: Any) -> ErnieConfig:
    """An `ErnieConfig` for a named preset; `overrides` replace fields (e.g. `num_hidden_layers`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    d.update(overrides)
    moe = d["model_type"] == MOE_TYPE
    if "num_hidden_layers" in overrides and "moe_layer_end_index" not in overrides and moe:
        d["moe_layer_end_index"] = -1  # the preset's last MoE layer was its last layer: keep it so
    for k, v in disputed_defaults(moe).items():  # a preset states its shape; the rest are the usual values
        d.setdefault(k, v)
    return ErnieConfig.from_dict(d, strict=True, source=f"preset {name}")
