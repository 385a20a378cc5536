"""GPU paths (bf16/fp16 compute); skipped on CPU-only machines, where Paddle computes in float32 only."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from ernie_paddle.errors import InputError
from ernie_paddle.generation import GenerationConfig, generate
from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

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


def test_fused_moe_data_flow_on_cpu_with_the_ops_contracts(tiny_ckpt):
    """The GPU MoE path (`kernels_gpu.fused_moe`: dispatch -> grouped GEMM -> combine) run on CPU with the stand-ins
    of tests/gpu_standins.py, against the reference path (`moe.route` + the sorted expert pass of the model).

    What this can catch: a wrong data flow between the three ops (routing probabilities, mixing weights, row order,
    counts) and any drift from `moe.route`. What it cannot: a misreading of `batched_gemm` / `moe_combine`
    themselves, since their stand-ins encode this project's reading of those ops; only
    `test_fused_kernels_match_the_reference_path_on_gpu` runs the real ops. The dispatch stand-in takes its
    routing from Paddle's own pure-Python fallback of `moe_gate_dispatch`, so that op's contract is Paddle's."""
    import gpu_standins
    from ernie_paddle.paddle import kernels_gpu
    from ernie_paddle.paddle.moe import route, sorted_grouped

    model = Ernie4_5_MoeForCausalLM.from_pretrained(tiny_ckpt[0])
    block = model.layers[1].mlp
    h = paddle.to_tensor(np.random.default_rng(0).standard_normal((37, model.config.hidden_size)).astype("float32"))
    w, experts = route(h, block.gate.weight, block.e_score_correction_bias, block.k, block.norm_min)
    ref = sorted_grouped(h, w, experts, block.num_experts, lambda e, x: block.experts[e](x))
    assert np.abs(block(h).numpy() - ref.numpy() - block.shared_experts(h).numpy()).max() <= 1e-5  # the model's
    block.stack_experts()
    got, got_experts = kernels_gpu.fused_moe(h, block.gate.weight, block.e_score_correction_bias, block.k,
                                             block.norm_min, block.w_up_gate, block.w_down,
                                             dispatch=gpu_standins.dispatch, grouped_gemm=gpu_standins.grouped_gemm,
                                             combine=gpu_standins.combine)
    assert np.abs(got.numpy() - ref.numpy()).max() <= 1e-5
    assert [set(r) for r in got_experts.numpy()] == [set(r) for r in experts.numpy()]


def test_expert_pass_is_one_of_the_named_passes_that_the_weights_allow(tiny_ckpt):
    model = Ernie4_5_MoeForCausalLM.from_pretrained(tiny_ckpt[0])
    with pytest.raises(InputError, match="set_expert_pass: name must be one of sorted, mask-loop, fused, got 'loop'"):
        model.set_expert_pass("loop")
    with pytest.raises(InputError, match=r"the 'fused' pass needs the stacked expert weights \(use_fused_kernels\)"):
        model.set_expert_pass("fused")
    block = model.layers[1].mlp
    assert block.expert_pass == "sorted"
    block.stack_experts()  # as use_fused_kernels does on a GPU
    with pytest.raises(InputError, match=r"the 'mask-loop' pass needs the per-expert weights"):
        block.set_expert_pass("mask-loop")
    block.set_expert_pass("fused")
    assert block.expert_pass == "fused"


@needs_gpu
def test_fused_kernels_match_the_reference_path_on_gpu(tiny_ckpt):
    d, cfg = tiny_ckpt
    paddle.set_device("gpu")
    ids = prompt(24, cfg.vocab_size, seed=2)
    reference = Ernie4_5_MoeForCausalLM.from_pretrained(d, fused=False)
    fused = Ernie4_5_MoeForCausalLM.from_pretrained(d, fused=True)
    assert np.abs(fused.logits(ids) - reference.logits(ids)).max() <= 1e-3
    gen = GenerationConfig(max_new_tokens=16, eos_token_ids=[])
    assert generate(fused, ids, gen) == generate(reference, ids, gen)
