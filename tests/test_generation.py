"""KV-cache decoding, padded batches, sampling controls and input errors of the Paddle model."""

from __future__ import annotations

import numpy as np
import pytest

from ernie_paddle.errors import InputError
from ernie_paddle.generation import GenerationConfig, generate, process_logits, stream
from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

from conftest import prompt

NO_EOS = dict(eos_token_ids=[])


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return Ernie4_5_MoeForCausalLM.from_pretrained(tiny_ckpt[0])


def test_cached_decode_equals_uncached(model):
    ids = prompt(7, model.config.vocab_size, seed=3)
    n = 32
    cached = generate(model, ids, GenerationConfig(max_new_tokens=n, **NO_EOS))
    # uncached greedy: a full forward pass per step
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model.logits(seq)[-1].argmax()))
    assert cached == seq[len(ids):]
    # step logits through the cache equal the rows of one full forward pass
    full = model.logits(seq)
    cache = model.allocate_cache(1, len(seq))
    steps = [model(np.array([ids]), cache=cache).logits.numpy()[0]]
    for t in seq[len(ids):-1]:
        steps.append(model(np.array([[t]]), cache=cache).logits.numpy()[0])
    assert np.abs(np.concatenate(steps) - full[:-1]).max() <= 1e-4


def test_padded_batch_equals_each_prompt_alone(model):
    prompts = [prompt(n, model.config.vocab_size, seed=n) for n in (3, 9, 17)]
    gen = GenerationConfig(max_new_tokens=32, **NO_EOS)
    batch = generate(model, prompts, gen)
    for p, out in zip(prompts, batch):
        assert out == generate(model, p, gen)
    # the model masks keys, so padding on either side gives each row its own forward pass's logits
    longest = max(map(len, prompts))
    for side in ("right", "left"):
        ids = np.zeros((3, longest), np.int64)
        mask = np.zeros((3, longest), bool)
        for i, p in enumerate(prompts):
            cols = slice(0, len(p)) if side == "right" else slice(longest - len(p), longest)
            ids[i, cols], mask[i, cols] = p, True
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        logits = model(ids, attention_mask=mask, position_ids=pos).logits.numpy()
        for i, p in enumerate(prompts):
            cols = slice(0, len(p)) if side == "right" else slice(longest - len(p), longest)
            assert np.abs(logits[i, cols] - model.logits(p)).max() <= 1e-4, side


def test_chunked_prefill_equals_one_pass(model):
    """A right-padded batch prefilled 4 tokens at a time (the short row ends inside a chunk, not at its end) gives
    each row's own last logits and the same greedy tokens as one prefill pass."""
    from ernie_paddle.generation import prefill, right_padded

    prompts = [prompt(n, model.config.vocab_size, seed=n) for n in (5, 18)]
    one = generate(model, prompts, GenerationConfig(max_new_tokens=16, **NO_EOS))
    assert generate(model, prompts, GenerationConfig(max_new_tokens=16, prefill_chunk=4, **NO_EOS)) == one
    ids, mask, pos = right_padded([np.array(p) for p in prompts], 0, 18)
    lengths = np.array([5, 18])
    last = [prefill(model, ids, mask, pos, model.allocate_cache(2, 18), chunk, lengths) for chunk in (18, 4)]
    assert last[0].shape == (2, model.config.vocab_size)
    assert np.abs(last[0] - last[1]).max() <= 1e-5
    for i, p in enumerate(prompts):
        assert np.abs(last[1][i] - model.logits(p)[-1]).max() <= 1e-4


def test_sampling_is_seeded_and_filters_agree_with_greedy(model):
    ids = prompt(5, model.config.vocab_size, seed=9)
    greedy = generate(model, ids, GenerationConfig(max_new_tokens=12, **NO_EOS))
    s = dict(max_new_tokens=12, do_sample=True, temperature=1.5, **NO_EOS)
    a = generate(model, ids, GenerationConfig(seed=1, **s))
    assert a == generate(model, ids, GenerationConfig(seed=1, **s))
    assert a != generate(model, ids, GenerationConfig(seed=2, **s))
    assert generate(model, ids, GenerationConfig(seed=1, top_k=1, **s)) == greedy
    assert generate(model, ids, GenerationConfig(seed=1, top_p=1e-6, **s)) == greedy


def test_process_logits_filters():
    x = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    top_k = process_logits(x, [np.array([], np.int64)], GenerationConfig(do_sample=True, top_k=2))
    assert np.isfinite(top_k).tolist() == [[True, True, False, False]]
    top_p = process_logits(x, [np.array([], np.int64)], GenerationConfig(do_sample=True, top_p=0.7))
    assert np.isfinite(top_p).tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    limited = process_logits(x, [np.array([], np.int64)], GenerationConfig(vocab_limit=2))
    assert np.isfinite(limited).tolist() == [[True, True, False, False]]
    rep = process_logits(np.array([[2.0, -2.0, 1.0]], np.float32), [np.array([0, 1])],
                         GenerationConfig(repetition_penalty=2.0))
    assert rep.tolist() == [[1.0, -4.0, 1.0]]


def test_eos_and_stop_ids_end_generation_and_stream_matches(model):
    ids = prompt(5, model.config.vocab_size, seed=4)
    free = generate(model, ids, GenerationConfig(max_new_tokens=10, **NO_EOS))
    assert generate(model, ids, GenerationConfig(max_new_tokens=10, eos_token_ids=[free[3]])) == \
        free[:free.index(free[3]) + 1]
    assert generate(model, ids, GenerationConfig(max_new_tokens=10, eos_token_ids=[], stop_token_ids=[free[0]])) == \
        free[:1]
    assert list(stream(model, ids, GenerationConfig(max_new_tokens=10, **NO_EOS))) == free


def test_sorted_grouped_moe_equals_mask_loop(model):
    ids = prompt(64, model.config.vocab_size, seed=6)
    ref = model.logits(ids)
    model.set_expert_pass("mask-loop")
    try:
        assert np.abs(model.logits(ids) - ref).max() <= 1e-5
    finally:
        model.set_expert_pass("sorted")


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=0.0, do_sample=True), "temperature must be > 0, got 0.0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_k=-1), "top_k must be a non-negative integer, got -1"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a non-negative integer, got -3"),
    (dict(prefill_chunk=0), "prefill_chunk must be a positive integer, got 0"),
])
def test_bad_generation_arguments(model, kwargs, message):
    with pytest.raises(InputError, match=message):
        generate(model, [5, 6], GenerationConfig(**kwargs))


def test_bad_prompts(model):
    v = model.config.vocab_size
    with pytest.raises(InputError, match=f"token id {v} at position 1 is out of range for vocab_size {v}"):
        generate(model, [5, v, 6])
    with pytest.raises(InputError, match="token id -1 at position 0"):
        model.logits([-1, 4])
    with pytest.raises(InputError, match="prompt 0 is empty"):
        generate(model, [[]])
    with pytest.raises(InputError, match="^prompt 0 of 3 tokens \\+ max_new_tokens 2046 = 2049 exceeds the context "
                                         "of 2048 tokens$"):
        generate(model, [1, 2, 3], GenerationConfig(max_new_tokens=2046))


def test_building_the_model_restores_the_callers_default_dtype(tiny_ckpt):
    import paddle

    before = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        model = Ernie4_5_MoeForCausalLM(tiny_ckpt[1])
        assert paddle.get_default_dtype() == "float64"
        assert {str(p.dtype) for p in model.parameters()} == {"paddle.float32"}
    finally:
        paddle.set_default_dtype(before)
