"""The `portable` flavour: standard ONNX operators only, produced from the Paddle model by paddle2onnx.

The loaded `Ernie4_5_MoeForCausalLM` is wrapped in a trace-friendly forward (`PortableErnie`) that avoids
what paddle2onnx cannot map or maps wrongly: no `swiglu`/fused norms (SiLU·up and a manual RMSNorm, as the
model already does), GQA by broadcasting matmul instead of `repeat_interleave`, the KV cache as concat
(past, new), a bottom-right causal mask built from positions, and the MoE as a dense masked combine (every
expert on every token: exact, slow, any runtime). `paddle.jit.save` writes the program; paddle2onnx runs in
a subprocess (it aborts the process on unsupported ops); the result gets the input/output names of
`graph_contract.PORTABLE` (genai's), its weights lifted from Constant nodes into external-data initializers, and
shared dynamic dimension names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from typing import Callable

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_paddle import graph_contract as contract
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import ExportError
from ernie_paddle.graph_contract import (ATTENTION_MASK, BATCH, INPUT_IDS, LOGITS, PAST_SEQUENCE, POSITION_IDS,
                                         PORTABLE, SEQUENCE, TOTAL_SEQUENCE)
from ernie_paddle.memory import fp32_bytes
from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM, SparseMoeBlock
from ernie_paddle.paddle.moe import mix_weights, router_probs, select
from ernie_paddle.rope import inv_freq as rope_inv_freq

OPSET = 21  # paddle2onnx 2.1.0 goes up to 21
PROTOBUF_LIMIT = 2 * 1024**3


def rotate(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """Interleaved rotary embedding of x [B, S, h, d] (pairs (0,1), (2,3), ...), as ERNIE applies it."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return paddle.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape([0, 0, 0, x.shape[-1]])


