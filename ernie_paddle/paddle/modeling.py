"""ERNIE-4.5 text models (MoE `ernie4_5_moe` and dense `ernie4_5`) in Paddle dynamic graph.

Reads top to bottom as ERNIE-4.5's math (as transformers' `modeling_ernie4_5_moe` computes it): RMSNorm (fp32
statistics), interleaved RoPE (fp32), grouped-query attention over a preallocated KV cache with explicit positions,
SwiGLU MLPs, and the sparse MoE block (routing in `moe.py`, shared experts added after the routed sum). This
unfused code is the reference and the CPU path; on a GPU `use_fused_kernels()` swaps in `kernels_gpu`'s ops.
Shapes: B batch, T new tokens, S cached + new tokens, H hidden, nh/nkv heads, d head_dim, E experts.
"""

from __future__ import annotations


import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_paddle.causal_lm import KV
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import InputError
from ernie_paddle import files
from ernie_paddle.paddle import kernels_gpu
from ernie_paddle import rope
from ernie_paddle.token_ids import check_token_ids
from ernie_paddle.paddle.moe import CPU_PASSES, EXPERT_PASSES, FUSED, route

_NEG = float(np.finfo(np.float32).min)


@contextlib.contextmanager
def default_dtype(dtype: str) -> Iterator[None]:
    """Paddle's default dtype set to `dtype` inside the block, and the previous one restored after it."""
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)


def _param(layer: nn.Layer, shape: list[int], dtype: str) -> paddle.Tensor:
    return layer.create_parameter(shape, dtype=dtype, default_initializer=nn.initializer.Constant(0.0))


def _linear(d_in: int, d_out: int) -> nn.Linear:
    """A bias-free Linear ([in, out] weight) created zero-filled: weights always come from a checkpoint, and
    Paddle's default random init costs seconds per GB."""
    return nn.Linear(d_in, d_out, weight_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)),
                     bias_attr=False)


class RMSNorm(nn.Layer):
    """`w * (x / sqrt(mean(x²) + eps))`, statistics in fp32, cast back before the weight multiply."""

    def __init__(self, hidden: int, eps: float, dtype: str):
        super().__init__()
        self.eps = eps
        self.weight = _param(self, [hidden], dtype)
        self.fused = False  # True on a GPU: Paddle's fused_rms_norm (same math)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.fused:
            return kernels_gpu.rms_norm(x, self.weight, self.eps)
        x32 = x.astype("float32")
        y = x32 * paddle.rsqrt(x32.pow(2).mean(axis=-1, keepdim=True) + self.eps)
        return self.weight * y.astype(x.dtype)


def rope_cos_sin(position_ids: paddle.Tensor, head_dim: int, theta: float) -> tuple[paddle.Tensor, paddle.Tensor]:
    """cos/sin [B, T, 1, d/2] in fp32 for interleaved pairs: angle = pos_fp32 * theta^(-2i/d), elementwise."""
    angles = position_ids.astype("float32").unsqueeze(-1) * paddle.to_tensor(rope.inv_freq(head_dim, theta))
    angles = angles.unsqueeze(2)  # [B, T, 1, d/2]
    return paddle.cos(angles), paddle.sin(angles)


@dataclass(frozen=True)
class Rotary:
    """The rotary angles of one forward pass: fp32 cos/sin [B, T, 1, d/2] for the unfused path, and the position
    ids [B, T] they come from (Paddle's fused GPU RoPE reads its own tables at these positions)."""

    cos: paddle.Tensor
    sin: paddle.Tensor
    positions: paddle.Tensor

    @classmethod
    def at(cls, positions: paddle.Tensor, head_dim: int, theta: float) -> "Rotary":
        cos, sin = rope_cos_sin(positions, head_dim, theta)
        return cls(cos, sin, positions)


