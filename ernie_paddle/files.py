"""File names of a checkpoint folder and of an exported ONNX folder: the one place every module reads them."""

from __future__ import annotations

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

# ---- an exported ONNX folder (`ernie-paddle export`) ---------------------------------------------------------------
ONNX_MODEL = "model.onnx"
MANIFEST = "manifest.json"  # what was exported, from which weights, and its verification
GENAI_CONFIG = "genai_config.json"  # onnxruntime-genai


def onnx_data(model_file: str = ONNX_MODEL) -> str:
    """The external-data file ONNX writes beside `model_file` (weights over 2 GB cannot sit in the protobuf)."""
    return model_file + ".data"