class PortableErnie(nn.Layer):
    """A trace-friendly forward over a loaded `Ernie4_5_MoeForCausalLM`'s own layers and weights, written with
    operators paddle2onnx maps exactly (see the module docstring). Inputs and outputs are genai's: input_ids,
    attention_mask, position_ids and the past key/values in; logits and the present key/values out."""

    def __init__(self, model):
        super().__init__()
        self.m = model
        cfg = model.config
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.register_buffer("inv_freq", paddle.to_tensor(np.array(rope_inv_freq(self.d, cfg.rope_theta))))

    def attention(self, attn, h, cos, sin, bias, past_k, past_v):
        """GQA by broadcasting matmul over [B, nkv, rep, S, T]; the cache grows by concat(past, new)."""
        nh, nkv, d = self.nh, self.nkv, self.d
        qkv = attn.qkv_proj(h).reshape([0, 0, nh + 2 * nkv, d])
        q, k, v = paddle.split(qkv, [nh, nkv, nkv], axis=2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = paddle.concat([past_k, k.transpose([0, 2, 1, 3])], axis=2)  # [B, nkv, T, d]
        v = paddle.concat([past_v, v.transpose([0, 2, 1, 3])], axis=2)
        q = q.reshape([0, 0, nkv, nh // nkv, d]).transpose([0, 2, 3, 1, 4])  # [B, nkv, rep, S, d]
        scores = paddle.matmul(q, k.unsqueeze(2), transpose_y=True) * (d ** -0.5) + bias  # [B, nkv, rep, S, T]
        out = paddle.matmul(F.softmax(scores, axis=-1), v.unsqueeze(2))  # [B, nkv, rep, S, d]
        out = out.transpose([0, 3, 1, 2, 4]).reshape([0, 0, nh * d])
        return attn.o_proj(out), k, v

    def moe(self, block, x):
        """ERNIE's routing (`ernie_paddle.paddle.moe`) as a dense [N, E] weight matrix: every expert runs on every token
        and unselected experts get weight 0 (exact; no data-dependent shapes for the exporter)."""
        flat = x.reshape([-1, self.m.config.hidden_size])
        probs = router_probs(flat, block.gate.weight)  # [N, E] fp32
        experts = select(probs, block.e_score_correction_bias, block.k)
        weights = mix_weights(probs, experts, block.norm_min)
        dense = paddle.put_along_axis(paddle.zeros_like(probs), experts, weights, axis=1)  # [N, E]
        y = paddle.zeros_like(flat)
        for e, expert in enumerate(block.experts):
            y = y + dense[:, e:e + 1] * expert(flat)
        if block.shared_experts is not None:
            y = y + block.shared_experts(flat)
        return y.reshape(paddle.shape(x))

    @staticmethod
    def causal_bias(input_ids, attention_mask):
        """Additive mask [B, 1, 1, S, T]: bottom-right causal (the S new tokens are the last of T slots), padded
        keys masked too."""
        s = paddle.shape(input_ids)[1]
        t = paddle.shape(attention_mask)[1]
        q_slot = paddle.arange(s, dtype="int64") + (t - s)
        allowed = paddle.arange(t, dtype="int64").unsqueeze(0) <= q_slot.unsqueeze(1)  # [S, T] bottom-right
        allowed = paddle.logical_and(allowed.unsqueeze(0), attention_mask.unsqueeze(1) > 0)  # [B, S, T]
        bias = (1.0 - allowed.astype("float32")) * -1.0e9
        return bias.unsqueeze(1).unsqueeze(1)

    def forward(self, input_ids, attention_mask, position_ids, past):
        m = self.m
        angles = position_ids.astype("float32").unsqueeze(-1) * self.inv_freq  # [B, S, d/2]
        cos, sin = paddle.cos(angles).unsqueeze(2), paddle.sin(angles).unsqueeze(2)
        bias = self.causal_bias(input_ids, attention_mask)
        x = m.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(m.layers):
            a, k, v = self.attention(layer.self_attn, layer.input_layernorm(x), cos, sin, bias, past[2 * i],
                                     past[2 * i + 1])
            presents += [k, v]
            h = x + a
            n = layer.post_attention_layernorm(h)
            x = h + (self.moe(layer.mlp, n) if isinstance(layer.mlp, SparseMoeBlock) else layer.mlp(n))
        x = m.norm(x)
        logits = paddle.matmul(x, m.embed_tokens.weight, transpose_y=True) if m.lm_head is None else m.lm_head(x)
        return [logits] + presents


def _p2o(json_path: str, params_path: str, out_path: str) -> None:
    """paddle2onnx in a child process: on unsupported ops it aborts the whole process (SIGABRT)."""
    code = ("import sys, paddle2onnx; paddle2onnx.export(sys.argv[1], sys.argv[2], sys.argv[3], "
            f"opset_version={OPSET}, auto_upgrade_opset=True, enable_onnx_checker=True, optimize_tool='none')")
    r = subprocess.run([sys.executable, "-c", code, json_path, params_path, out_path], capture_output=True,
                       text=True)
    if r.returncode != 0 or not os.path.isfile(out_path) or os.path.getsize(out_path) == 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise ExportError(f"paddle2onnx failed (exit {r.returncode}) converting {json_path}: {tail}")


def _finish(onnx_path: str, out_path: str, cfg: ErnieConfig) -> None:
    """genai names, Constant weights -> external-data initializers, shared dynamic dimension names."""
    import onnx

    from ernie_paddle.export.graph import INLINE_LIMIT, data_file_for

    model = onnx.load(onnx_path)
    g = model.graph
    _rename_outputs(g, cfg.num_hidden_layers)
    _lift_constants(g, INLINE_LIMIT)
    _name_dynamic_dims(g)
    del g.value_info[:]
    _, data_name = data_file_for(out_path)
    onnx.save_model(model, out_path, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=INLINE_LIMIT)


def _rename_outputs(g, num_layers: int) -> None:
    """paddle2onnx's output names -> the contract's: logits, then each layer's present key and value."""
    names = PORTABLE.outputs(num_layers)
    if len(g.output) != len(names):
        raise ExportError(f"paddle2onnx produced {len(g.output)} outputs, expected {len(names)}")
    renames = {o.name: new for o, new in zip(g.output, names)}
    for node in g.node:
        node.output[:] = [renames.get(x, x) for x in node.output]
        node.input[:] = [renames.get(x, x) for x in node.input]
    for o in g.output:
        o.name = renames[o.name]


def _lift_constants(g, inline_limit: int) -> None:
    """Constant nodes over `inline_limit` bytes (the weights) become initializers, so they can go to external data;
    initializers nothing reads are dropped."""
    from onnx import numpy_helper

    keep = []
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = node.attribute[0].t
            if numpy_helper.to_array(t).nbytes > inline_limit:
                t.name = node.output[0]
                g.initializer.append(t)
                continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    used = {x for node in g.node for x in node.input}
    unused = [t for t in g.initializer if t.name not in used]
    for t in unused:
        g.initializer.remove(t)


def _name_dynamic_dims(g) -> None:
    """The dynamic dimensions get the names the ort flavour and genai use (batch_size, sequence_length, ...)."""
    dims = {INPUT_IDS: [BATCH, SEQUENCE], ATTENTION_MASK: [BATCH, TOTAL_SEQUENCE], POSITION_IDS: [BATCH, SEQUENCE]}
    wanted = [(v, dims.get(v.name, [BATCH, None, PAST_SEQUENCE, None])) for v in g.input]
    wanted += [(v, [BATCH, SEQUENCE, None] if v.name == LOGITS else [BATCH, None, TOTAL_SEQUENCE, None])
               for v in g.output]
    for v, want in wanted:
        for dim, name in zip(v.type.tensor_type.shape.dim, want):
            if name:
                dim.dim_param = name


def export_portable(model_dir: str, cfg: ErnieConfig, out_path: str, log: Callable[[str], None] = lambda s: None
                    ) -> None:
    """Write the standard-operator graph of the checkpoint to `out_path` (plus `<out_path>.data`)."""
    size = fp32_bytes(cfg)
    if size >= PROTOBUF_LIMIT:
        raise ExportError(f"the portable flavour goes through paddle2onnx, which cannot write models over 2 GiB "
                          f"(protobuf limit); this model has {size / 2**30:.1f} GiB of fp32 weights. Use --flavor "
                          f"ort, which streams weights to external data at any size")
    log("export: loading the Paddle model")
    model = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir, config=cfg)
    module = PortableErnie(model)
    module.eval()
    nkv, d = cfg.num_key_value_heads, cfg.head_dim
    spec = [paddle.static.InputSpec([None, None], "int64", INPUT_IDS),
            paddle.static.InputSpec([None, None], "int64", ATTENTION_MASK),
            paddle.static.InputSpec([None, None], "int64", POSITION_IDS),
            [paddle.static.InputSpec([None, nkv, None, d], "float32", name)
             for name in contract.per_layer(contract.PAST, cfg.num_hidden_layers)]]
    with tempfile.TemporaryDirectory() as work:
        log("export: tracing with paddle.jit.save")
        prefix = os.path.join(work, "model")
        with warnings.catch_warnings():  # Paddle's PIR tracer warns about `.place` on its own internals
            warnings.filterwarnings("ignore", message="Tensor do not have 'place'")
            static = paddle.jit.to_static(module, input_spec=spec, full_graph=True)
            paddle.jit.save(static, prefix)
        log("export: converting with paddle2onnx")
        raw = os.path.join(work, "raw.onnx")
        _p2o(prefix + ".json", prefix + ".pdiparams", raw)
        _finish(raw, out_path, cfg)