def apply_rope(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, T, h, d] (GPT-J style, not the half-split Llama layout)."""
    x32 = x.astype("float32")
    even, odd = x32[..., 0::2], x32[..., 1::2]
    out = paddle.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)  # [B, T, h, d/2, 2]
    return out.reshape(x.shape).astype(x.dtype)


@dataclass
class KVCache:
    """Per-layer K/V buffers [B, max_len, nkv, d], allocated once; `length` tokens are filled."""

    keys: list[paddle.Tensor]
    values: list[paddle.Tensor]
    max_len: int
    length: int = 0

    @classmethod
    def allocate(cls, cfg: ErnieConfig, batch: int, max_len: int, dtype: str) -> "KVCache":
        shape = [batch, max_len, cfg.num_key_value_heads, cfg.head_dim]
        n = cfg.num_hidden_layers
        return cls([paddle.zeros(shape, dtype) for _ in range(n)], [paddle.zeros(shape, dtype) for _ in range(n)],
                   max_len)


def attention_bias(b: int, t: int, start: int, attention_mask: np.ndarray | None) -> paddle.Tensor:
    """Additive fp32 mask [B, 1, T, S] for T new tokens at cache slots start..start+T: bottom-right causal over the
    slots, plus key padding from `attention_mask` [B, S] (1 = real token)."""
    s = start + t
    allowed = np.broadcast_to(np.arange(s)[None, :] <= np.arange(start, s)[:, None], (b, t, s))
    if attention_mask is not None:
        am = np.asarray(attention_mask, dtype=bool)
        if am.shape != (b, s):
            raise InputError(f"attention_mask has shape {list(am.shape)}, expected [{b}, {s}]")
        allowed = allowed & am[:, None, :]
    return paddle.to_tensor(np.where(allowed, 0.0, _NEG).astype(np.float32)).unsqueeze(1)


class Attention(nn.Layer):
    """GQA: query head j reads kv head j // (nh / nkv); q, k, v from one fused [Q | K | V] projection."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.d ** -0.5
        self.qkv_proj = _linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.d)
        self.o_proj = _linear(self.nh * self.d, cfg.hidden_size)
        # set on a GPU by `use_fused_kernels`: full-width (cos, sin) tables for Paddle's fused RoPE
        self.fused_rope_tables: tuple[paddle.Tensor, paddle.Tensor] | None = None

    @property
    def fused(self) -> bool:
        """Paddle's fused RoPE and (where its causal mask is right) flash attention."""
        return self.fused_rope_tables is not None

    def forward(self, x: paddle.Tensor, rotary: Rotary, mask: paddle.Tensor,
                cache: tuple[paddle.Tensor, paddle.Tensor] | None, start: int, padded: bool) -> paddle.Tensor:
        """x [B, T, H] written at cache slots start..start+T; mask [B, 1, T, S] additive; `padded`: some row of
        the batch has padding (then flash attention, which takes no mask, is not used)."""
        b, t, _ = x.shape
        nh, nkv, d = self.nh, self.nkv, self.d
        qkv = self.qkv_proj(x).reshape([b, t, nh + 2 * nkv, d])
        q, k, v = paddle.split(qkv, [nh, nkv, nkv], axis=2)
        if self.fused:
            q, k = kernels_gpu.rope(q, k, *self.fused_rope_tables, rotary.positions)
        else:
            q, k = apply_rope(q, rotary.cos, rotary.sin), apply_rope(k, rotary.cos, rotary.sin)
        if cache is not None:
            ck, cv = cache
            ck[:, start:start + t] = k
            cv[:, start:start + t] = v
            k, v = ck[:, :start + t], cv[:, :start + t]
        if self.fused and not padded and (start == 0 or t == 1):  # flash: causal only when q_len == kv_len
            out = kernels_gpu.flash_attention(q, k, v, causal=start == 0 and t > 1)
            return self.o_proj(out.reshape([b, t, nh * d]))
        s = k.shape[1]
        rep = nh // nkv
        q = q.reshape([b, t, nkv, rep, d]).transpose([0, 2, 3, 1, 4]).reshape([b, nkv, rep * t, d])
        k, v = k.transpose([0, 2, 1, 3]), v.transpose([0, 2, 1, 3])  # [B, nkv, S, d]
        scores = paddle.matmul(q, k, transpose_y=True).astype("float32") * self.scale  # [B, nkv, rep*T, S]
        scores = scores.reshape([b, nkv, rep, t, s]) + mask.unsqueeze(1)  # mask [B, 1, T, S]
        probs = F.softmax(scores, axis=-1).astype(v.dtype).reshape([b, nkv, rep * t, s])
        out = paddle.matmul(probs, v).reshape([b, nkv, rep, t, d]).transpose([0, 3, 1, 2, 4])
        return self.o_proj(out.reshape([b, t, nh * d]))


