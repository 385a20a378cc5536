"""An int8 KV cache for the `ort` flavour: GroupQueryAttention's own quantised cache (`k_quant_type` /
`v_quant_type` PER_CHANNEL, `kv_cache_bit_width` 8), a quarter of the fp32 cache's bytes. Decode reads it with the
op's int8 path, prefill through `int8_attention`'s fp32 path.

The per-channel scales are calibrated on the exported graph itself, in its fp32-cache form (same weights, so an
int4 export is calibrated on int4 activations), over text from the shipped corpus (seeded random ids when the
checkpoint has no tokenizer). Keys are cached after the interleaved rotary, which turns each channel pair (2i,
2i+1) by a position-dependent angle: a pair's norm bounds both channels at every position, so key scales are
pair norms and hold at positions far beyond the calibration text. Values take each channel's largest magnitude.
Both get `MARGIN` for text the calibration did not see; beyond it a value saturates at -128 or 127.

Only the graph file is rewritten (input/output types, the attention nodes, the scale initialisers): the weights in
model.onnx.data are untouched.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ernie_paddle import graph_contract as contract
from ernie_paddle.config import ErnieConfig
from ernie_paddle.errors import ExportError
from ernie_paddle.graph_contract import LOGITS_TO_KEEP
from ernie_paddle.ort.runtime import prompt_feeds

MARGIN = 1.25  # head-room over the calibration maxima
CALIBRATION_TOKENS = 512  # per sequence
CALIBRATION_SEQUENCES = 4


def calibration_ids(model_dir: str | None, vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    """Token sequences to calibrate on: held-out corpus text through the checkpoint's tokenizer, else random ids."""
    from ernie_paddle.text.tokenizer import ErnieTokenizer, has_tokenizer

    rng = np.random.default_rng(seed)
    if model_dir is None or not has_tokenizer(model_dir):
        return [rng.integers(3, vocab_size, CALIBRATION_TOKENS) for _ in range(CALIBRATION_SEQUENCES)]
    from ernie_paddle.corpus import held_out_text

    ids = np.asarray(ErnieTokenizer(model_dir).encode(held_out_text()), np.int64)
    ids = ids[ids < vocab_size]
    starts = rng.integers(0, max(1, len(ids) - CALIBRATION_TOKENS), CALIBRATION_SEQUENCES)
    return [ids[s:s + CALIBRATION_TOKENS] for s in starts]


def calibrate(model_path: str, cfg: ErnieConfig, sequences: Sequence[np.ndarray],
              threads: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (key scales, value scales) [kv_heads * head_dim] of the fp32-cache graph at `model_path`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    session = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    n, nkv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    k_max = np.zeros((n, nkv, d // 2), np.float64)
    v_max = np.zeros((n, nkv, d), np.float64)
    names = [o.name for o in session.get_outputs()]
    for ids in sequences:
        t = len(ids)
        feeds = {**prompt_feeds(ids, cfg), LOGITS_TO_KEEP: np.array(1, np.int64)}  # only the cache is read
        out = dict(zip(names, session.run(None, feeds)))
        for i in range(n):
            k = out[contract.present(i, "key")][0, :, :t].astype(np.float64)  # [nkv, t, d]
            pair_norm = np.sqrt(k[..., 0::2] ** 2 + k[..., 1::2] ** 2)  # interleaved rotary pairs
            k_max[i] = np.maximum(k_max[i], pair_norm.max(axis=1))
            v_max[i] = np.maximum(v_max[i], np.abs(out[contract.present(i, "value")][0, :, :t]).max(axis=1))
    scales = []
    for i in range(n):
        k = np.repeat(k_max[i], 2, axis=-1)  # both channels of a pair
        scales.append(tuple((np.maximum(m, 1e-6) * MARGIN / 127.0).astype(np.float32).reshape(-1)
                            for m in (k, v_max[i])))
    return scales


def quantize_cache(model_path: str, scales: Sequence[tuple[np.ndarray, np.ndarray]], out_path: str) -> None:
    """Write the graph at `model_path` with an int8 cache and the given per-layer scales to `out_path`: each
    attention becomes `int8_attention`'s pair, the int8 op for decode and the fp32 path for prefill."""
    import onnx
    from onnx import TensorProto, numpy_helper

    from ernie_paddle.export.int8_attention import split_by_step

    model = onnx.load(model_path, load_external_data=False)
    graph = model.graph
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    if len(attention) != len(scales):
        raise ExportError(f"{model_path}: {len(attention)} GroupQueryAttention nodes, {len(scales)} layers of scales")
    names = [(f"layers.{i}.self_attn.k_scale", f"layers.{i}.self_attn.v_scale") for i in range(len(scales))]
    for (k_scale, v_scale), pair in zip(scales, names):
        graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip((k_scale, v_scale), pair))
    split_by_step(model, attention, names)
    for value in list(graph.input) + list(graph.output):
        if contract.is_cache(value.name):
            value.type.tensor_type.elem_type = TensorProto.INT8
    onnx.save(model, out_path)

