"""The one greedy-match count, perplexity and KL divergence (ernie_paddle.scoring), on values worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ernie_paddle.errors import InputError
from ernie_paddle.scoring import kl_divergence, perplexity, shared_prefix


def test_shared_prefix_counts_tokens_before_the_first_difference():
    assert shared_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert shared_prefix([5, 6], [7, 6]) == 0
    assert shared_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert shared_prefix([1, 2, 3], [1, 2]) == 2  # a shorter continuation (an end token) ends the match


def test_perplexity_of_uniform_and_of_certain_predictions():
    vocab, ids = 50, np.arange(1, 42) % 50

    def uniform(rows):
        return np.zeros(rows.shape + (vocab,), np.float32)

    assert perplexity(uniform, ids, seq=8, batch=2) == pytest.approx(vocab, rel=1e-12)

    def knows_the_next_token(rows):  # every window is a run of consecutive ids: the next one is row + 1
        out = np.full(rows.shape + (vocab,), -1e4, np.float32)
        np.put_along_axis(out, ((rows + 1) % vocab)[..., None], 0.0, axis=-1)
        return out

    assert perplexity(knows_the_next_token, ids, seq=8, batch=3) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(InputError, match="perplexity needs more than 8 tokens of text, got 8"):
        perplexity(uniform, ids[:8], seq=8)


def test_kl_divergence_against_a_worked_value():
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(p, q) == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(p + 3.0, p) == 0.0  # a shift of the logits is the same distribution
