"""The `ort` flavour: an ERNIE-4.5 graph of ONNX Runtime fused ops, built straight from checkpoint tensors.

Per layer: (Skip)SimplifiedLayerNormalization, a packed-QKV MatMul, RotaryEmbedding, GroupQueryAttention
(past/present KV), o_proj; then a SwiGLU MLP (layer 0 / dense layers) or the MoE block: an fp32 router
(softmax, correction bias for selection only) feeding MoE (fp32/fp16) or QMoE (int8/int4/int2), plus the shared
experts. Linear layers become MatMulNBits at int8/int4/int2. Tensors arrive one at a time in checkpoint order and
their bytes go straight to external data. The builder asks for them by role (`layout.maps_by_role`); the graph's
inputs, outputs and the values the parity report reads are named by `graph_contract`.

The routing is built from ONNX ops here (a different language from the Paddle side), but it mirrors
`ernie_paddle.paddle.moe` (`router_probs`, `select`, `mix_weights`), which is its definition.

Padded batches follow onnxruntime-genai's convention: each row's length is the sum of its `attention_mask` (GQA's
per-row `seqlens_k`), so a row's keys fill its cache slots 0..length-1 and rows of different lengths share one
decode step. Prompts are padded on the right; positions are `cumsum(attention_mask) - 1`, computed in the graph
for the RotaryEmbedding ops.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from onnx import TensorProto, numpy_helper

from ernie_paddle import graph_contract as contract
from ernie_paddle.checkpoint.folder import TensorStream
from ernie_paddle.checkpoint.layout import LM_HEAD_WEIGHT, Role, maps_by_role
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import ExportError
from ernie_paddle.graph_contract import (ATTENTION_MASK, BATCH, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, PAST_SEQUENCE,
                                         SEQUENCE, TOTAL_SEQUENCE)
from ernie_paddle.precisions import BITS, DEFAULT_BLOCK_SIZE, EXPORT_PRECISIONS, expert_block
from ernie_paddle.rope import cos_sin_tables

from ernie_paddle.export.graph import MS, GraphBuilder
from ernie_paddle.export.quantize import matmul_nbits_weights, qmoe_weights, rtn


Tensor = tuple[str, np.ndarray]  # a canonical tensor: (its canonical name, its array)


def _node(canonical: str) -> str:
    """The graph name of what a canonical tensor is the weight of: layers.0.self_attn.o_proj.weight ->
    layers.0.self_attn.o_proj."""
    return canonical.removesuffix(".weight")


class SequenceInputs(NamedTuple):
    """Graph values (names) of the sequence bookkeeping that every layer's attention reads."""

    seq: str  # new tokens this call, scalar int64
    total: str  # past + new slots (the mask's length), scalar int64
    total32: str  # the same, int32 (GQA's total_sequence_length)
    seqlens: str  # GQA's seqlens_k [B] int32: each row's length (sum of its mask) - 1
    positions: str  # rotary positions of the new tokens [B, S]: cumsum(mask) - 1


