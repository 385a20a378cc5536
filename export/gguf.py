"""Write an ERNIE-4.5 MoE checkpoint as a GGUF file for llama.cpp (architecture `ernie4_5-moe`).

llama.cpp is an independent implementation of this model: its files serve the benchmarks and the parity report
(`ernie-paddle parity --gguf FILE`). Tensors are read one at a time through the project's layout table and
written in two passes (tensor infos, then data) with the `gguf` package, so memory holds one layer's stacked
experts at most. ERNIE's interleaved RoPE is llama.cpp's NORM rope, so q/k need no permutation. Types: F32, F16,
Q8_0 or Q4_0 for the matrices; norms, the router and its correction bias always stay F32. The file appears only
when complete (`atomic_path`): an error or an interrupt leaves nothing behind.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from ernie_paddle import files
from ernie_paddle.atomic import atomic_path
from ernie_paddle.checkpoint.folder import TensorStream, read_canonical
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import ExportError
from ernie_paddle.checkpoint.layout import PT, Role, TensorMap, tensor_maps

ARCH = "ernie4_5-moe"
TYPES = ("F32", "F16", "Q8_0", "Q4_0")  # the matrices' type, as `--type` names it
FILE_TYPE = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_0": 2}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / ...
QUANTIZER_FILE_TYPE = {"Q4_K_M": 15}  # made by llama.cpp's own quantizer from one of ours (benchmarking.setups)
# llama.cpp's tensor names for each role, one per output block (qkv -> q, k, v; up_gate -> gate, up); inside a
# layer they are prefixed `blk.{i}.`. A layer's routed experts are stacked into one tensor per name.
NAMES = {Role.EMBEDDING: ("token_embd",), Role.INPUT_NORM: ("attn_norm",), Role.QKV: ("attn_q", "attn_k", "attn_v"),
         Role.ATTN_OUT: ("attn_output",), Role.POST_ATTN_NORM: ("ffn_norm",), Role.ROUTER: ("ffn_gate_inp",),
         Role.ROUTER_BIAS: ("exp_probs_b",), Role.MLP_UP_GATE: ("ffn_gate", "ffn_up"), Role.MLP_DOWN: ("ffn_down",),
         Role.EXPERT_UP_GATE: ("ffn_gate_exps", "ffn_up_exps"), Role.EXPERT_DOWN: ("ffn_down_exps",),
         Role.SHARED_UP_GATE: ("ffn_gate_shexp", "ffn_up_shexp"), Role.SHARED_DOWN: ("ffn_down_shexp",),
         Role.FINAL_NORM: ("output_norm",), Role.LM_HEAD: ("output",)}


@dataclass
class GGUFTensor:
    """One tensor of the file: its GGUF name and numpy shape, and how it is made from canonical tensors."""

    name: str
    shape: tuple[int, ...]
    f32: bool  # always F32 whatever the type asked (norms, the router and its correction bias)
    maps: list[TensorMap]  # one canonical tensor, or every routed expert of a layer (stacked)
    block: int | None  # which output block of each (q, k or v; gate or up); None: the whole tensor

    def array(self, arrays: list[np.ndarray]) -> np.ndarray:
        """This tensor from the canonical arrays of `maps`, in llama.cpp's (torch [out, in]) orientation."""
        role = self.maps[0].role
        parts = [a if self.block is None else m.out_blocks(a)[self.block] for m, a in zip(self.maps, arrays)]
        if parts[0].ndim == 2 and role is not Role.EMBEDDING:  # canonical Linear weights are [in, out]
            parts = [p.T for p in parts]
        return np.stack(parts) if role.routed_expert else parts[0]


def _gguf_tensor(maps: list[TensorMap], k: int) -> GGUFTensor:
    """The `k`-th GGUF tensor (output block) made of `maps` (all of one role and layer)."""
    m = maps[0]
    prefix = "" if m.layer is None else f"blk.{m.layer}."
    name = prefix + NAMES[m.role][k] + (".bias" if m.role is Role.ROUTER_BIAS else ".weight")
    block = k if m.blocks else None
    if len(m.shape) == 1 or m.role is Role.EMBEDDING:
        shape = m.shape
    else:
        shape = (m.blocks[k] if m.blocks else m.shape[1], m.shape[0])
    if m.role.routed_expert:
        shape = (len(maps), *shape)
    return GGUFTensor(name, shape, m.role.is_norm or m.role.keep_fp32, maps, block)


def gguf_tensors(cfg: ErnieConfig) -> list[GGUFTensor]:
    """Every tensor of the file, from the layout table's roles, in its order; a layer's routed experts are stacked
    where the first of them stands (gate, up, then down)."""
    out, stacked = [], set()
    maps = tensor_maps(cfg, PT)
    for m in maps:
        if m.role.routed_expert:
            if (m.layer, m.role) in stacked:
                continue
            group = [x for x in maps if x.layer == m.layer and x.role is m.role]
            stacked.add((m.layer, m.role))
        else:
            group = [m]
        out += [_gguf_tensor(group, k) for k in range(len(NAMES[m.role]))]
    return out


