"""Attention over the int8 KV cache, chosen by the step: GroupQueryAttention's own int8 path when one token per row
is new (decode reads the quantised cache directly: the fewest bytes), and an fp32 path when a prompt chunk is.

ONNX Runtime's CPU GroupQueryAttention scores a chunk of new tokens against an int8 cache several times slower
than against an fp32 one (its fp32 path is one matrix product per head; docs/performance.md has the figures). A
prefill step therefore quantises its new keys and values exactly as the op does (divide by the channel's scale,
round half to even, saturate to [-128, 127]), writes them into the shared cache in place with TensorScatter, and
runs the fp32 GroupQueryAttention over the dequantised past and the dequantised new codes: the values the int8 op
attends to, so the two paths differ only in fp32 summation order, and the cache holds the same codes either way.
"""

from __future__ import annotations

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

OPSET = 24  # TensorScatter
QUANT_ATTRIBUTES = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
CODE_RANGE = (-128.0, 127.0)  # int8 codes saturate here, as GroupQueryAttention's quantiser does

# values every layer's attention reads, computed once per step
_IS_PREFILL = "kv_cache.is_prefill"  # more than one new token per row, into a buffer that holds them
_WRITE_AT = "kv_cache.write_at"  # [B] int64: the slot a row's first new token goes to
_PAST = "kv_cache.past_len"  # [1] int64: slots before this step's tokens


def split_by_step(model: ModelProto, attention: list[NodeProto], scales: list[tuple[str, str]]) -> None:
    """Replace each GroupQueryAttention node in `attention` (in graph order, with its layer's (key, value) scale
    initialiser names) by an If on the step: decode runs the node with the int8 cache, prefill the fp32 path."""
    graph = model.graph
    dtype = _attention_dtype(graph, attention[0])
    kv_heads = next(helper.get_attribute_value(a) for a in attention[0].attribute if a.name == "kv_num_heads")
    _constants(graph, kv_heads)
    first = list(graph.node).index(attention[0])
    q, _, _, past_k, _, seqlens, total = attention[0].input[:7]
    shared = _step_values(q, past_k, seqlens, total)
    replaced = {id(node): _by_step(node, names, dtype) for node, names in zip(attention, scales)}
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[:first] + shared + [replaced.get(id(n), n) for n in nodes[first:]])
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, OPSET)


def _attention_dtype(graph: GraphProto, node: NodeProto) -> int:
    """The element type attention runs in (the cache's before it became int8): float32, or float16."""
    present = node.output[1]
    for value in graph.output:
        if value.name == present:
            return value.type.tensor_type.elem_type
    return TensorProto.FLOAT


def _constants(graph: GraphProto, kv_heads: int) -> None:
    consts = {"kv_cache.zero": np.array([0], np.int64), "kv_cache.one": np.array([1], np.int64),
              "kv_cache.seq_axis": np.array([2], np.int64),
              "kv_cache.code_min": np.array(CODE_RANGE[0], np.float32),
              "kv_cache.code_max": np.array(CODE_RANGE[1], np.float32),
              "kv_cache.heads": np.array([0, 0, kv_heads, -1], np.int64),  # [B, S, kv_heads, d]
              "kv_cache.flat": np.array([0, 0, -1], np.int64),  # [B, S, kv_heads * d]
              "kv_cache.channels": np.array([1, kv_heads, 1, -1], np.int64)}  # a scale against [B, nkv, S, d]
    graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in consts.items())


def _step_values(query: str, past: str, seqlens: str, total: str) -> list[NodeProto]:
    """Nodes computing the step's shared values from the first attention's inputs: its query [B, S, hidden], its
    past, each row's length - 1, the longest row's length. A first prompt's padded rows start at slot 0, as in the
    op. A past shorter than the step's total (a cache grown by concatenation, as the parity report and calibration
    run it, not a shared buffer) leaves every step to the op, which concatenates."""
    n = helper.make_node
    return [n("Shape", [query], ["kv_cache.new"], start=1, end=2),
            n("Greater", ["kv_cache.new", "kv_cache.one"], ["kv_cache.more"]),
            n("Cast", [seqlens], ["kv_cache.lengths"], to=TensorProto.INT64),
            n("Add", ["kv_cache.lengths", "kv_cache.one"], ["kv_cache.ends"]),
            n("Sub", ["kv_cache.ends", "kv_cache.new"], ["kv_cache.starts"]),
            n("Max", ["kv_cache.starts", "kv_cache.zero"], [_WRITE_AT]),
            n("Cast", [total], ["kv_cache.total"], to=TensorProto.INT64),
            n("Unsqueeze", ["kv_cache.total", "kv_cache.zero"], ["kv_cache.total1"]),
            n("Sub", ["kv_cache.total1", "kv_cache.new"], ["kv_cache.past0"]),
            n("Max", ["kv_cache.past0", "kv_cache.zero"], [_PAST]),
            n("Shape", [past], ["kv_cache.slots"], start=2, end=3),
            n("GreaterOrEqual", ["kv_cache.slots", "kv_cache.total1"], ["kv_cache.fits"]),
            n("And", ["kv_cache.more", "kv_cache.fits"], ["kv_cache.in_place"]),
            n("Squeeze", ["kv_cache.in_place", "kv_cache.zero"], [_IS_PREFILL])]


