"""A small ONNX graph builder that streams weights to external data as they are added.

Each weight's bytes go straight to the external data file and the graph keeps only a reference, so memory
holds one tensor at a time whatever the model size, and the `.onnx` file stays small (no 2 GiB protobuf
limit). Small tensors (shape constants, axes) stay inline: ONNX Runtime cannot read those from external data.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ernie_paddle.files import onnx_data

INLINE_LIMIT = 1024  # bytes: tensors at most this big are stored inside the .onnx file
MS = "com.microsoft"


class GraphBuilder:
    """Nodes, inputs, outputs and (external) initializers of one ONNX graph."""

    def __init__(self, data_path: str, data_location: str):
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._names: dict[str, int] = {}
        self._data = open(data_path, "wb")
        self._data_location = data_location  # file name relative to the .onnx file

    # ---- names -----------------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    # ---- weights ---------------------------------------------------------------------------------------
    def weight(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; large ones are appended to the external data file (64-byte aligned)."""
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)  # (never on 0-d arrays: it would make them 1-d)
        t = numpy_helper.from_array(array, name) if array.nbytes <= INLINE_LIMIT else self._external(name, array)
        self.initializers.append(t)
        return name

    def _external(self, name: str, array: np.ndarray) -> TensorProto:
        pad = -self._data.tell() % 64
        if pad:
            self._data.write(b"\0" * pad)
        offset = self._data.tell()
        self._data.write(array.tobytes())
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self._data_location), ("offset", str(offset)), ("length", str(array.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def const(self, value, dtype=np.int64, name: str = "const") -> str:
        return self.weight(self.fresh(name), np.asarray(value, dtype=dtype))

    # ---- nodes -----------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, domain: str = "", name: str | None = None,
           **attrs) -> str | list[str]:
        """Append a node; returns its output name (or names when n_out > 1)."""
        base = self.fresh(name or op_type)
        outs = [f"{base}/out{i}" if n_out > 1 else f"{base}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain or None, **attrs))
        return outs if n_out > 1 else outs[0]

    def rename(self, value: str, name: str) -> str:
        """Give the node output `value` the name `name`, in the nodes that read it too; returns `name`. For values
        others look up by name (the contract's probe values)."""
        for node in reversed(self.nodes):  # the readers come after the node that writes it
            node.input[:] = [name if x == value else x for x in node.input]
            if value in node.output:
                node.output[list(node.output).index(value)] = name
                return name
        raise KeyError(f"no node writes {value!r}")

    def input(self, name: str, elem_type: int, shape: Sequence) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, src: str, name: str, elem_type: int, shape: Sequence, first: bool = False) -> None:
        self.nodes.append(helper.make_node("Identity", [src], [name], name=self.fresh(f"out_{name}")))
        info = helper.make_tensor_value_info(name, elem_type, list(shape))
        self.outputs.insert(0 if first else len(self.outputs), info)

    # ---- finish ----------------------------------------------------------------------------------------
    def save(self, path: str, graph_name: str, opset: int = 21, metadata: dict | None = None) -> None:
        self._data.close()
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                                  producer_name="ernie-paddle")
        model.ir_version = 10
        for k, v in (metadata or {}).items():
            model.metadata_props.add(key=k, value=str(v))
        with open(path, "wb") as f:
            f.write(model.SerializeToString())

    def close(self) -> None:
        if not self._data.closed:
            self._data.close()


def data_file_for(onnx_path: str) -> tuple[str, str]:
    """(absolute path, name relative to the model) of the external data file of `onnx_path`."""
    name = onnx_data(os.path.basename(onnx_path))
    return os.path.join(os.path.dirname(onnx_path), name), name