class MLP(nn.Layer):
    """SwiGLU: `down(silu(gate(x)) * up(x))` with the fused `up_gate_proj` output laid out [gate | up]."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.width = width
        self.up_gate_proj = _linear(hidden, 2 * width)
        self.down_proj = _linear(width, hidden)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        gate, up = paddle.split(self.up_gate_proj(x), 2, axis=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoeBlock(nn.Layer):
    """Routed experts (top-k of E) plus the shared experts, which are one MLP added unweighted afterwards."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.k, self.num_experts, self.norm_min = cfg.moe_k, cfg.moe_num_experts, cfg.moe_norm_min
        self.gate = _linear(cfg.hidden_size, cfg.moe_num_experts)  # [H, E], kept fp32
        self.e_score_correction_bias = (_param(self, [cfg.moe_num_experts], "float32")
                                        if cfg.moe_use_aux_free else None)
        self.experts = nn.LayerList([MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.moe_num_experts)])
        self.shared_experts = (MLP(cfg.hidden_size, cfg.shared_intermediate_size)
                               if cfg.moe_num_shared_experts > 0 else None)
        self.expert_pass = EXPERT_PASSES[0]  # see `set_expert_pass`
        self.w_up_gate: paddle.Tensor | None = None  # stacked expert weights [E, H, 2I] / [E, I, H] (fused pass)
        self.w_down: paddle.Tensor | None = None
        self.last_experts: paddle.Tensor | None = None  # [N, k] choices of the last call (for parity checks)

    def stack_experts(self) -> None:
        """Replace the per-expert MLPs by stacked weights [E, H, 2I] / [E, I, H] (the grouped-GEMM layout)."""
        if self.w_up_gate is not None:
            return
        self.w_up_gate = paddle.stack([e.up_gate_proj.weight for e in self.experts])
        self.w_down = paddle.stack([e.down_proj.weight for e in self.experts])
        self.experts = None  # free the per-expert copies

    def set_expert_pass(self, name: str) -> None:
        """Run the routed experts with `name` of `moe.EXPERT_PASSES`: the fused pass needs the stacked weights
        (`stack_experts`), the others the per-expert MLPs."""
        if name not in EXPERT_PASSES:
            raise InputError(f"set_expert_pass: name must be one of {', '.join(EXPERT_PASSES)}, got {name!r}")
        if (self.w_up_gate if name == FUSED else self.experts) is None:
            needs = "stacked expert weights (use_fused_kernels)" if name == FUSED else "per-expert weights (stacked)"
            raise InputError(f"set_expert_pass: the {name!r} pass needs the {needs}")
        self.expert_pass = name

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        shape = x.shape
        h = x.reshape([-1, shape[-1]])  # [N, H]
        if self.expert_pass == FUSED:  # GPU: dispatch + grouped GEMM + combine on stacked weights
            y, experts = kernels_gpu.fused_moe(h, self.gate.weight, self.e_score_correction_bias, self.k,
                                               self.norm_min, self.w_up_gate, self.w_down)
        else:
            weights, experts = route(h, self.gate.weight, self.e_score_correction_bias, self.k, self.norm_min)
            y = CPU_PASSES[self.expert_pass](h, weights, experts, self.num_experts,
                                                lambda e, xe: self.experts[e](xe))
        self.last_experts = experts
        if self.shared_experts is not None:
            y = y + self.shared_experts(h)
        return y.reshape(shape)


