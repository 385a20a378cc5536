"""The one table of checkpoint names and layouts: `-PT` (torch), `-PT` fused-name, and `-Paddle`.

Everything inside the project works on *canonical* tensors, named as the Paddle model's parameters (Paddle's
`[in, out]` Linear layout, fused `qkv` = [Q | K | V] and `up_gate` = [gate | up] on the output axis, one tensor per
routed expert).
Each canonical tensor is assembled from one or more on-disk tensors and split back on save; the Paddle
loader, the saver and the ONNX builder all go through this module. Each tensor also carries its `Role` (embedding,
norm, qkv, routed expert, router, ...) and its layer and expert index: what is quantised, kept in fp32, sliced for
tensor parallelism, initialised or written to GGUF is read from the role, never from the tensor's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterator

import numpy as np

from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import CheckpointError

PADDLE, PT, PT_FUSED = "paddle", "pt", "pt-fused"
LAYOUTS = (PADDLE, PT, PT_FUSED)
PREFIX = {PADDLE: "ernie.", PT: "model.", PT_FUSED: "model."}
# The LM head's canonical name; a tied head (the embedding) goes by it too where it is quantised (GPTQ's Hessian).
LM_HEAD_WEIGHT = "lm_head.weight"

FLOAT_DTYPES = {"BF16", "F16", "F32", "F64", "FLOAT16", "FLOAT32", "FLOAT64", "BFLOAT16"}  # safetensors / numpy names


class Role(str, Enum):
    """What a canonical tensor is in the model; the facts below (what is quantised, kept fp32, sliced) follow."""

    EMBEDDING = "embedding"  # [vocab, H]; also the head when the embeddings are tied
    INPUT_NORM = "input_norm"  # RMSNorm before attention
    QKV = "qkv"  # [H, (nh + 2 nkv) d]: Q | K | V on the output axis
    ATTN_OUT = "attn_out"  # o_proj [nh d, H]
    POST_ATTN_NORM = "post_attn_norm"  # RMSNorm before the MLP / MoE
    MLP_UP_GATE = "mlp_up_gate"  # dense layer [H, 2W]: gate | up
    MLP_DOWN = "mlp_down"  # dense layer [W, H]
    ROUTER = "router"  # mlp.gate [H, E], fp32
    ROUTER_BIAS = "router_bias"  # e_score_correction_bias [E], fp32 (aux-free routing)
    EXPERT_UP_GATE = "expert_up_gate"  # one routed expert [H, 2W]: gate | up
    EXPERT_DOWN = "expert_down"  # one routed expert [W, H]
    SHARED_UP_GATE = "shared_up_gate"  # the shared experts [H, 2W]: gate | up
    SHARED_DOWN = "shared_down"  # the shared experts [W, H]
    FINAL_NORM = "final_norm"  # RMSNorm before the head
    LM_HEAD = "lm_head"  # untied head [H, vocab]

    @property
    def is_norm(self) -> bool:
        return self in (Role.INPUT_NORM, Role.POST_ATTN_NORM, Role.FINAL_NORM)

    @property
    def keep_fp32(self) -> bool:
        """Kept in float32 whatever the checkpoint dtype (ERNIE's fp32 router island)."""
        return self in (Role.ROUTER, Role.ROUTER_BIAS)

    @property
    def routed_expert(self) -> bool:
        """One routed expert's weight (QMoE in the int exports; held whole by one rank under expert parallelism)."""
        return self in (Role.EXPERT_UP_GATE, Role.EXPERT_DOWN)

    @property
    def quantised(self) -> bool:
        """Stored as integer codes by the int8/int4/int2 exports (MatMulNBits, QMoE): every Linear weight except
        the fp32 router. The embedding stays a float Gather table (a tied head is quantised from it separately)."""
        return self not in (Role.EMBEDDING, Role.ROUTER, Role.ROUTER_BIAS) and not self.is_norm

    @property
    def attention(self) -> bool:
        """A self-attention projection (packed QKV, o_proj): what `export --attention-precision` sets apart."""
        return self in (Role.QKV, Role.ATTN_OUT)

    @property
    def residual_output(self) -> bool:
        """A projection writing into the residual stream (o_proj, every down_proj)."""
        return self in (Role.ATTN_OUT, Role.MLP_DOWN, Role.EXPERT_DOWN, Role.SHARED_DOWN)

    @property
    def tp_axis(self) -> int | None:
        """The axis tensor parallelism slices (1: each output block's columns, 0: the input rows); None:
        replicated on every rank (embedding, norms, router, head)."""
        if self in (Role.QKV, Role.MLP_UP_GATE, Role.EXPERT_UP_GATE, Role.SHARED_UP_GATE):
            return 1
        return 0 if self.residual_output else None


@dataclass
class TensorMap:
    """One canonical tensor, its role and position in the model, and the on-disk tensors it is made of."""

    canonical: str
    shape: tuple[int, ...]
    parts: list[tuple[str, tuple[int, ...]]]  # (disk name, disk shape)
    join: Callable[[list[np.ndarray]], np.ndarray]  # disk parts -> canonical
    split: Callable[[np.ndarray], list[np.ndarray]]  # canonical -> disk parts
    role: Role
    layer: int | None = None  # decoder layer; None for the embedding, final norm and head
    expert: int | None = None  # routed expert id (Role.EXPERT_*)
    # widths of the blocks joined on the output axis (qkv: Q, K, V; up_gate: gate, up); () for one block
    blocks: tuple[int, ...] = field(default=())

    @property
    def keep_fp32(self) -> bool:
        return self.role.keep_fp32

    def out_blocks(self, a: np.ndarray) -> list[np.ndarray]:
        """`a` (this canonical [in, out] tensor or a slice of its rows) cut into its output blocks (Q, K, V or
        gate, up)."""
        return np.split(a, np.cumsum(self.blocks)[:-1], axis=1) if self.blocks else [a]


def _same(role: Role, canonical: str, shape: tuple[int, ...], name: str) -> TensorMap:
    """Stored exactly as used (embedding, norms, Paddle-layout Linear weights)."""
    return TensorMap(canonical, shape, [(name, shape)], lambda p: p[0], lambda a: [a], role)


def _transposed(role: Role, canonical: str, shape: tuple[int, int], name: str) -> TensorMap:
    """A Linear weight stored torch-style [out, in]; canonical is [in, out]."""
    return TensorMap(canonical, shape, [(name, shape[::-1])], lambda p: p[0].T, lambda a: [a.T], role)


def _concat_out(role: Role, canonical: str, names_widths: list[tuple[str, int]], d_in: int, transposed: bool,
                blocks: tuple[int, ...]) -> TensorMap:
    """Several Linear weights joined on the output axis ([in, out1+out2+...] canonically); `blocks`: the widths of
    the logical blocks (Q, K, V or gate, up), whether stored as one disk tensor or several."""
    widths = [w for _, w in names_widths]
    cuts = np.cumsum(widths)[:-1]
    if transposed:
        parts = [(n, (w, d_in)) for n, w in names_widths]
        return TensorMap(canonical, (d_in, sum(widths)), parts,
                         lambda p: np.concatenate([x.T for x in p], axis=1),
                         lambda a: [x.T for x in np.split(a, cuts, axis=1)], role, blocks=blocks)
    parts = [(n, (d_in, w)) for n, w in names_widths]
    return TensorMap(canonical, (d_in, sum(widths)), parts,
                     lambda p: np.concatenate(p, axis=1), lambda a: np.split(a, cuts, axis=1), role, blocks=blocks)


def _mlp(cfg: ErnieConfig, layout: str, canon: str, disk: str, width: int,
         roles: tuple[Role, Role]) -> list[TensorMap]:
    """gate/up/down of one SwiGLU MLP: canonical `up_gate_proj` [H, 2W] ([gate | up]) and `down_proj` [W, H]."""
    h = cfg.hidden_size
    up_gate_role, down_role = roles
    if layout == PADDLE:
        up_gate = _concat_out(up_gate_role, f"{canon}.up_gate_proj.weight",
                              [(f"{disk}.up_gate_proj.weight", 2 * width)], h, False, (width, width))
        down = _same(down_role, f"{canon}.down_proj.weight", (width, h), f"{disk}.down_proj.weight")
    else:
        if layout == PT_FUSED:
            pieces = [(f"{disk}.up_gate_proj.weight", 2 * width)]
        else:
            pieces = [(f"{disk}.gate_proj.weight", width), (f"{disk}.up_proj.weight", width)]
        up_gate = _concat_out(up_gate_role, f"{canon}.up_gate_proj.weight", pieces, h, True, (width, width))
        down = _transposed(down_role, f"{canon}.down_proj.weight", (width, h), f"{disk}.down_proj.weight")
    return [up_gate, down]


def _linear(role: Role, canonical: str, shape: tuple[int, int], name: str, torch_style: bool) -> TensorMap:
    """A Linear weight, canonical [in, out]: stored transposed in the -PT layouts, as is in -Paddle."""
    return _transposed(role, canonical, shape, name) if torch_style else _same(role, canonical, shape, name)


def _layer(cfg: ErnieConfig, layout: str, i: int) -> list[TensorMap]:
    """The tensors of decoder layer `i`, in checkpoint order."""
    p = PREFIX[layout]
    h, d = cfg.hidden_size, cfg.head_dim
    q_w, kv_w = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    torch_style = layout != PADDLE
    L, C = f"{p}layers.{i}", f"layers.{i}"
    maps = [_same(Role.INPUT_NORM, f"{C}.input_layernorm.weight", (h,), f"{L}.input_layernorm.weight")]
    if layout == PT:
        qkv = [(f"{L}.self_attn.q_proj.weight", q_w), (f"{L}.self_attn.k_proj.weight", kv_w),
               (f"{L}.self_attn.v_proj.weight", kv_w)]
    else:
        qkv = [(f"{L}.self_attn.qkv_proj.weight", q_w + 2 * kv_w)]
    maps.append(_concat_out(Role.QKV, f"{C}.self_attn.qkv_proj.weight", qkv, h, torch_style, (q_w, kv_w, kv_w)))
    maps.append(_linear(Role.ATTN_OUT, f"{C}.self_attn.o_proj.weight", (q_w, h), f"{L}.self_attn.o_proj.weight",
                        torch_style))
    maps.append(_same(Role.POST_ATTN_NORM, f"{C}.post_attention_layernorm.weight", (h,),
                      f"{L}.post_attention_layernorm.weight"))
    if cfg.is_moe_layer(i):
        e = cfg.moe_num_experts
        maps.append(_linear(Role.ROUTER, f"{C}.mlp.gate.weight", (h, e), f"{L}.mlp.gate.weight", torch_style))
        if cfg.moe_use_aux_free:
            bias = f"{L}.mlp.moe_statics.e_score_correction_bias"
            maps.append(TensorMap(f"{C}.mlp.e_score_correction_bias", (e,), [(bias, (1, e))],
                                  lambda p: p[0].reshape(-1), lambda a: [a.reshape(1, -1)], Role.ROUTER_BIAS))
        for j in range(e):  # one canonical tensor per expert: no slicing copies in the CPU MoE
            for m in _mlp(cfg, layout, f"{C}.mlp.experts.{j}", f"{L}.mlp.experts.{j}", cfg.moe_intermediate_size,
                          (Role.EXPERT_UP_GATE, Role.EXPERT_DOWN)):
                m.expert = j
                maps.append(m)
        if cfg.moe_num_shared_experts > 0:
            maps += _mlp(cfg, layout, f"{C}.mlp.shared_experts", f"{L}.mlp.shared_experts",
                         cfg.shared_intermediate_size, (Role.SHARED_UP_GATE, Role.SHARED_DOWN))
    else:
        maps += _mlp(cfg, layout, f"{C}.mlp", f"{L}.mlp", cfg.intermediate_size, (Role.MLP_UP_GATE, Role.MLP_DOWN))
    for m in maps:
        m.layer = i
    return maps


def tensor_maps(cfg: ErnieConfig, layout: str) -> list[TensorMap]:
    """Every canonical tensor of `cfg` with its on-disk parts in `layout`, in checkpoint order: the embedding, then
    each decoder layer's tensors together (layer 0 first), then the final norm and the untied head."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    p = PREFIX[layout]
    h, v = cfg.hidden_size, cfg.vocab_size
    maps = [_same(Role.EMBEDDING, "embed_tokens.weight", (v, h), f"{p}embed_tokens.weight")]
    for i in range(cfg.num_hidden_layers):
        maps += _layer(cfg, layout, i)
    maps.append(_same(Role.FINAL_NORM, "norm.weight", (h,), f"{p}norm.weight"))
    if not cfg.tie_word_embeddings:  # Paddle's untied head is [H, vocab]
        maps.append(_linear(Role.LM_HEAD, LM_HEAD_WEIGHT, (h, v), "lm_head.weight", layout != PADDLE))
    return maps


def canonical_maps(cfg: ErnieConfig) -> dict[str, TensorMap]:
    """Every canonical tensor of `cfg` by its canonical name (roles and shapes; the disk parts are -PT's)."""
    return {m.canonical: m for m in tensor_maps(cfg, PT)}


def maps_by_role(cfg: ErnieConfig) -> dict[tuple[Role, int | None, int | None], TensorMap]:
    """Every canonical tensor of `cfg` by (role, layer, routed expert), None where they do not apply: a builder asks
    for layer 3's o_proj by its role instead of spelling its name."""
    return {(m.role, m.layer, m.expert): m for m in tensor_maps(cfg, PT)}


def is_ignored(name: str) -> bool:
    """On-disk tensors that inference does not use: the multi-token-prediction (MTP) head."""
    return ".mtp_" in name or "mtp_block" in name


def detect_layout(names: list[str], where: str) -> str:
    """Which layout a set of on-disk tensor names is in."""
    if any(n.startswith("ernie.") for n in names):
        return PADDLE
    if any(n.startswith("model.") for n in names):
        fused = any(n.endswith("self_attn.qkv_proj.weight") for n in names)
        return PT_FUSED if fused else PT
    sample = ", ".join(sorted(names)[:3])
    raise CheckpointError(f"{where}: cannot tell the checkpoint layout: no tensor starts with 'ernie.' (-Paddle) "
                          f"or 'model.' (-PT); first names: {sample}")


def iter_canonical(cfg: ErnieConfig, reader, layout: str | None = None,
                   skip: Callable[[TensorMap], bool] | None = None) -> Iterator[tuple[TensorMap, np.ndarray]]:
    """Yield (map, canonical float array) one tensor at a time from a `CheckpointReader`, strictly checked.

    Missing, unexpected and mis-shaped tensors are all collected and reported by name in one error before any
    tensor is read, so a bad checkpoint fails fast. Tensors whose map `skip` accepts are checked but never read
    (a rank of a parallel job skips the experts other ranks hold).
    """
    names = reader.names()
    layout = layout or detect_layout(names, reader.directory)
    maps = tensor_maps(cfg, layout)
    expected = {n: s for m in maps for n, s in m.parts}
    problems = []
    missing = [n for n in expected if n not in reader]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    tied_head_copy = "lm_head.weight" if cfg.tie_word_embeddings else None
    unexpected = [n for n in names if n not in expected and not is_ignored(n) and n != tied_head_copy]
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}"
                        + (" ..." if len(unexpected) > 8 else ""))
    for n, shape in expected.items():
        if n in reader and str(reader.info(n).dtype).upper() not in FLOAT_DTYPES:
            problems.append(f"tensor '{n}' in {reader.file_of(n)} has dtype {reader.info(n).dtype}, expected a "
                            f"floating-point type (BF16, F16 or F32)")
        if n in reader and tuple(reader.info(n).shape) != tuple(shape):
            problems.append(f"tensor '{n}' in {reader.file_of(n)} has shape {list(reader.info(n).shape)}, "
                            f"expected {list(shape)} for this config ({layout} layout)")
    if problems:
        raise CheckpointError(f"{reader.directory}: checkpoint does not match config.json ({layout} layout): "
                              + "; ".join(problems))
    for m in maps:
        if skip is not None and skip(m):
            continue
        arrays = [reader.get(n) for n, _ in m.parts]
        for (n, _), a in zip(m.parts, arrays):
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise CheckpointError(f"{reader.file_of(n)}: tensor '{n}' contains NaN or Inf values")
        out = m.join(arrays)
        yield m, np.ascontiguousarray(out, dtype=np.float32 if out.dtype != np.float16 else np.float16)