def _arrays(cfg: ErnieConfig, directory: str | None, source=None) -> Iterator[tuple[GGUFTensor, np.ndarray]]:
    """Each tensor of `gguf_tensors(cfg)` with its array, in order.

    From the checkpoint in `directory`, or from `source`: canonical (name, array) pairs. A canonical array used by
    several GGUF tensors (qkv, up_gate, the experts' stacks) is held until its last use, so memory holds one layer's
    experts at most."""
    tensors = gguf_tensors(cfg)
    take = TensorStream(source if source is not None else
                        ((m.canonical, a) for m, a in read_canonical(directory, cfg))).take
    uses = Counter(m.canonical for t in tensors for m in t.maps)
    held: dict[str, np.ndarray] = {}

    def fetch(name: str) -> np.ndarray:
        a = held[name] if name in held else take(name)
        uses[name] -= 1
        if uses[name]:
            held[name] = a
        else:
            held.pop(name, None)
        return a

    for t in tensors:
        yield t, t.array([fetch(m.canonical) for m in t.maps])


def _vocab(directory: str, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and token types from tokenizer.model, padded to vocab_size (random checkpoints: placeholders)."""
    pieces, scores, types = [], [], []
    spm_path = os.path.join(directory, files.SPM_MODEL)
    if os.path.isfile(spm_path):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.Load(spm_path)
        for i in range(sp.GetPieceSize()):
            pieces.append(sp.IdToPiece(i).encode("utf-8"))
            scores.append(sp.GetScore(i))
            types.append(2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 1)
    else:
        for i, p in enumerate(["<unk>", "<s>", "</s>"]):
            pieces.append(p.encode())
            scores.append(0.0)
            types.append(2 if i == 0 else 3)
    while len(pieces) < vocab_size:
        pieces.append(f"<unused{len(pieces)}>".encode())
        scores.append(-1e4)
        types.append(5)
    return pieces, scores, types


def _add_metadata(w, cfg: ErnieConfig, qtype: str, directory: str | None) -> None:
    """The hyperparameters and the tokenizer, under llama.cpp's `ernie4_5-moe` keys."""
    w.add_name(os.path.basename(os.path.abspath(directory)) if directory else "ernie-4.5-random")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.moe_num_experts)
    w.add_expert_used_count(cfg.moe_k)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.moe_num_shared_experts)
    w.add_expert_shared_feed_forward_length(cfg.shared_intermediate_size)
    w.add_interleave_moe_layer_step(cfg.moe_layer_interval)
    w.add_leading_dense_block_count(cfg.moe_layer_start_index)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(FILE_TYPE[qtype])
    pieces, scores, types = _vocab(directory or "", cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_ids[0])
    w.add_unk_token_id(0)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)


def _encoding(t: GGUFTensor, qtype: str):
    """How the data of `t` is stored: a numpy float dtype, or a GGML quantisation type."""
    import gguf

    if t.f32 or qtype == "F32":
        return np.float32
    return np.float16 if qtype == "F16" else gguf.GGMLQuantizationType[qtype]


def _add_tensor_infos(w, tensors: Iterable[GGUFTensor], qtype: str) -> None:
    """Declare every tensor (name, shape, type)."""
    import gguf

    for t in tensors:
        encoding = _encoding(t, qtype)
        if encoding in (np.float32, np.float16):
            nbytes = int(np.prod(t.shape)) * np.dtype(encoding).itemsize
            w.add_tensor_info(t.name, t.shape, np.dtype(encoding), nbytes)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, encoding)
            w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=encoding)


def _encode(arr: np.ndarray, encoding) -> np.ndarray:
    import gguf

    if encoding in (np.float32, np.float16):
        return np.ascontiguousarray(arr, dtype=encoding)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), encoding)


def write_gguf(directory: str | None, out_path: str, qtype: str = "Q4_0", config: ErnieConfig | None = None,
               tensors=None) -> None:
    """Write the checkpoint in `directory` (or `config` + canonical `tensors`) to `out_path`, all or nothing."""
    import gguf

    if qtype not in TYPES:
        raise ExportError(f"GGUF type must be one of {', '.join(TYPES)}, got {qtype!r}")
    cfg = config or ErnieConfig.from_file(directory)
    if not cfg.is_moe_model:
        raise ExportError(f"the GGUF writer writes the MoE architecture ({ARCH}) only; "
                          f"{directory or 'this config'} is a dense {cfg.model_type} model")
    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        try:
            _add_metadata(w, cfg, qtype, directory)
            _add_tensor_infos(w, gguf_tensors(cfg), qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t, arr in _arrays(cfg, directory, tensors):
                w.write_tensor_data(_encode(arr, _encoding(t, qtype)))
        finally:
            w.close()
