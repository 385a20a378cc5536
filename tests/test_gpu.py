"""GPU paths (bf16/fp16 compute); skipped on CPU-only machines, where Paddle computes in float32 only."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from ernie_paddle.errors import InputError
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.modeling import Ernie4_5_MoeForCausalLM

from conftest import prompt

needs_gpu = pytest.mark.skipif(not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0,
                               reason="needs a CUDA GPU and Paddle's GPU build (CPU kernels are float32 only)")


def test_low_precision_on_cpu_is_refused_with_a_clear_error(tiny_ckpt):
    if paddle.is_compiled_with_cuda():
        pytest.skip("this machine has Paddle's GPU build; the CPU refusal is tested on CPU builds")
    with pytest.raises(InputError, match="dtype bfloat16 needs a GPU"):
        Ernie4_5_MoeForCausalLM.from_pretrained(tiny_ckpt[0], dtype="bfloat16")


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.35), ("float16", 0.05)])
def test_gpu_low_precision_tracks_fp32(tiny_ckpt, dtype, tol):
    d, cfg = tiny_ckpt
    paddle.set_device("gpu")
    ids = prompt(16, cfg.vocab_size, seed=1)
    ref = Ernie4_5_MoeForCausalLM.from_pretrained(d).logits(ids)
    low = Ernie4_5_MoeForCausalLM.from_pretrained(d, dtype=dtype)
    got = low.logits(ids)
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert len(generate(low, ids, GenerationConfig(max_new_tokens=8, eos_token_ids=[]))) == 8
