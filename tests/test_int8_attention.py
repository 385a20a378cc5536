"""Attention over the int8 KV cache (`export/int8_attention.py`): at ERNIE-4.5-21B-A3B's attention shape, the
prefill path and the decode path against a reference attention over the dequantised cache, and against the int8
GroupQueryAttention op alone (the graph before the split), which must leave the same codes in the cache."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ernie_paddle import graph_contract as contract
from ernie_paddle.export.int8_attention import QUANT_ATTRIBUTES
from ernie_paddle.export.kv_cache import quantize_cache

HEADS, KV_HEADS, D = 20, 4, 128
MAX_LEN = 64
# fp32 sums in another order (one matrix product per head against a loop over the codes): outputs are O(1)
TOLERANCE = 1e-4


def _graph(path: str) -> str:
    """One GroupQueryAttention as the `ort` export builds it, with a batch dimension and shared past/present."""
    dims = {"q": HEADS * D, "k": KV_HEADS * D, "v": KV_HEADS * D}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", w]) for n, w in dims.items()]
    cache = ["B", KV_HEADS, "L", D]
    inputs += [helper.make_tensor_value_info(contract.past(0, kv), TensorProto.FLOAT, cache) for kv in contract.KV]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
               helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", contract.past(0, "key"), contract.past(0, "value"),
                                                    "seqlens_k", "total"],
                            ["attn", contract.present(0, "key"), contract.present(0, "value")], name="layers.0.self_attn",
                            domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS, scale=D ** -0.5)
    outputs = [helper.make_tensor_value_info("attn", TensorProto.FLOAT, None)]
    outputs += [helper.make_tensor_value_info(contract.present(0, kv), TensorProto.FLOAT, cache) for kv in contract.KV]
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, path)
    return path


def _op_only(path: str, k_scale: np.ndarray, v_scale: np.ndarray, out: str) -> str:
    """The graph as exports wrote it before the split: the int8 op for every step."""
    model = onnx.load(path)
    (node,) = model.graph.node
    node.input.extend([""] * 5 + ["k_scale", "v_scale"])
    node.attribute.extend(helper.make_attribute(k, v) for k, v in QUANT_ATTRIBUTES.items())
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in ((k_scale, "k_scale"),
                                                                              (v_scale, "v_scale")))
    for value in list(model.graph.input) + list(model.graph.output):
        if contract.is_cache(value.name):
            value.type.tensor_type.elem_type = TensorProto.INT8
    onnx.save(model, out)
    return out


class Cache:
    """A shared int8 cache [B, kv_heads, MAX_LEN, d] that a session updates in place, and the runs over it."""

    def __init__(self, path: str, batch: int):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.arrays = [np.zeros((batch, KV_HEADS, MAX_LEN, D), np.int8) for _ in contract.KV]

    def step(self, q, k, v, lengths) -> np.ndarray:
        """New tokens q/k/v [B, S, .] for rows that then hold `lengths` tokens; the attention output [B, S, H*d]."""
        b = self.session.io_binding()
        for name, x in (("q", q), ("k", k), ("v", v)):
            b.bind_cpu_input(name, x)
        for kv, a in zip(contract.KV, self.arrays):
            value = ort.OrtValue.ortvalue_from_numpy(a)
            b.bind_ortvalue_input(contract.past(0, kv), value)
            b.bind_ortvalue_output(contract.present(0, kv), value)
        b.bind_cpu_input("seqlens_k", np.asarray(lengths, np.int32) - 1)
        b.bind_cpu_input("total", np.array(max(lengths), np.int32))
        b.bind_output("attn")
        self.session.run_with_iobinding(b)
        return b.copy_outputs_to_cpu()[-1]


def _reference(q: np.ndarray, cache: Cache, scales: np.ndarray, row: int, start: int) -> np.ndarray:
    """Causal attention of row `row`'s queries q [S, H*d] at positions start.. over the dequantised cache."""
    keys, values = (a[row].astype(np.float64) * (scales * f).reshape(KV_HEADS, 1, D)
                    for a, f in zip(cache.arrays, (1.0, 1.5)))  # the value scales are 1.5x the key scales
    s = q.shape[0]
    out = np.zeros((s, HEADS, D))
    heads = q.reshape(s, HEADS, D).astype(np.float64)
    for t in range(s):
        n = start + t + 1
        for h in range(HEADS):
            g = h // (HEADS // KV_HEADS)
            score = keys[g, :n] @ heads[t, h] * D ** -0.5
            p = np.exp(score - score.max())
            out[t, h] = (p / p.sum()) @ values[g, :n]
    return out.reshape(s, HEADS * D)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    work = tmp_path_factory.mktemp("int8_attention")
    scales = np.random.default_rng(1).uniform(0.02, 0.05, KV_HEADS * D).astype(np.float32)
    fp32 = _graph(str(work / "fp32.onnx"))
    quantize_cache(fp32, [(scales, scales * 1.5)], str(work / "split.onnx"))
    return str(work / "split.onnx"), _op_only(fp32, scales, scales * 1.5, str(work / "op.onnx")), scales


