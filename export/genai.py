"""`genai_config.json`: what onnxruntime-genai needs to run an exported folder."""

from __future__ import annotations

from typing import Sequence

from ernie_paddle import graph_contract as contract
from ernie_paddle.config import ErnieConfig


def genai_config(cfg: ErnieConfig, model_file: str, has_position_ids: bool, provider: str = "cpu",
                 eos_token_ids: Sequence[int] = (), share_buffer: bool = False) -> dict:
    """The decoder description in onnxruntime-genai's format (the graph's names are the contract's, which are
    genai's own).

    `eos_token_ids`: every id that ends a generation (config.json's and the tokenizer's: a chat turn ends with
    <|end_of_sentence|>), default config.json's. `share_buffer`: the graph updates a preallocated cache in place
    (GroupQueryAttention), so genai binds one buffer as past and present."""
    inputs = {"input_ids": contract.INPUT_IDS, "attention_mask": contract.ATTENTION_MASK,
              "past_key_names": contract.PAST["key"], "past_value_names": contract.PAST["value"]}
    if has_position_ids:
        inputs["position_ids"] = contract.POSITION_IDS
    session = {"log_id": "onnxruntime-genai", "provider_options": [] if provider == "cpu" else [{provider: {}}]}
    eos = sorted(set(cfg.eos_token_ids) | set(eos_token_ids))
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id,
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": session,
                "filename": model_file,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": inputs,
                "outputs": {"logits": contract.LOGITS, "present_key_names": contract.PRESENT["key"],
                            "present_value_names": contract.PRESENT["value"]},
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": cfg.pad_token_id,
            "type": "ernie4_5",  # genai's ERNIE runtime type; the MoE lives inside the graph
            "vocab_size": cfg.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": min(cfg.max_position_embeddings, 4096), "min_length": 0, "no_repeat_ngram_size": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": share_buffer,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