def _by_step(node: NodeProto, scale_names: tuple[str, str], dtype: int) -> NodeProto:
    """The If that replaces one GroupQueryAttention node (named as it was, with its outputs)."""
    name = node.name
    q, k, v, past_k, past_v, seqlens, total = node.input[:7]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    inputs = list(node.input) + [""] * (12 - len(node.input))  # k_scale and v_scale are inputs 12 and 13
    decode = helper.make_node("GroupQueryAttention", inputs[:12] + list(scale_names),
                              [f"{name}/decode{j}" for j in range(3)], name=f"{name}/decode", domain=node.domain,
                              **attrs, **QUANT_ATTRIBUTES)

    nodes: list[NodeProto] = []
    dequantised, presents = [], []
    for x, past, scale, kv in ((k, past_k, scale_names[0], "key"), (v, past_v, scale_names[1], "value")):
        p = f"{name}/prefill.{kv}"
        nodes += [helper.make_node("Reshape", [scale, "kv_cache.channels"], [f"{p}.scale"]),
                  helper.make_node("Reshape", [x, "kv_cache.heads"], [f"{p}.heads"]),
                  helper.make_node("Transpose", [f"{p}.heads"], [f"{p}.bnsd"], perm=[0, 2, 1, 3])]
        new = _cast(nodes, f"{p}.bnsd", dtype, TensorProto.FLOAT)
        nodes += [helper.make_node("Div", [new, f"{p}.scale"], [f"{p}.scaled"]),
                  helper.make_node("Round", [f"{p}.scaled"], [f"{p}.rounded"]),  # half to even, as the op
                  helper.make_node("Clip", [f"{p}.rounded", "kv_cache.code_min", "kv_cache.code_max"], [f"{p}.clip"]),
                  helper.make_node("Cast", [f"{p}.clip"], [f"{p}.codes"], to=TensorProto.INT8),
                  helper.make_node("TensorScatter", [past, f"{p}.codes", _WRITE_AT], [f"{p}.present"], axis=2),
                  # attention reads the past's codes and the new codes, dequantised
                  helper.make_node("Slice", [f"{p}.present", "kv_cache.zero", _PAST, "kv_cache.seq_axis"],
                                   [f"{p}.past_codes"]),
                  helper.make_node("Cast", [f"{p}.past_codes"], [f"{p}.past_f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"{p}.past_f", f"{p}.scale"], [f"{p}.past_fp32"]),
                  helper.make_node("Cast", [f"{p}.codes"], [f"{p}.codes_f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"{p}.codes_f", f"{p}.scale"], [f"{p}.new_bnsd"]),
                  helper.make_node("Transpose", [f"{p}.new_bnsd"], [f"{p}.new_bsnd"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"{p}.new_bsnd", "kv_cache.flat"], [f"{p}.new_fp32"])]
        dequantised.append((_cast(nodes, f"{p}.new_fp32", TensorProto.FLOAT, dtype),
                            _cast(nodes, f"{p}.past_fp32", TensorProto.FLOAT, dtype)))
        presents.append(f"{p}.present")
    (k_new, k_past), (v_new, v_past) = dequantised
    nodes.append(helper.make_node("GroupQueryAttention", [q, k_new, v_new, k_past, v_past, seqlens, total],
                                  [f"{name}/prefill.out", f"{name}/prefill.k_fp", f"{name}/prefill.v_fp"],
                                  name=f"{name}/prefill", domain=node.domain, **attrs))

    def outputs(names: list[str]) -> list:
        return [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, (dtype, TensorProto.INT8,
                                                                               TensorProto.INT8))]

    then_branch = helper.make_graph(nodes, f"{name}/prefill", [], outputs([f"{name}/prefill.out", *presents]))
    else_branch = helper.make_graph([decode], f"{name}/decode", [], outputs(list(decode.output)))
    return helper.make_node("If", [_IS_PREFILL], list(node.output), name=name, then_branch=then_branch,
                            else_branch=else_branch)


def _cast(nodes: list[NodeProto], value: str, source: int, to: int) -> str:
    """`value` (of type `source`) cast to `to` where they differ (an fp16 export's attention), else itself."""
    if source == to:
        return value
    nodes.append(helper.make_node("Cast", [value], [f"{value}.cast"], to=to))
    return f"{value}.cast"