def _tokens(rng, batch: int, s: int):
    """Queries and keys/values for `s` new tokens; a few values beyond the codes' range, which saturate."""
    q = rng.standard_normal((batch, s, HEADS * D)).astype(np.float32)
    k, v = (rng.standard_normal((batch, s, KV_HEADS * D)).astype(np.float32) * 1.6 for _ in range(2))
    return q, k, v


def test_prefill_and_decode_equal_the_reference_and_the_int8_op(graphs):
    split_path, op_path, scales = graphs
    rng = np.random.default_rng(0)
    split, op = Cache(split_path, 2), Cache(op_path, 2)
    # a first prompt of two rows padded on the right (lengths 7 and 12), then decode steps at different lengths
    q, k, v = _tokens(rng, 2, 12)
    got, want = split.step(q, k, v, [7, 12]), op.step(q, k, v, [7, 12])
    for row, n in enumerate((7, 12)):
        np.testing.assert_allclose(got[row, :n], want[row, :n], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(got[row, :n], _reference(q[row, :n], split, scales, row, 0), atol=TOLERANCE, rtol=0)
    lengths = np.array([7, 12])
    for _ in range(3):
        lengths += 1
        q, k, v = _tokens(rng, 2, 1)
        k[0, 0, 0], v[1, 0, 5] = 9.0, -9.0  # saturate: codes 127 and -128
        got = split.step(q, k, v, lengths)
        np.testing.assert_array_equal(got, op.step(q, k, v, lengths))  # the same node runs
        for row, n in enumerate(lengths):
            np.testing.assert_allclose(got[row], _reference(q[row], split, scales, row, n - 1), atol=TOLERANCE,
                                       rtol=0)
    for mine, theirs in zip(split.arrays, op.arrays):
        for row, n in enumerate(lengths):
            np.testing.assert_array_equal(mine[row, :, :n], theirs[row, :, :n])
    assert split.arrays[0].max() == 127 and split.arrays[1].min() == -128


def test_a_chunk_over_a_past_equals_the_reference_and_the_int8_op(graphs):
    split_path, op_path, scales = graphs
    rng = np.random.default_rng(2)
    split, op = Cache(split_path, 1), Cache(op_path, 1)
    total = 0
    for s in (10, 9, 1, 17):  # chunked prefill: a chunk over the slots the earlier ones filled
        q, k, v = _tokens(rng, 1, s)
        total += s
        got, want = split.step(q, k, v, [total]), op.step(q, k, v, [total])
        np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(got[0], _reference(q[0], split, scales, 0, total - s), atol=TOLERANCE, rtol=0)
    for mine, theirs in zip(split.arrays, op.arrays):
        np.testing.assert_array_equal(mine[:, :, :total], theirs[:, :, :total])
        assert not mine[:, :, total:].any()  # nothing written past the tokens


def test_a_cache_grown_by_concatenation_takes_the_int8_op(graphs):
    """The parity report and calibration run with a past of 0 slots that the step's present extends: too short
    for an in-place write, so the op itself runs, and both graphs give the same present and output."""
    split_path, op_path, _ = graphs
    q, k, v = _tokens(np.random.default_rng(3), 1, 6)
    empty = np.zeros((1, KV_HEADS, 0, D), np.int8)
    feeds = {"q": q, "k": k, "v": v, contract.past(0, "key"): empty, contract.past(0, "value"): empty,
             "seqlens_k": np.array([5], np.int32), "total": np.array(6, np.int32)}
    got, want = (ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, feeds)
                 for p in (split_path, op_path))
    assert got[1].shape == (1, KV_HEADS, 6, D)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
