"""Weight bytes read per decoded token, from a file's layout: decode at batch 1 reads every weight it uses once, so
these bytes over the read bandwidth are the floor of its time (the bandwidth floor the benchmarks compare with).

A token reads each dense matrix whole, `k` of each layer's `E` routed experts (`k / E` of their bytes on average),
and one row of a table it only looks rows up in (the embedding, the rotary cos/sin caches). The counts come from the stored layout, and, for an
ONNX graph, also from the layout MLAS repacks MatMulNBits and QMoE weights into at `accuracy_level` 4 (what its
kernels read; `memory.packed_bytes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ernie_paddle.errors import InputError


@dataclass(frozen=True)
class TokenBytes:
    """Weight bytes of a file and what one decoded token reads of them."""

    stored: int  # every weight tensor's bytes
    per_token: int  # what a token reads: dense tensors whole, routed experts k/E, a looked-up table one row
    experts_per_token: int  # the routed experts' share of `per_token`
    packed_per_token: int | None = None  # `per_token` with MLAS's prepacked layout where the kernels repack

    def as_dict(self) -> dict:
        d = {"stored_gb": self.stored / 1e9, "per_token_gb": self.per_token / 1e9,
             "experts_per_token_gb": self.experts_per_token / 1e9}
        if self.packed_per_token is not None:
            d["packed_per_token_gb"] = self.packed_per_token / 1e9
        return {k: round(v, 4) for k, v in d.items()}


def _initializer_bytes(tensor) -> int:
    """Bytes of an ONNX initializer, read from its external-data length when its data lives outside the graph."""
    from onnx import TensorProto, helper

    entries = {e.key: e.value for e in tensor.external_data}
    if tensor.data_location == TensorProto.EXTERNAL and "length" in entries:
        return int(entries["length"])
    count = 1
    for d in tensor.dims:
        count *= d
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _nodes(graph):
    """Every node of `graph` and of its subgraphs (If branches)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _nodes(attr.g)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _packed(node, i: int, dims: list[int]) -> int | None:
    """Resident bytes of input `i` of a MatMulNBits or block-wise QMoE node with `accuracy_level` 4 once MLAS has
    prepacked it: the codes tensor packs to `memory.packed_bytes`, its scales fold into that; None otherwise."""
    from ernie_paddle.memory import packed_bytes

    a = _attrs(node)
    if a.get("accuracy_level") != 4:
        return None
    if node.op_type == "MatMulNBits" and i in (1, 2):
        return packed_bytes(a["K"] * a["N"], a["bits"], a["block_size"]) if i == 1 else 0
    if node.op_type == "QMoE" and "block_size" in a and i in (2, 3, 5, 6):
        bits = a.get("expert_weight_bits", 4)
        n = dims[0] * dims[1] * dims[2] * 8 // bits
        return packed_bytes(n, bits, a["block_size"]) if i in (2, 5) else 0
    return None


def onnx_token_bytes(folder: str, model_file: str | None = None) -> TokenBytes:
    """Weight bytes of an exported folder's graph (its external data is not read): QMoE's expert tensors count k/E,
    an initializer only ever looked up by row (the embedding, the rotary caches) one row, every other one whole."""
    import onnx

    from ernie_paddle.files import ONNX_MODEL

    path = os.path.join(folder, model_file or ONNX_MODEL)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (an exported ONNX folder has one)")
    graph = onnx.load(path, load_external_data=False).graph
    sizes = {t.name: (_initializer_bytes(t), list(t.dims)) for t in graph.initializer}
    share: dict[str, float] = {}  # the largest share of an initializer any node reads per token
    packed: dict[str, int] = {}  # initializers MLAS repacks: their resident bytes
    experts: set[str] = set()
    for node in _nodes(graph):
        for i, name in enumerate(node.input):
            if name not in sizes:
                continue
            nbytes, dims = sizes[name]
            if (p := _packed(node, i, dims)) is not None:
                packed[name] = p
            if node.op_type == "QMoE" and 2 <= i <= 13:
                frac = _attrs(node)["k"] / dims[0]
                experts.add(name)
            elif (node.op_type == "Gather" and i == 0 or node.op_type == "RotaryEmbedding" and i in (2, 3)) and dims:
                frac = 1 / dims[0]  # rows looked up by token id or by position
            else:
                frac = 1.0
            share[name] = max(share.get(name, 0.0), frac)
    per_token = sum(sizes[n][0] * f for n, f in share.items())
    packed_per_token = sum(packed.get(n, sizes[n][0]) * f for n, f in share.items())
    return TokenBytes(sum(b for b, _ in sizes.values()), round(per_token),
                      round(sum(sizes[n][0] * share[n] for n in experts)), round(packed_per_token))


def gguf_token_bytes(path: str, experts_used: int) -> TokenBytes:
    """Weight bytes of a GGUF file: `*_exps` tensors count experts_used/E, the token embedding one row when the file
    has its own `output.weight` (else llama.cpp reads the table whole as the head), every other tensor whole."""
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    tensors = GGUFReader(path).tensors
    names = {t.name for t in tensors}
    per_token = stored = expert_bytes = 0
    for t in tensors:
        n = int(t.n_bytes)
        stored += n
        if "_exps." in t.name:
            part = n * experts_used / int(t.shape[-1])  # GGUF shapes run innermost first: experts last
            expert_bytes += part
        elif t.name == "token_embd.weight" and "output.weight" in names:
            part = n / int(t.shape[-1])
        else:
            part = n
        per_token += part
    return TokenBytes(stored, round(per_token), round(expert_bytes))
