"""Tensor + expert parallelism (`ernie_paddle.paddle.distributed`): 2 CPU processes (gloo) under Paddle's launcher must give
the single-process logits within 1e-5 and the same greedy tokens, with the KV cache and left-padded batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import prompt, tiny_config
from ernie_paddle.paddle.distributed import ParallelPlan, check_plan, init, local_config, shard_tensor
from ernie_paddle.errors import InputError
from ernie_paddle.checkpoint.layout import canonical_maps

TOOL = (sys.executable, "-m", "ernie_paddle.tools.dist_generate")  # the launcher runs a command: the documented form
TOL = 1e-5
# 4 heads / 2 KV heads, 8 experts top-2, 2 shared experts, layer 0 dense (conftest's tiny config), untied head
MODEL = dict(tie_word_embeddings=False, seed=5)

# Run on every rank: both expert layouts on one fleet topology; the first rank writes what it computed.
WORKER = textwrap.dedent("""
    import json, sys
    from dataclasses import replace
    from ernie_paddle.paddle import distributed
    from ernie_paddle.generation import GenerationConfig, generate

    ckpt, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    plan = distributed.init()
    result = {"tp": plan.tp}
    for ep in (plan.tp, 1):
        model = distributed.from_pretrained_parallel(ckpt, replace(plan, ep=ep))
        result[f"ep{ep}"] = {"logits": model.logits(prompts[0]).tolist(),
                             "tokens": generate(model, prompts, GenerationConfig(max_new_tokens=8))}
    if plan.rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
""")


def launch(tmp_path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m paddle.distributed.launch --nproc_per_node 2 ARGS`, failing with the workers' logs."""
    log_dir = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    r = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                        str(log_dir), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode:
        logs = "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("workerlog.*")))
        pytest.fail(f"launch failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}\n{logs}")
    return r


@pytest.fixture(scope="module")
def reference(ckpt_factory):
    from ernie_paddle.generation import GenerationConfig, generate
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

    directory, cfg = ckpt_factory("dist-tiny", **MODEL)
    prompts = [prompt(12, cfg.vocab_size, seed=1), prompt(5, cfg.vocab_size, seed=2)]  # batch: left padding
    model = Ernie4_5_MoeForCausalLM.from_pretrained(directory)
    return directory, prompts, model.logits(prompts[0]), generate(model, prompts, GenerationConfig(max_new_tokens=8))


def test_two_processes_match_one(reference, tmp_path):
    directory, prompts, logits, tokens = reference
    script, out = tmp_path / "worker.py", tmp_path / "out.json"
    script.write_text(WORKER)
    launch(tmp_path, str(script), directory, str(out), json.dumps(prompts))
    result = json.loads(out.read_text())
    assert result["tp"] == 2
    for ep in ("ep2", "ep1"):  # experts split by id / every expert split by width
        diff = float(np.abs(np.asarray(result[ep]["logits"], dtype=np.float32) - logits).max())
        print(f"{ep}: max |logits - single-process logits| = {diff:.2e}")
        assert diff <= TOL, ep
        assert result[ep]["tokens"] == tokens, ep


def test_tool_generate_prints_once(reference, tmp_path):
    directory, prompts, _, tokens = reference
    launch(tmp_path, *TOOL, "generate", "--model", directory, "--input-ids", ",".join(map(str, prompts[0])),
           "--max-new-tokens", "8", "--json")
    logs = {p.name: p.read_text() for p in (tmp_path / "log").glob("workerlog.*")}
    printed = [json.loads(ln) for ln in logs["workerlog.0"].splitlines() if ln.startswith("{")]
    assert [p["token_ids"] for p in printed] == [tokens[0]]
    assert '"token_ids"' not in logs["workerlog.1"]  # the other rank computes silently


def test_indivisible_sizes_name_the_field():
    cfg = tiny_config()  # 4 heads, 2 KV heads, 8 experts
    with pytest.raises(InputError, match=r"num_key_value_heads \(2\) is not divisible by the tensor-parallel degree 4"):
        check_plan(cfg, 4, 4)
    with pytest.raises(InputError, match=r"num_attention_heads \(4\) is not divisible .* degree 3"):
        check_plan(cfg, 3, 3)
    cfg6 = tiny_config(num_key_value_heads=4, moe_num_experts=6)
    with pytest.raises(InputError, match=r"moe_num_experts \(6\) is not divisible by the expert-parallel degree 4"):
        check_plan(cfg6, 4, 4)
    check_plan(cfg6, 4, 1)  # experts split by width instead: fine
    with pytest.raises(InputError, match="expert-parallel degree must be 1 .* or the tensor-parallel degree 2"):
        check_plan(cfg, 2, 4)
    with pytest.raises(InputError, match="tensor-parallel degree 2 needs 2 processes, this job has 1"):
        init(2)


def test_slices_keep_heads_and_gate_up_halves_together():
    cfg = tiny_config()  # nh 4, nkv 2, head_dim 16
    d, h = cfg.head_dim, cfg.hidden_size
    maps = canonical_maps(cfg)
    heads = np.repeat(np.arange(cfg.num_attention_heads + 2 * cfg.num_key_value_heads), d)[None].repeat(h, 0)
    for r in range(2):
        plan = ParallelPlan(tp=2, ep=2, rank=r)
        local = local_config(cfg, plan)
        q = shard_tensor(maps["layers.0.self_attn.qkv_proj.weight"], heads, plan)
        assert q.shape == (h, (local.num_attention_heads + 2 * local.num_key_value_heads) * d)
        # [Q_r | K_r | V_r]: query heads 2r, 2r+1; key head 4 + r; value head 6 + r
        assert np.unique(q[0]).tolist() == [2 * r, 2 * r + 1, 4 + r, 6 + r]
        up_gate = np.concatenate([np.zeros((h, 160)), np.ones((h, 160))], axis=1)
        part = shard_tensor(maps["layers.0.mlp.up_gate_proj.weight"], up_gate, plan)
        assert part.shape == (h, 160) and (part[:, :80] == 0).all() and (part[:, 80:] == 1).all()
        expert = np.arange(h * 64.0).reshape(h, 64)
        assert shard_tensor(maps["layers.1.mlp.experts.3.up_gate_proj.weight"], expert, plan) is expert
        assert shard_tensor(maps["layers.1.mlp.experts.3.up_gate_proj.weight"], expert,
                            ParallelPlan(tp=2, ep=1, rank=r)).shape == (h, 32)


def test_a_rank_model_holds_its_plan_and_restores_the_default_dtype():
    import paddle

    from ernie_paddle.paddle.distributed import RankModel, build

    cfg = tiny_config()
    before = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        model = build(cfg, ParallelPlan(tp=2, ep=2, rank=1))  # experts held whole: built under the compute dtype
        assert paddle.get_default_dtype() == "float64"
    finally:
        paddle.set_default_dtype(before)
    assert isinstance(model, RankModel) and model.full_config == cfg and model.plan == ParallelPlan(tp=2, ep=2, rank=1)
    assert model.config == local_config(cfg, model.plan)
    assert sorted(int(e) for e in model.layers[1].mlp.experts._sub_layers) == [4, 5, 6, 7]
