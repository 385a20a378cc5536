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
from typing import Iterable, Iterator

import numpy as np

from ernie_paddle.atomic import atomic_path
from ernie_paddle.checkpoint import TensorStream, read_canonical
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import ExportError

ARCH = "ernie4_5-moe"
TYPES = ("F32", "F16", "Q8_0", "Q4_0")  # the matrices' type, as `--type` names it
FILE_TYPE = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_0": 2}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / ...
F32_KINDS = ("norm", "router", "bias")


def gguf_tensors(cfg: ErnieConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, numpy shape, kind) of every tensor, in the order `_arrays` yields them."""
    h, v, d = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    out = [("token_embd.weight", (v, h), "matrix")]
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}"
        out += [(f"{b}.attn_norm.weight", (h,), "norm"),
                (f"{b}.attn_q.weight", (cfg.num_attention_heads * d, h), "matrix"),
                (f"{b}.attn_k.weight", (cfg.num_key_value_heads * d, h), "matrix"),
                (f"{b}.attn_v.weight", (cfg.num_key_value_heads * d, h), "matrix"),
                (f"{b}.attn_output.weight", (h, cfg.num_attention_heads * d), "matrix"),
                (f"{b}.ffn_norm.weight", (h,), "norm")]
        if cfg.is_moe_layer(i):
            e, ie, si = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.shared_intermediate_size
            out += [(f"{b}.ffn_gate_inp.weight", (e, h), "router")]
            if cfg.moe_use_aux_free:
                out += [(f"{b}.exp_probs_b.bias", (e,), "bias")]
            out += [(f"{b}.ffn_gate_exps.weight", (e, ie, h), "matrix"), (f"{b}.ffn_up_exps.weight", (e, ie, h), "matrix"),
                    (f"{b}.ffn_down_exps.weight", (e, h, ie), "matrix")]
            if cfg.moe_num_shared_experts:
                out += [(f"{b}.ffn_gate_shexp.weight", (si, h), "matrix"), (f"{b}.ffn_up_shexp.weight", (si, h), "matrix"),
                        (f"{b}.ffn_down_shexp.weight", (h, si), "matrix")]
        else:
            ii = cfg.intermediate_size
            out += [(f"{b}.ffn_gate.weight", (ii, h), "matrix"), (f"{b}.ffn_up.weight", (ii, h), "matrix"),
                    (f"{b}.ffn_down.weight", (h, ii), "matrix")]
    out.append(("output_norm.weight", (h,), "norm"))
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", (v, h), "matrix"))
    return out


def _arrays(cfg: ErnieConfig, directory: str | None, source=None) -> Iterator[np.ndarray]:
    """The arrays of `gguf_tensors(cfg)`, in order, in llama.cpp's (torch [out, in]) orientation.

    From the checkpoint in `directory`, or from `source`: canonical (name, array) pairs."""
    take = TensorStream(source if source is not None else
                        ((m.canonical, a) for m, a in read_canonical(directory, cfg))).take

    def split_mlp(prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ug, down = take(f"{prefix}.up_gate_proj.weight"), take(f"{prefix}.down_proj.weight")
        w = ug.shape[1] // 2
        return ug[:, :w].T, ug[:, w:].T, down.T

    d = cfg.head_dim
    yield take("embed_tokens.weight")
    for i in range(cfg.num_hidden_layers):
        L = f"layers.{i}"
        yield take(f"{L}.input_layernorm.weight")
        qkv = take(f"{L}.self_attn.qkv_proj.weight")
        q_w, kv_w = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        yield qkv[:, :q_w].T
        yield qkv[:, q_w:q_w + kv_w].T
        yield qkv[:, q_w + kv_w:].T
        yield take(f"{L}.self_attn.o_proj.weight").T
        yield take(f"{L}.post_attention_layernorm.weight")
        if cfg.is_moe_layer(i):
            yield take(f"{L}.mlp.gate.weight").T
            if cfg.moe_use_aux_free:
                yield take(f"{L}.mlp.e_score_correction_bias")
            parts = [split_mlp(f"{L}.mlp.experts.{j}") for j in range(cfg.moe_num_experts)]
            for k in range(3):
                yield np.stack([p[k] for p in parts])
            del parts
            if cfg.moe_num_shared_experts:
                yield from split_mlp(f"{L}.mlp.shared_experts")
        else:
            yield from split_mlp(f"{L}.mlp")
    yield take("norm.weight")
    if not cfg.tie_word_embeddings:
        yield take("lm_head.weight").T


def _vocab(directory: str, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and token types from tokenizer.model, padded to vocab_size (random checkpoints: placeholders)."""
    pieces, scores, types = [], [], []
    spm_path = os.path.join(directory, "tokenizer.model")
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


def _add_tensor_infos(w, items: Iterable[tuple[str, tuple[int, ...], str]], qtype: str) -> list:
    """Declare every tensor (name, shape, type); returns per tensor how its data is encoded: a numpy float
    dtype, or a GGML quantisation type."""
    import gguf

    encodings = []
    for name, shape, kind in items:
        if kind in F32_KINDS or qtype == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
            encodings.append(np.float32)
        elif qtype == "F16":
            w.add_tensor_info(name, shape, np.dtype(np.float16), int(np.prod(shape)) * 2)
            encodings.append(np.float16)
        else:
            qt = gguf.GGMLQuantizationType[qtype]
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qt)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qt)
            encodings.append(qt)
    return encodings


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
    items = gguf_tensors(cfg)
    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        try:
            _add_metadata(w, cfg, qtype, directory)
            encodings = _add_tensor_infos(w, items, qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for (name, shape, _), encoding, arr in zip(items, encodings, _arrays(cfg, directory, tensors)):
                assert arr.shape == shape, (name, arr.shape, shape)
                w.write_tensor_data(_encode(arr, encoding))
        finally:
            w.close()
