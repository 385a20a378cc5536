"""How the shipped model is made and judged, as library code for its training program and the tests: its
SentencePiece tokenizer, trained on the corpus's training split, and the held-out evaluation (perplexity and the
experts' load) that its `training_report.json` records.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from ernie_paddle.errors import InputError
from ernie_paddle.files import SPM_MODEL, TOKENIZER_CONFIG
from ernie_paddle.scoring import perplexity
from ernie_paddle.text.special import MASK_TOKENS, SPECIAL


def train_tokenizer(train_text: str, out_dir: str, vocab_size: int) -> None:
    """BPE with byte fallback (no unknown characters), newlines kept as a piece, ERNIE's special tokens."""
    import sentencepiece as spm

    prefix = os.path.join(out_dir, os.path.splitext(SPM_MODEL)[0])  # sentencepiece writes <prefix>.model / .vocab
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(train_text)
        try:
            spm.SentencePieceTrainer.Train(
                input=path, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
                character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, unk_id=0, bos_id=1,
                eos_id=2, pad_id=-1, unk_piece=SPECIAL["unk"], bos_piece=SPECIAL["bos"], eos_piece=SPECIAL["eos"],
                user_defined_symbols=[SPECIAL["cls"], SPECIAL["sep"], *MASK_TOKENS, "\n"], num_threads=1,
                minloglevel=2)
        except RuntimeError as e:  # sentencepiece refuses, e.g., a vocabulary too small for its fixed pieces
            raise InputError(f"--vocab-size {vocab_size}: sentencepiece cannot train this tokenizer ({e})") from None
    os.remove(prefix + ".vocab")
    with open(os.path.join(out_dir, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "Ernie4_5Tokenizer", "add_bos_token": False, "add_eos_token": False,
                   "legacy": True, "bos_token": SPECIAL["bos"], "eos_token": SPECIAL["eos"],
                   "unk_token": SPECIAL["unk"], "pad_token": SPECIAL["pad"], "cls_token": SPECIAL["cls"],
                   "sep_token": SPECIAL["sep"], "mask_token": SPECIAL["mask"], "model_max_length": 2048}, f, indent=2)


def evaluate(model, ids: np.ndarray, seq: int) -> tuple[float, list[list[float]]]:
    """Held-out perplexity of a Paddle MoE model over non-overlapping windows of `seq` tokens, and each MoE layer's
    share of routed slots per expert."""
    import paddle

    loads: list[np.ndarray] = []

    def logits(rows: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            out = model(rows, output_router=True)
        counts = [np.bincount(e.numpy().reshape(-1), minlength=model.config.moe_num_experts)
                  for e in out.router_experts]
        loads[:] = counts if not loads else [a + b for a, b in zip(loads, counts)]
        return out.logits.numpy()

    training = model.training
    model.eval()
    try:
        ppl = perplexity(logits, ids, seq)
    finally:
        model.train(training)
    return ppl, [(c / c.sum()).round(4).tolist() for c in loads]