class DecoderLayer(nn.Layer):
    def __init__(self, cfg: ErnieConfig, index: int, dtype: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = SparseMoeBlock(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: paddle.Tensor, rotary: Rotary, mask: paddle.Tensor,
                cache: tuple[paddle.Tensor, paddle.Tensor] | None, start: int, padded: bool) -> paddle.Tensor:
        """See `Attention.forward`."""
        h = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache, start, padded)
        return h + self.mlp(self.post_attention_layernorm(h))


@dataclass
class ForwardOutput:
    logits: paddle.Tensor  # [B, T, V] float32
    router_experts: list[paddle.Tensor] = field(default_factory=list)  # per MoE layer [B*T, k]


@dataclass
class Pass:
    """One forward pass between decoder layers: the residual stream `x` [B, T, H] and what every layer reads with
    it. `Ernie4_5_MoeForCausalLM.begin` starts it, `through` runs one layer, the model's `head` ends it."""

    x: paddle.Tensor
    rotary: Rotary
    mask: paddle.Tensor  # additive [B, 1, T, S]
    start: int  # cache slot of the first new token
    padded: bool  # some row of the batch has padding

    def through(self, layer: DecoderLayer, kv: tuple[paddle.Tensor, paddle.Tensor] | None = None) -> paddle.Tensor:
        """Run `layer` on the stream (its K/V written into the cache buffers `kv`, if given); the new stream."""
        self.x = layer(self.x, self.rotary, self.mask, kv, self.start, self.padded)
        return self.x


