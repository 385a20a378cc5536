"""Tensor and expert parallelism for inference, on Paddle's collective stack (fleet's hybrid topology).

Megatron-style: the N ranks of fleet's model-parallel group all see the same tokens, and each holds a slice:

* attention: rank r holds query heads [r·nh/N, (r+1)·nh/N) and KV heads [r·nkv/N, (r+1)·nkv/N), i.e. the qkv_proj
  columns [Q_r | K_r | V_r], and the matching rows of o_proj. GQA groups stay whole on one rank, and the rank's
  KV cache holds its own KV heads only (the model is built from a per-rank config with nh/N and nkv/N heads).
* dense MLP, shared experts: up_gate_proj columns [gate_r | up_r] and the matching down_proj rows.
* routed experts: ep = N (expert parallelism): rank r holds experts [r·E/N, (r+1)·E/N) whole; ep = 1: every expert
  is sliced like the dense MLP. The fp32 router is replicated, so every rank makes the same choices.
* embeddings, norms, lm_head: replicated.

Each decoder layer's attention and MLP/MoE outputs are then partial sums over ranks: one `dist.all_reduce` each on
the group (routed and shared experts summed before their one all-reduce). The model's math is `modeling.py`'s,
unchanged; this module only builds each rank's slice of it (with `paddle.LazyGuard`, so no rank ever allocates the
full model), reads only its slices from the checkpoint (one canonical tensor at a time; other ranks' experts are
never read), and adds the all-reduces as forward post-hooks.

Why not fleet's own `ColumnParallelLinear` / `RowParallelLinear` / `VocabParallelEmbedding`: in Paddle 3.3.1 they do
not run on CPU (`c_identity` has no CPU kernel; with `mp_skip_c_identity` the row-parallel layer then fails with
"ProcessGroupGLOO does not support all_reduce with sync_op and use_calc_stream flag"), so they could not be tested
here; the plain `paddle.distributed.all_reduce` on fleet's model-parallel group runs on gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations


import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn

from ernie_paddle import files
from ernie_paddle.paddle import kernels_gpu
from ernie_paddle.checkpoint.folder import open_checkpoint
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import InputError
from ernie_paddle.checkpoint.layout import TensorMap, iter_canonical
from ernie_paddle.paddle.modeling import MLP, Ernie4_5_MoeForCausalLM, SparseMoeBlock, default_dtype
from ernie_paddle.paddle.weights import fill_parameters


@dataclass(frozen=True)
class ParallelPlan:
    """How the model is split: `tp` ranks in the model-parallel `group`; this process is `rank` in it.

    `ep` is `tp` (routed experts split by expert id) or 1 (every expert split by width, like the dense MLP).
    """

    tp: int = 1
    ep: int = 1
    rank: int = 0
    group: Any = None  # fleet's model-parallel communication group (None: one process)

    def experts_held(self, cfg: ErnieConfig) -> range:
        """Ids of the routed experts this rank holds whole (all of them when ep == 1: then sliced by width)."""
        per = cfg.moe_num_experts // self.ep
        return range(self.rank * per, (self.rank + 1) * per) if self.ep > 1 else range(cfg.moe_num_experts)


def check_degrees(tp: int, ep: int) -> None:
    if not isinstance(tp, int) or tp < 1:
        raise InputError(f"the tensor-parallel degree must be a positive integer, got {tp!r}")
    if ep not in (1, tp):
        raise InputError(f"the expert-parallel degree must be 1 (experts split by width) or the tensor-parallel "
                         f"degree {tp} (experts split by id), got {ep}")


def check_plan(cfg: ErnieConfig, tp: int, ep: int) -> None:
    """Raise InputError naming the config field that does not split `tp` (or `ep`) ways."""
    check_degrees(tp, ep)
    if tp == 1:
        return
    fields = [("num_attention_heads", cfg.num_attention_heads), ("num_key_value_heads", cfg.num_key_value_heads)]
    if any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        fields.append(("intermediate_size", cfg.intermediate_size))
    if cfg.is_moe_model and (ep == 1 or cfg.moe_num_shared_experts > 0):  # routed or shared experts split by width
        fields.append(("moe_intermediate_size", cfg.moe_intermediate_size))
    for name, value in fields:
        if value % tp:
            ok = [n for n in range(1, value + 1) if all(v % n == 0 for _, v in fields)]
            raise InputError(f"{name} ({value}) is not divisible by the tensor-parallel degree {tp}; degrees that "
                             f"split this model: {', '.join(map(str, ok))}")
    if ep > 1 and cfg.moe_num_experts % ep:
        raise InputError(f"moe_num_experts ({cfg.moe_num_experts}) is not divisible by the expert-parallel degree "
                         f"{ep}; use ep=1 (experts split by width) or a degree dividing {cfg.moe_num_experts}")


def init(tp_degree: int | None = None, ep_degree: int | None = None) -> ParallelPlan:
    """Join the job started by `python -m paddle.distributed.launch` and set up fleet's hybrid topology.

    Every process of the job is one model-parallel rank: `tp_degree` (default: the job's size) must equal the number
    of processes. `ep_degree` defaults to `tp_degree`. One process and tp 1: no collectives at all.
    """
    world = dist.get_world_size()
    tp = world if tp_degree is None else tp_degree
    ep = tp if ep_degree is None else ep_degree
    if tp != world:
        raise InputError(f"tensor-parallel degree {tp} needs {tp} processes, this job has {world}: launch it with "
                         f"`python -m paddle.distributed.launch --nproc_per_node {tp} ...` (or --devices with {tp} "
                         f"GPUs)")
    check_degrees(tp, ep)
    if tp == 1:
        return ParallelPlan()
    from paddle.distributed import fleet

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": tp, "pp_degree": 1}
    fleet.init(is_collective=True, strategy=strategy)  # also selects this process's GPU on a GPU build
    hcg = fleet.get_hybrid_communicate_group()
    return ParallelPlan(tp=tp, ep=ep, rank=hcg.get_model_parallel_rank(), group=hcg.get_model_parallel_group())


def local_config(cfg: ErnieConfig, plan: ParallelPlan) -> ErnieConfig:
    """The config of one rank's slice: nh/N query and nkv/N KV heads, MLP widths divided by N (the shared experts'
    too, and the routed experts' when ep == 1; with ep > 1 `build` gives the held experts their full width)."""
    n = plan.tp
    return cfg.replace(num_attention_heads=cfg.num_attention_heads // n,
                       num_key_value_heads=cfg.num_key_value_heads // n, intermediate_size=cfg.intermediate_size // n,
                       moe_intermediate_size=cfg.moe_intermediate_size // n)


def shard_tensor(m: TensorMap, a: np.ndarray, plan: ParallelPlan) -> np.ndarray:
    """This rank's slice of canonical tensor `a` (map `m`, Paddle [in, out] layout), as `m.role.tp_axis` says;
    replicated tensors, and experts held whole, come back as they are.

    Columns are sliced block by block ([Q_r | K_r | V_r], [gate_r | up_r]) so that heads and gate/up halves stay
    together."""
    n, r, axis = plan.tp, plan.rank, m.role.tp_axis
    if n == 1 or axis is None or (m.role.routed_expert and plan.ep > 1):
        return a
    if axis == 0:  # rows of the split input (o_proj, down_proj)
        return np.split(a, n, axis=0)[r]
    return np.concatenate([np.split(b, n, axis=1)[r] for b in m.out_blocks(a)], axis=1)


class HeldExperts(nn.Layer):
    """The routed experts one rank holds, registered under their global ids, so parameter names stay canonical
    (`layers.{i}.mlp.experts.{e}.…`). An expert held by another rank gives zeros here: that rank adds its share in
    the layer's all-reduce. `SparseMoeBlock.forward` indexes it like the full LayerList."""

    def __init__(self, experts: dict[int, nn.Layer]):
        super().__init__()
        for e, mlp in experts.items():
            self.add_sublayer(str(e), mlp)

    def __getitem__(self, e: int):
        return self._sub_layers.get(str(e), paddle.zeros_like)  # an MLP maps [n, H] -> [n, H]

    def __len__(self) -> int:
        return len(self._sub_layers)

    def __iter__(self):
        return iter(self._sub_layers.values())


class RankModel(Ernie4_5_MoeForCausalLM):
    """One rank's slice of the model: `config` is the slice's (see `local_config`), `full_config` the whole
    model's, and `plan` says which slice this is."""

    def __init__(self, full_config: ErnieConfig, plan: ParallelPlan, dtype: str = "float32"):
        super().__init__(local_config(full_config, plan), dtype)
        self.full_config, self.plan = full_config, plan


def build(cfg: ErnieConfig, plan: ParallelPlan, dtype: str = "float32") -> RankModel:
    """This rank's slice of the model, parameters not yet allocated (`paddle.LazyGuard`); `load` fills them."""
    check_plan(cfg, plan.tp, plan.ep)
    with paddle.LazyGuard():
        model = RankModel(cfg, plan, dtype)
        for layer in model.layers:
            if isinstance(layer.mlp, SparseMoeBlock) and plan.ep > 1:  # whole experts, only this rank's
                with default_dtype(dtype):
                    layer.mlp.experts = HeldExperts({e: MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                                     for e in plan.experts_held(cfg)})
            if plan.tp > 1:
                layer.self_attn.register_forward_post_hook(_all_reduce_hook(plan.group))
                layer.mlp.register_forward_post_hook(_all_reduce_hook(plan.group))
    if plan.tp > 1:
        model.register_forward_post_hook(_same_logits_hook(plan.group))
    return model


def _all_reduce_hook(group):
    def hook(layer, inputs, out):  # the layer's output is this rank's partial sum
        dist.all_reduce(out, group=group)
        return out
    return hook


def _same_logits_hook(group):
    """Replicated math gives every rank the same logits; broadcasting the first rank's (vocab floats a step) makes
    the next token agree by construction, so that no rank can run a different number of steps and hang the rest."""
    def hook(layer, inputs, out):
        dist.broadcast(out.logits, src=group.ranks[0], group=group)
        return out
    return hook


def load(model: RankModel, directory: str, allow_pickle: bool = False) -> None:
    """Fill a `build` model with its slices of the checkpoint in `directory` (-Paddle or -PT layout).

    The whole checkpoint is checked against the config (`layout.iter_canonical`, as `checkpoint.load_weights`), then
    read one canonical tensor at a time and sliced; tensors this rank does not hold (other ranks' experts) are never
    read.
    """
    cfg, plan = model.full_config, model.plan
    held = {name for name, _ in model.named_parameters()}
    elsewhere = (lambda m: m.role.routed_expert and m.canonical not in held) if plan.ep > 1 else None
    reader = open_checkpoint(directory, allow_pickle)
    try:
        slices = ((m, np.ascontiguousarray(shard_tensor(m, full, plan)))
                  for m, full in iter_canonical(cfg, reader, skip=elsewhere))
        fill_parameters(model, slices, directory, what=f"rank {plan.rank}")
    finally:
        reader.close()


def from_pretrained_parallel(directory: str, plan: ParallelPlan | None = None, *, dtype: str = "float32",
                             strict_config: bool = False, fused: bool | None = None,
                             allow_pickle: bool = False) -> RankModel:
    """This rank's slice of the checkpoint in `directory`, ready for `forward` / `generation.generate` (run them on
    every rank with the same inputs; every rank gets the full logits). `plan` defaults to `init()`."""
    plan = plan or init()
    cfg = ErnieConfig.from_file(os.path.join(directory, files.CONFIG), strict=strict_config)
    model = build(cfg, plan, dtype)
    load(model, directory, allow_pickle)
    if fused or (fused is None and kernels_gpu.gpu_active()):
        model.use_fused_kernels()  # norms, RoPE, attention; MoE blocks holding some experts keep the sorted pass
    return model


__all__ = ["ParallelPlan", "RankModel", "init", "check_plan", "local_config", "shard_tensor", "build", "load",
           "from_pretrained_parallel"]
