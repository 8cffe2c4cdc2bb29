"""A float32 ONNX graph -> a mixed-precision float16 graph with float32 inputs and outputs.

Weights, matmuls, convolutions and element-wise ops go to float16. What overflows or loses the signal in float16
stays float32, with a ``Cast`` on each edge where the precision changes:

- ops that normalise, accumulate or exponentiate (:data:`FP32_OPS`): LayerNormalization, Softmax, the summing
  reductions (a sum of squares over a 768-wide row passes 65504 easily), Pow, Exp, Log, Sqrt;
- nodes the caller names (``keep_fp32``): the audio front end, whose power spectrum needs float32 to resolve
  quiet bins next to loud ones.

Written with the ``onnx`` API (onnxconverter-common is not a dependency): the graph is small enough to walk once.
Float constants are clamped into float16's finite range (``finfo(float32).min`` mask fills become -65504, not
-inf) and tiny non-zero ones (``eps = 1e-12``) are kept non-zero at float16's smallest subnormal.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP32_OPS = frozenset(
    {
        "LayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "BatchNormalization",
        "Softmax",
        "LogSoftmax",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceProd",
        "CumSum",
        "Pow",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
    }
)
# ops that only read their input's type or write the type an attribute names: they take either precision as is
TYPE_NEUTRAL_OPS = frozenset({"Cast", "Shape", "Size"})
# ops whose output type comes from an attribute, which we cannot retarget safely
UNSUPPORTED_FLOAT_SOURCES = frozenset(
    {"EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"}
)
FLOAT16_MAX = 65504.0
FLOAT16_TINY = 2.0**-24  # smallest positive subnormal


def convert_to_float16(model: onnx.ModelProto, keep_fp32: Collection[str] = ()) -> onnx.ModelProto:
    """Return a float16 copy of ``model``; ``keep_fp32``: names of nodes that must compute in float32.

    Graph inputs and outputs keep their float32 types. Raises ``ValueError`` for graphs this pass does not handle
    (control-flow subgraphs, random-number ops, float values whose type shape inference cannot tell).
    """
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"node {node.name!r} ({node.op_type}) has a subgraph; the conversion needs a flat graph")
    types = _elem_types(converted)
    # standalone copies: protobuf hands out a new wrapper per access, so ids of graph.node[i] are not stable
    source = [_copy(node) for node in graph.node]
    readers = defaultdict(list)  # value -> the nodes reading it
    for node in source:
        for name in node.input:
            if name:
                readers[name].append(node)
    keep = set(keep_fp32)

    def computes_fp32(node) -> bool:
        if node.op_type == "Constant":  # a constant is stored in the precision of the nodes that compute with it
            deciding = [r for r in readers[node.output[0]] if r.op_type not in TYPE_NEUTRAL_OPS]
            return all(computes_fp32(r) for r in deciding)
        return node.op_type in FP32_OPS or node.name in keep

    fp32 = {id(node): computes_fp32(node) for node in source}  # ``source`` keeps the ids alive
    half_initializer = _convert_initializers(graph, readers, fp32)
    names = _NameSource(graph)

    is_half: set[str] = set()  # values that now hold float16
    casts: dict[tuple[str, int], str] = {}  # (value, to) -> the cast value
    nodes = []

    def cast(value: str, to: int) -> str:
        if (value, to) not in casts:
            suffix = "fp16" if to == TensorProto.FLOAT16 else "fp32"
            out = names.fresh(f"{value}_{suffix}")
            nodes.append(helper.make_node("Cast", [value], [out], name=names.fresh(f"Cast_{out}"), to=to))
            casts[value, to] = out
        return casts[value, to]

    for node in source:
        node_fp32 = fp32[id(node)]
        if node.op_type in UNSUPPORTED_FLOAT_SOURCES and not node_fp32:
            raise ValueError(f"node {node.name!r}: {node.op_type} makes float32 values from an attribute; keep it fp32")
        if node.op_type not in TYPE_NEUTRAL_OPS:
            for i, name in enumerate(node.input):
                if not name or types.get(name) != TensorProto.FLOAT:
                    continue
                if name in half_initializer:
                    if not node_fp32:
                        node.input[i] = half_initializer[name]
                    continue
                if node_fp32 and name in is_half:
                    node.input[i] = cast(name, TensorProto.FLOAT)
                elif not node_fp32 and name not in is_half:
                    node.input[i] = cast(name, TensorProto.FLOAT16)
        if not node_fp32 and node.op_type not in TYPE_NEUTRAL_OPS:
            _retarget_attributes(node)
            for out in node.output:
                if types.get(out) == TensorProto.FLOAT:
                    is_half.add(out)
                elif out and out not in types:
                    raise ValueError(f"shape inference gives no type for {out!r} ({node.op_type}); cannot convert")
        nodes.append(node)

    # float16 graph outputs: rename the inner value, cast back to float32 under the public name
    for output in graph.output:
        if output.name in is_half:
            inner = names.fresh(f"{output.name}_fp16")
            for node in nodes:
                node.input[:] = [inner if n == output.name else n for n in node.input]
                node.output[:] = [inner if n == output.name else n for n in node.output]
            nodes.append(helper.make_node("Cast", [inner], [output.name], name=names.fresh("Cast_output"), to=1))

    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale float32 types; recomputed (and checked) below
    return onnx.shape_inference.infer_shapes(converted, check_type=True, strict_mode=True)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def float16_array(values: np.ndarray) -> np.ndarray:
    """float32 -> float16, clamping finite values into float16's range and keeping tiny non-zeros non-zero."""
    values = np.asarray(values, dtype=np.float32)
    magnitude = np.abs(values)
    finite = np.isfinite(values)
    clamped = np.where(finite & (magnitude > FLOAT16_MAX), np.sign(values) * FLOAT16_MAX, values)
    clamped = np.where((magnitude > 0) & (magnitude < FLOAT16_TINY), np.sign(values) * FLOAT16_TINY, clamped)
    return clamped.astype(np.float16)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """value name -> ONNX element type, from shape inference, the graph's I/O, initializers and constants."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {}
    for value in (*graph.value_info, *graph.input, *graph.output):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for tensor in graph.initializer:
        types[tensor.name] = tensor.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    types[node.output[0]] = attribute.t.data_type
                elif attribute.name in ("value_float", "value_floats"):
                    types[node.output[0]] = TensorProto.FLOAT
    return types


def _convert_initializers(graph, readers, fp32) -> dict[str, str]:
    """float32 initializers read by float16 nodes -> float16 (in place when no float32 node reads them, else as a
    copy). Returns original name -> float16 name."""
    half = {}
    existing = {t.name for t in graph.initializer}
    for index, tensor in enumerate(list(graph.initializer)):
        if tensor.data_type != TensorProto.FLOAT:
            continue
        precisions = {fp32[id(node)] for node in readers[tensor.name] if node.op_type not in TYPE_NEUTRAL_OPS}
        if False not in precisions:
            continue
        if True in precisions:
            name = f"{tensor.name}_fp16"
            while name in existing:
                name += "_"
            existing.add(name)
        else:
            name = tensor.name
        converted = numpy_helper.from_array(float16_array(numpy_helper.to_array(tensor)), name)
        if name == tensor.name:
            graph.initializer[index].CopyFrom(converted)
        else:
            graph.initializer.append(converted)
        half[tensor.name] = name
    return half


def _retarget_attributes(node) -> None:
    """A node moved to float16 that makes float32 values from an attribute now makes float16 ones."""
    if node.op_type == "Cast":
        return  # type-neutral: its ``to`` is what the graph asked for
    for attribute in node.attribute:
        is_float = attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT
        if is_float and node.op_type in ("Constant", "ConstantOfShape"):
            values = float16_array(numpy_helper.to_array(attribute.t))
            attribute.t.CopyFrom(numpy_helper.from_array(values, attribute.t.name))
    if node.op_type == "Constant":
        for attribute in list(node.attribute):
            if attribute.name in ("value_float", "value_floats"):
                values = np.asarray(attribute.f if attribute.name == "value_float" else list(attribute.floats))
                node.attribute.remove(attribute)
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(float16_array(values))))


class _NameSource:
    """Fresh value/node names that collide with nothing in the graph."""

    def __init__(self, graph):
        self.taken = {t.name for t in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}
        for node in graph.node:
            self.taken.update(node.output)
            self.taken.add(node.name)

    def fresh(self, base: str) -> str:
        name, index = base, 0
        while name in self.taken:
            index += 1
            name = f"{base}_{index}"
        self.taken.add(name)
        return name
