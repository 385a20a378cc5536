"""The Tiny Shakespeare corpus shipped inside the package, and its fixed training / held-out split.

The shipped model is trained on it (`tools/train_shipped.py`) and quantisation quality is measured on its held-out
part (`tools/quant_quality.py`), so both find it after a plain `pip install`, with nothing beside the package.
"""

from __future__ import annotations

import os

from ernie_paddle.textfile import read_text

DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tinyshakespeare.txt")
HELD_OUT_SHARE = 0.1  # the last 10% by bytes


def read_corpus(path: str = DEFAULT_CORPUS) -> str:
    """The corpus text; an unreadable or non-UTF-8 file is an InputError naming it."""
    return read_text(path, f"corpus {path}")


def split_corpus(text: str) -> tuple[str, str]:
    """Training split and held-out split: the last 10% by bytes, cut at a line boundary."""
    data = text.encode("utf-8")
    cut = data.rfind(b"\n", 0, int(len(data) * (1 - HELD_OUT_SHARE))) + 1
    return data[:cut].decode("utf-8"), data[cut:].decode("utf-8")


def held_out_text(path: str = DEFAULT_CORPUS) -> str:
    """The held-out 10% of the corpus at `path` (perplexity is reported on it)."""
    return split_corpus(read_corpus(path))[1]
