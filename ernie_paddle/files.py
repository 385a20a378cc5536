"""File names of a checkpoint folder and of an exported ONNX folder: the one place every module reads them."""

from __future__ import annotations

import os

# ---- a checkpoint folder (Hugging Face / PaddleNLP conventions) ----------------------------------------------------
CONFIG = "config.json"
SPM_MODEL = "tokenizer.model"  # sentencepiece
TOKENIZER_JSON = "tokenizer.json"  # Hugging Face `tokenizers`
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
# Files besides the weights that travel with a checkpoint when it is converted or exported.
SIDE_FILES = (SPM_MODEL, TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG, ADDED_TOKENS,
              CHAT_TEMPLATE)

# Weights: one safetensors file, or shards named `shard_file(i, n)` listed by an index (Hugging Face's names);
# Paddle's pickled `.pdparams` are read only when the user allows pickles.
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PDPARAMS_SUFFIX = ".pdparams"


def shard_file(i: int, n: int) -> str:
    """The name of shard `i` (from 1) of `n`, as `save_pretrained` writes it."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"

def pickled_files(directory: str) -> list[str]:
    """The `.pdparams` files in `directory`, sorted (Paddle's pickled weights, read only by `paddle.pdparams`)."""
    return sorted(f for f in os.listdir(directory) if f.endswith(PDPARAMS_SUFFIX))


def is_weight_file(name: str) -> bool:
    """Whether `name` in a checkpoint folder is a safetensors weight file or their index (`model*.safetensors`,
    `model*.json`): what an export's manifest hashes besides config.json."""
    return name.startswith("model") and name.endswith((".safetensors", ".json"))


# ---- an exported ONNX folder (`ernie-paddle export`) ---------------------------------------------------------------
ONNX_MODEL = "model.onnx"
MANIFEST = "manifest.json"  # what was exported, from which weights, and its verification
GENAI_CONFIG = "genai_config.json"  # onnxruntime-genai


def onnx_data(model_file: str = ONNX_MODEL) -> str:
    """The external-data file ONNX writes beside `model_file` (weights over 2 GB cannot sit in the protobuf)."""
    return model_file + ".data"