class ErnieOrtBuilder:
    """Builds one graph; `precision` in fp32 | fp16 | int8 | int4 | int2 (int: MatMulNBits / QMoE weights)."""

    def __init__(self, cfg: ErnieConfig, g: GraphBuilder, precision: str, block_size: int = DEFAULT_BLOCK_SIZE,
                 accuracy_level: int = 0, quantizer=None, attention_precision: str | None = None):
        if precision not in EXPORT_PRECISIONS:
            raise ValueError(f"precision must be one of {EXPORT_PRECISIONS}, got {precision!r}")
        if cfg.head_dim % 16:
            raise ExportError(f"the ort flavour's GroupQueryAttention needs head_dim to be a multiple of 16, got "
                              f"{cfg.head_dim}; use --flavor portable for this model")
        self.cfg, self.g, self.precision = cfg, g, precision
        self.block_size, self.accuracy_level = block_size, accuracy_level
        self.np_dtype = np.float16 if precision == "fp16" else np.float32
        self.onnx_dtype = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
        self.bits = BITS.get(precision)
        # the self-attention projections' own bits (`export --attention-precision`), else the weights'
        self.attention_bits = BITS[attention_precision] if attention_precision else self.bits
        self.quantizer = quantizer or rtn  # (canonical name, weight [N, K], bits, block) -> (codes, scales)
        self.maps = maps_by_role(cfg)

    def take(self, tensors: TensorStream, role: Role, layer: int | None = None, expert: int | None = None) -> Tensor:
        """The canonical tensor of `role` (in `layer`, of routed `expert`) from the stream, by the layout table."""
        name = self.maps[(role, layer, expert)].canonical
        return name, tensors.take(name)

    # ---- small helpers ---------------------------------------------------------------------------------
    def w(self, name: str, a: np.ndarray) -> str:
        return self.g.weight(name, a.astype(self.np_dtype))

    def projection(self, name: str, w_in_out: np.ndarray, fp_weight: str | None = None,
                   bits: int | None = None) -> Callable[[str], str]:
        """x @ W for a Paddle-layout weight [K, N]: MatMul, or MatMulNBits when quantised (with `bits`, default the
        weights'). W's initializers are added now (named `fp_weight`, default `name`; or `name`.qweight/.scales);
        the returned function adds the node."""
        k, n = w_in_out.shape
        bits = bits or self.bits
        if bits is None:
            w = self.w(fp_weight or name, w_in_out)
            return lambda x: self.g.op("MatMul", [x, w], name=name)
        b, scales = matmul_nbits_weights(w_in_out, bits, self.block_size, self.quantizer, name + ".weight")
        bw, sw = self.g.weight(name + ".qweight", b), self.g.weight(name + ".scales", scales)
        return lambda x: self.g.op("MatMulNBits", [x, bw, sw], domain=MS, name=name, K=k, N=n, bits=bits,
                                   block_size=self.block_size, accuracy_level=self.accuracy_level)

    def linear(self, x: str, name: str, w_in_out: np.ndarray, bits: int | None = None) -> str:
        """x @ W for a Paddle-layout weight [K, N], applied at once."""
        return self.projection(name, w_in_out, bits=bits)(x)

    def mlp(self, x: str, up_gate: Tensor, down: Tensor) -> str:
        """SwiGLU: down(silu(gate) * up) with up_gate = [gate | up] on the output axis."""
        h = self.linear(x, _node(up_gate[0]), up_gate[1])
        gate, up = self.g.op("Split", [h, self.g.const([up_gate[1].shape[1] // 2] * 2)], n_out=2, axis=-1)
        act = self.g.op("Mul", [self.g.op("Mul", [gate, self.g.op("Sigmoid", [gate])]), up])
        return self.linear(act, _node(down[0]), down[1])

    # ---- the graph -------------------------------------------------------------------------------------
    def build(self, tensors: TensorStream, progress: Callable[[str], None] | None = None) -> None:
        """The whole decoder: inputs, per-layer attention and MLP/MoE, final norm, LM head, logits output."""
        cfg, g = self.cfg, self.g
        ids, mask = self.inputs()
        seq = self.sequence(ids, mask)
        cos, sin = self.rope_caches()

        embed_name, embed = self.take(tensors, Role.EMBEDDING)
        x = g.op("Gather", [self.w(embed_name, embed), ids], axis=0, name=_node(embed_name))
        residual, delta = g.rename(x, contract.hidden_state(0)), None
        if cfg.tie_word_embeddings:  # the head is needed only at the end, but the table is read only once
            head = self.lm_head(embed)
        del embed
        for i in range(cfg.num_hidden_layers):
            if progress:
                progress(f"layer {i}")
            normed, residual = self.norm(delta, residual, self.take(tensors, Role.INPUT_NORM, i))
            if i:  # the residual stream after i layers (layer 0's norm has no sum to name: the embeddings)
                residual = g.rename(residual, contract.hidden_state(i))
            o = self.attention(i, normed, tensors, seq, cos, sin)
            normed, residual = self.norm(o, residual, self.take(tensors, Role.POST_ATTN_NORM, i))
            if cfg.is_moe_layer(i):
                delta = self.moe(normed, i, tensors)
            else:
                delta = self.mlp(normed, self.take(tensors, Role.MLP_UP_GATE, i), self.take(tensors, Role.MLP_DOWN, i))
        normed, _ = self.norm(delta, residual, self.take(tensors, Role.FINAL_NORM))
        normed = g.rename(normed, contract.hidden_state(cfg.num_hidden_layers))
        if not cfg.tie_word_embeddings:
            head = self.lm_head(self.take(tensors, Role.LM_HEAD)[1].T)
        logits = head(self.kept_positions(normed))
        if self.precision == "fp16":
            logits = g.op("Cast", [logits], to=TensorProto.FLOAT)
        g.output(logits, LOGITS, TensorProto.FLOAT, [BATCH, SEQUENCE, cfg.vocab_size], first=True)

    def inputs(self) -> tuple[str, str]:
        """Declare input_ids, attention_mask and every layer's past key/value (the contract's names); returns the
        first two."""
        cfg, g = self.cfg, self.g
        ids = g.input(INPUT_IDS, TensorProto.INT64, [BATCH, SEQUENCE])
        mask = g.input(ATTENTION_MASK, TensorProto.INT64, [BATCH, TOTAL_SEQUENCE])
        for i in range(cfg.num_hidden_layers):
            for kv in contract.KV:
                g.input(contract.past(i, kv), self.onnx_dtype,
                        [BATCH, cfg.num_key_value_heads, PAST_SEQUENCE, cfg.head_dim])
        return ids, mask

    def sequence(self, ids: str, mask: str) -> SequenceInputs:
        """Sequence bookkeeping shared by every layer, from the mask: GQA's int32 lengths, the rotary positions."""
        g = self.g
        total = g.op("Gather", [g.op("Shape", [mask]), g.const(1)], axis=0)  # scalar int64
        seq = g.op("Gather", [g.op("Shape", [ids]), g.const(1)], axis=0)
        total32 = g.op("Cast", [total], to=TensorProto.INT32)
        # each row's own length (genai's convention): its keys sit in slots 0..length-1 of its cache row
        lengths = g.op("ReduceSum", [mask, g.const([1])], keepdims=0)
        seqlens = g.op("Cast", [g.op("Sub", [lengths, g.const(1)])], to=TensorProto.INT32)
        # positions = cumsum(mask) - 1 (pads clipped to 0), last `seq` slots
        cums = g.op("Sub", [g.op("CumSum", [mask, g.const(1)]), g.const(1)])
        cums = g.op("Max", [cums, g.const(0)])
        past = g.op("Sub", [total, seq])
        positions = g.op("Slice", [cums, g.op("Unsqueeze", [past, g.const([0])]),
                                   g.op("Unsqueeze", [total, g.const([0])]), g.const([1])])
        return SequenceInputs(seq, total, total32, seqlens, positions)

    def attention(self, i: int, x: str, tensors: TensorStream, s: SequenceInputs, cos: str, sin: str) -> str:
        """Layer i's self-attention on normed `x`: packed QKV, rotary, GQA over the KV cache, o_proj; adds the
        layer's present key/value outputs."""
        cfg, g = self.cfg, self.g
        nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        L = f"layers.{i}"
        qkv_name, qkv_weight = self.take(tensors, Role.QKV, i)
        qkv = self.linear(x, _node(qkv_name), qkv_weight, self.attention_bits)
        q, k, v = g.op("Split", [qkv, g.const([nh * d, nkv * d, nkv * d])], n_out=3, axis=-1)
        # Rotary as its own op: GQA's fused rotary (do_rotary=1) rotates the cached keys by slot index rather
        # than by position_ids (ONNX Runtime 1.32, CPU), which breaks left padding.
        q = g.op("RotaryEmbedding", [q, s.positions, cos, sin], domain=MS, interleaved=1, num_heads=nh,
                 name=f"{L}.self_attn.rotary_q")
        k = g.op("RotaryEmbedding", [k, s.positions, cos, sin], domain=MS, interleaved=1, num_heads=nkv,
                 name=f"{L}.self_attn.rotary_k")
        attn, pk, pv = g.op("GroupQueryAttention",
                            [q, k, v, contract.past(i, "key"), contract.past(i, "value"), s.seqlens, s.total32],
                            n_out=3, domain=MS, name=f"{L}.self_attn", num_heads=nh, kv_num_heads=nkv,
                            scale=float(d ** -0.5))
        for kv, value in zip(contract.KV, (pk, pv)):
            g.output(value, contract.present(i, kv), self.onnx_dtype, [BATCH, nkv, TOTAL_SEQUENCE, d])
        o_name, o_weight = self.take(tensors, Role.ATTN_OUT, i)
        return self.linear(attn, _node(o_name), o_weight, self.attention_bits)

    def kept_positions(self, hidden: str) -> str:
        """The last `logits_to_keep` positions of `hidden` [B, S, H] (0, the default: all of them), so a prefill
        that needs one token's logits does not run the LM head (vocab x hidden per token) on the whole chunk.
        An optional input: its initializer is the default, which onnxruntime-genai never overrides."""
        g = self.g
        g.input(LOGITS_TO_KEEP, TensorProto.INT64, [])
        g.weight(LOGITS_TO_KEEP, np.array(0, np.int64))
        start = g.op("Unsqueeze", [g.op("Neg", [LOGITS_TO_KEEP]), g.const([0])])
        return g.op("Slice", [hidden, start, g.const([np.iinfo(np.int64).max]), g.const([1])],
                    name=LOGITS_TO_KEEP)

    def rope_caches(self) -> tuple[str, str]:
        """RotaryEmbedding's cos/sin caches [max_pos, d/2] of the angles pos_fp32 * inv_freq_fp32 (the Paddle model's
        fp32 angles), each value rounded once from float64 (`rope.cos_sin_tables`): the same table on every CPU."""
        cfg = self.cfg
        d = cfg.head_dim
        cos, sin = cos_sin_tables(cfg.max_position_embeddings, d, cfg.rope_theta)
        return self.w("rope.cos_cache", cos), self.w("rope.sin_cache", sin)

    def lm_head(self, embed_v_h: np.ndarray) -> Callable[[str], str]:
        """Add the LM head's weights from a [vocab, H] matrix (the tied embedding, or the untied head transposed);
        returns the function that applies the head to the final hidden states."""
        return self.projection("lm_head", embed_v_h.T, fp_weight=LM_HEAD_WEIGHT)

    def norm(self, delta: str | None, residual: str, weight: Tensor) -> tuple[str, str]:
        """RMSNorm of residual + delta; returns (normed, new residual)."""
        eps = float(self.cfg.rms_norm_eps)
        w = self.w(*weight)
        name = _node(weight[0])
        if delta is None:
            return self.g.op("SimplifiedLayerNormalization", [residual, w], name=name, axis=-1, epsilon=eps,
                             stash_type=1), residual
        out, _, _, summed = self.g.op("SkipSimplifiedLayerNormalization", [delta, residual, w], n_out=4, domain=MS,
                                      name=name, epsilon=eps)
        return out, summed

    def moe(self, x: str, i: int, tensors: TensorStream) -> str:
        """Layer i's sparse MoE block: fp32 router, selection-only bias, routed experts, shared experts added after.
        The scores the experts op selects on are named `contract.router_scores(i)`."""
        cfg, g = self.cfg, self.g
        L = f"layers.{i}"
        shape = g.op("Shape", [x])
        flat = g.op("Reshape", [x, g.const([-1, cfg.hidden_size])])  # [N, H]
        probs, select = self.router(flat, i, tensors)
        fc1, fc2 = self.expert_weights(i, tensors)
        if self.bits is None:
            y = self.experts_float(flat, probs, select, fc1, fc2, L)
        else:
            y = self.experts_quantized(flat, probs, select, fc1, fc2, L)
        g.rename(g.nodes[-1].input[1], contract.router_scores(i))  # the experts op's routing input
        if cfg.moe_num_shared_experts > 0:
            shared = self.mlp(flat, self.take(tensors, Role.SHARED_UP_GATE, i),
                              self.take(tensors, Role.SHARED_DOWN, i))
            y = g.op("Add", [y, shared])
        return g.op("Reshape", [y, shape])

    def router(self, flat: str, i: int, tensors: TensorStream) -> tuple[str, str]:
        """(probs, selection scores) [N, E] fp32: the ONNX spelling of `ernie_paddle.paddle.moe.router_probs` and of the
        biased scores `moe.select` takes the top k of (the correction bias picks experts, never weights them)."""
        g = self.g
        x32 = g.op("Cast", [flat], to=TensorProto.FLOAT) if self.precision == "fp16" else flat
        gate_name, gate = self.take(tensors, Role.ROUTER, i)
        gate = g.weight(gate_name, gate.astype(np.float32))
        probs = g.op("Softmax", [g.op("MatMul", [x32, gate], name=_node(gate_name))], axis=-1)  # [N, E] fp32
        if not self.cfg.moe_use_aux_free:
            return probs, probs
        bias_name, bias = self.take(tensors, Role.ROUTER_BIAS, i)
        corr = g.weight(bias_name, bias.astype(np.float32))
        return probs, g.op("Add", [probs, corr])

    def expert_weights(self, i: int, tensors: TensorStream) -> tuple[list, list]:
        """The routed experts' fc1 (rows interleaved g0,u0,g1,u1,...: swiglu_fusion=1) and fc2 [H, I] matrices, in
        the compute dtype or as (codes, scales) pairs when quantised."""
        cfg = self.cfg
        h, ie = cfg.hidden_size, cfg.moe_intermediate_size
        fc1, fc2 = [], []
        interleave = np.stack([np.arange(ie), ie + np.arange(ie)], axis=1).reshape(-1)  # [gate | up] -> g0,u0,...
        block = expert_block(self.bits, self.block_size) if self.bits else None
        for j in range(cfg.moe_num_experts):
            ug_name, ug = self.take(tensors, Role.EXPERT_UP_GATE, i, j)  # [H, 2I] = [gate | up]
            down_name, down = self.take(tensors, Role.EXPERT_DOWN, i, j)  # [I, H]
            w2 = np.ascontiguousarray(down.T)
            if self.bits is None:
                w1 = np.stack([ug[:, :ie].T, ug[:, ie:].T], axis=1).reshape(2 * ie, h)
                fc1.append(w1.astype(self.np_dtype))
                fc2.append(w2.astype(self.np_dtype))
            else:
                fc1.append(qmoe_weights(np.ascontiguousarray(ug.T), self.bits, block, self.quantizer, ug_name,
                                        rows=interleave))
                fc2.append(qmoe_weights(w2, self.bits, block, self.quantizer, down_name))
        return fc1, fc2

    def experts_float(self, flat: str, probs: str, select: str, fc1: list, fc2: list, L: str) -> str:
        """fp32/fp16 routed experts through ONNX Runtime's MoE op, with ERNIE's routing fed in as log-probabilities."""
        g, k = self.g, self.cfg.moe_k
        # MoE softmaxes its router input over all experts: give it log(p) on the selected experts, -inf elsewhere,
        # so its weights are p_sel / sum(p_sel), exactly ERNIE's renormalised unbiased probabilities.
        idx = g.op("TopK", [select, g.const([k])], n_out=2, axis=-1, largest=1, sorted=1)[1]
        logp = g.op("GatherElements", [g.op("Log", [probs]), idx], axis=1)
        base = g.op("ConstantOfShape", [g.op("Shape", [probs])],
                    value=numpy_helper.from_array(np.array([-np.inf], np.float32)))
        routing = g.op("ScatterElements", [base, idx, logp], axis=1)
        if self.precision == "fp16":
            routing = g.op("Cast", [routing], to=TensorProto.FLOAT16)
        return g.op("MoE", [flat, routing, g.weight(f"{L}.mlp.experts.fc1", np.stack(fc1)), "",
                            g.weight(f"{L}.mlp.experts.fc2", np.stack(fc2)), ""], domain=MS, name=f"{L}.mlp.experts",
                    normalize_routing_weights=0, **self._moe_attrs())

    def experts_quantized(self, flat: str, probs: str, select: str, fc1: list, fc2: list, L: str) -> str:
        """int8/int4/int2 routed experts through QMoE, which takes ERNIE's two routing inputs directly."""
        g = self.g
        # QMoE selects on router_probs (p + bias) and mixes with router_weights (p), renormalised. Its scales
        # are stored in fp16 (they may differ from the activations' type): 2.5 GB less for the 21B model.
        q1, s1 = (np.stack(t) for t in zip(*fc1))
        q2, s2 = (np.stack(t) for t in zip(*fc2))
        extra = dict(block_size=self.block_size) if self.bits != 8 else {}
        return g.op("QMoE", [flat, select, g.weight(f"{L}.mlp.experts.fc1.qweight", q1),
                             g.weight(f"{L}.mlp.experts.fc1.scales", s1.astype(np.float16)), "",
                             g.weight(f"{L}.mlp.experts.fc2.qweight", q2),
                             g.weight(f"{L}.mlp.experts.fc2.scales", s2.astype(np.float16)), "", "", "", "", "", "", "",
                             probs],
                    domain=MS, name=f"{L}.mlp.experts", normalize_routing_weights=1, expert_weight_bits=self.bits,
                    accuracy_level=self.accuracy_level, **self._moe_attrs(), **extra)

    def _moe_attrs(self) -> dict:
        return moe_attributes(self.cfg.moe_k)


def moe_attributes(k: int) -> dict:
    """Attributes MoE and QMoE share: top-k, and SwiGLU with fc1's gate/up rows interleaved."""
    return dict(k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