class Ernie4_5_MoeForCausalLM(nn.Layer):
    """The causal LM (also serves the dense `ernie4_5` config: every layer is then an MLP layer).

    Parameter names are the canonical names of `ernie_paddle.checkpoint.layout`; load with `from_pretrained`.
    It is a `causal_lm.CausalLM`: any batch prefills in chunks, positions are explicit, each sequence has its own
    cache.
    """

    chunked_prefill_max_batch = None
    has_position_ids = True
    shares_kv_buffer = False
    source: str | None = None  # the checkpoint folder it was loaded from

    def __init__(self, cfg: ErnieConfig, dtype: str = "float32", with_layers: bool = True):
        """`with_layers=False`: the embedding, final norm and head only, each decoder layer an empty placeholder
        for a caller that builds and fills one at a time (`decoder_layer`; the parity report's streamed reference)."""
        super().__init__()
        if dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if dtype != "float32" and paddle.get_device().startswith("cpu"):
            raise InputError(f"dtype {dtype} needs a GPU: Paddle's CPU kernels compute in float32 only "
                             f"(use --dtype float32, or Paddle's GPU build)")
        self.config, self.compute_dtype = cfg, dtype
        with default_dtype(dtype):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, weight_attr=paddle.ParamAttr(
                initializer=nn.initializer.Constant(0.0)))
            self.layers = nn.LayerList([self.decoder_layer(i) if with_layers else nn.Layer()
                                        for i in range(cfg.num_hidden_layers)])
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.lm_head = None if cfg.tie_word_embeddings else _linear(cfg.hidden_size, cfg.vocab_size)
        self.eval()

    def decoder_layer(self, i: int) -> DecoderLayer:
        """Decoder layer `i` as this model builds it (compute dtype, fp32 router), zero-filled."""
        cfg = self.config
        with default_dtype(self.compute_dtype):
            layer = DecoderLayer(cfg, i, self.compute_dtype)
            if isinstance(layer.mlp, SparseMoeBlock):  # the router island stays fp32 in every compute dtype
                layer.mlp.gate.weight = _param(layer.mlp.gate, [cfg.hidden_size, cfg.moe_num_experts], "float32")
        return layer

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str, *, dtype: str = "float32", strict_config: bool = False,
                        config: ErnieConfig | None = None, fused: bool | None = None,
                        allow_pickle: bool = False) -> "Ernie4_5_MoeForCausalLM":
        """Load a `-Paddle` or `-PT` checkpoint directory (see `ernie_paddle.paddle.weights.load_weights`).

        `fused`: use Paddle's fused GPU kernels (default: when running on a GPU). `allow_pickle`: also read
        pickled `.pdparams` weights (off by default: unpickling can run code).
        """
        from ernie_paddle.paddle.weights import load_weights

        cfg = config or ErnieConfig.from_file(os.path.join(directory, files.CONFIG), strict=strict_config)
        model = cls(cfg, dtype)
        load_weights(model, directory, allow_pickle)
        model.source = directory
        if fused or (fused is None and kernels_gpu.gpu_active()):
            model.use_fused_kernels()
        return model

    def use_fused_kernels(self) -> None:
        """Paddle's fused GPU kernels: fused_rms_norm, fused RoPE, flash attention, dispatch/grouped-GEMM MoE."""
        if not kernels_gpu.gpu_active():
            raise InputError("fused kernels need Paddle's GPU build and a GPU device")
        cfg = self.config
        tables = kernels_gpu.rope_tables(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings,
                                         self.compute_dtype)
        for m in self.sublayers():
            if isinstance(m, RMSNorm):
                m.fused = True
            elif isinstance(m, Attention):
                m.fused_rope_tables = tables
            elif isinstance(m, SparseMoeBlock) and (m.experts is None or len(m.experts) == m.num_experts):
                m.stack_experts()  # (a rank holding some experts, expert-parallel: sorted pass)
                m.set_expert_pass(FUSED)

    def set_expert_pass(self, name: str) -> None:
        """Every MoE block's expert pass (see `SparseMoeBlock.set_expert_pass`): 'sorted' (default) or 'mask-loop'
        (reference / benchmark baseline); 'fused' is set by `use_fused_kernels`."""
        for layer in self.layers:
            if isinstance(layer.mlp, SparseMoeBlock):
                layer.mlp.set_expert_pass(name)

    def allocate_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.config, batch, max_len, self.compute_dtype)

    @property
    def identity(self) -> dict[str, str]:
        """The checkpoint's fingerprint (`checkpoint.fingerprint`), the compute path and the cache dtype: a saved KV
        state is reused only by the model that made it. A model not loaded from a folder has no identity to match."""
        if getattr(self, "_identity", None) is None:
            from ernie_paddle.checkpoint.fingerprint import fingerprint

            model = fingerprint(self.source) if self.source else f"in-memory model {id(self):x}"
            self._identity = {"model": model, "export": f"paddle {'fused' if self._fused() else 'eager'}",
                              "kv_dtype": self.compute_dtype}
        return self._identity

    def _fused(self) -> bool:
        return any(getattr(m, "fused", False) for m in self.sublayers() if isinstance(m, RMSNorm))

    def read_kv(self, cache: KVCache, row: int, start: int, end: int) -> KV:
        """[kv_heads, n, head_dim] numpy arrays (float32 for a bfloat16 cache, which numpy lacks: widened exactly)."""
        def host(t: paddle.Tensor) -> np.ndarray:
            t = t[row, start:end]
            return (t.astype("float32") if t.dtype == paddle.bfloat16 else t).numpy().transpose(1, 0, 2).copy()

        return [(host(k), host(v)) for k, v in zip(cache.keys, cache.values)]

    def write_kv(self, cache: KVCache, row: int, start: int, kv: KV) -> None:
        if len(kv) != len(cache.keys):
            raise InputError(f"a KV state of {len(kv)} layers for a model of {len(cache.keys)}")
        n = kv[0][0].shape[1]
        if start + n > cache.max_len:
            raise InputError(f"KV cache holds {cache.max_len} tokens; {start + n} requested")
        for bufs, pair in zip((cache.keys, cache.values), zip(*kv)):
            for buf, x in zip(bufs, pair):
                buf[row, start:start + n] = paddle.to_tensor(np.ascontiguousarray(x.transpose(1, 0, 2))).astype(
                    buf.dtype)
        if cache.keys[0].shape[0] == 1:
            cache.length = start + n

    # ---- forward --------------------------------------------------------------------------------------
    def check_ids(self, input_ids: np.ndarray) -> None:
        check_token_ids(input_ids, self.config.vocab_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                output_router: bool = False, last_only: bool = False) -> ForwardOutput:
        """input_ids [B, T]; attention_mask [B, S] over cache + new tokens (1 = real); positions [B, T].

        With a cache, tokens are written at slots `cache.length ...` and `cache.length` advances.
        Position ids default to `cache.length + arange(T)`; pass them explicitly for left padding.
        Gradients are recorded only in training mode (`model.train()`).
        """
        if self.training:
            return self._forward(input_ids, attention_mask, position_ids, cache, output_router, last_only)
        with paddle.no_grad():
            return self._forward(input_ids, attention_mask, position_ids, cache, output_router, last_only)

    def begin(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None) -> Pass:
        """`forward`'s inputs checked, their mask and rotary angles made, the ids embedded: the pass before layer 0
        (see `forward`; a caller holding one decoder layer at a time runs the layers itself)."""
        ids = np.asarray(input_ids.numpy() if isinstance(input_ids, paddle.Tensor) else input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        self.check_ids(ids)
        b, t = ids.shape
        start = cache.length if cache is not None else 0
        s = start + t
        if cache is not None and s > cache.max_len:
            raise InputError(f"KV cache holds {cache.max_len} tokens; {s} requested")
        if s > self.config.max_position_embeddings:
            raise InputError(f"sequence length {s} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(start, s, dtype=np.int64), (b, t))
        position_ids = np.asarray(position_ids, dtype=np.int64)
        rope.check_position_ids(position_ids, self.config.max_position_embeddings)
        mask = attention_bias(b, t, start, attention_mask)
        rotary = Rotary.at(paddle.to_tensor(position_ids), self.config.head_dim, self.config.rope_theta)
        padded = attention_mask is not None and not bool(np.asarray(attention_mask).all())
        return Pass(self.embed_tokens(paddle.to_tensor(ids)), rotary, mask, start, padded)

    def head(self, x: paddle.Tensor) -> paddle.Tensor:
        """The final norm and the LM head (the tied embedding or `lm_head`) on x [B, T, H]: logits [B, T, V] fp32."""
        x = self.norm(x)
        if self.lm_head is None:
            logits = paddle.matmul(x, self.embed_tokens.weight, transpose_y=True)
        else:
            logits = self.lm_head(x)
        return logits.astype("float32")

    def _forward(self, input_ids, attention_mask, position_ids, cache, output_router, last_only) -> ForwardOutput:
        p = self.begin(input_ids, attention_mask, position_ids, cache)
        out = ForwardOutput(logits=None)
        for i, layer in enumerate(self.layers):
            p.through(layer, (cache.keys[i], cache.values[i]) if cache is not None else None)
            if output_router and isinstance(layer.mlp, SparseMoeBlock):
                out.router_experts.append(layer.mlp.last_experts)
        if cache is not None:
            cache.length = p.start + p.x.shape[1]
        out.logits = self.head(p.x[:, -1:] if last_only else p.x)
        return out

    def logits(self, input_ids) -> np.ndarray:
        """One forward pass without a cache: float32 [T, V] for a 1-D id list, [B, T, V] for 2-D."""
        ids = np.asarray(input_ids, dtype=np.int64)
        out = self.forward(ids).logits.numpy()
        return out[0] if ids.ndim == 1 else out
