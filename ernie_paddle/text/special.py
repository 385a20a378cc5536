"""ERNIE-4.5's special tokens: the names the tokenizer, the chat template and the tokenizer trainer all use, in
one module none of them depends on otherwise."""

from __future__ import annotations

SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<unk>", "cls": "<|begin_of_sentence|>",
           "sep": "<|end_of_sentence|>", "mask": "<mask:1>"}  # ERNIE-4.5's, used where tokenizer_config names none
MASK_TOKENS = [f"<mask:{i}>" for i in range(8)]  # <mask:4>/<mask:5> sys start/end, <mask:6>/<mask:7> header
