"""The float16 conversion on a hand-built graph with every case it handles: weights shared by fp16 and fp32 nodes,
constants, a ConstantOfShape, a Cast to float, a float32-pinned node, an out-of-range mask constant."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from synergy.export.fp16 import FLOAT16_MAX, convert_to_float16, float16_array

D = 7


def _graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "weight")
    gamma = numpy_helper.from_array(np.ones(D, np.float32), "gamma")
    mask_fill = numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "mask_fill")
    nodes = [
        helper.make_node("MatMul", ["x", "weight"], ["h"], name="matmul"),
        helper.make_node("LayerNormalization", ["h", "gamma"], ["n"], name="norm", axis=-1),
        # the weight is read again by a node pinned to fp32 by name: it needs an fp32 and an fp16 copy
        helper.make_node("MatMul", ["n", "weight"], ["pinned"], name="keep_me"),
        helper.make_node("Shape", ["pinned"], ["shape"], name="shape"),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["zeros"], name="zeros", value=helper.make_tensor("v", 1, [1], [0.5])
        ),
        helper.make_node("Cast", ["is_pad"], ["pad_float"], name="cast_mask", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pad_float", "mask_fill"], ["bias"], name="bias"),
        helper.make_node("Add", ["pinned", "bias"], ["scores"], name="add_bias"),
        helper.make_node("Add", ["scores", "zeros"], ["scores2"], name="add_zeros"),
        helper.make_node("Softmax", ["scores2"], ["probs"], name="softmax", axis=-1),
        helper.make_node("Constant", [], ["two"], name="two", value_float=2.0),
        helper.make_node("Mul", ["probs", "two"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D]),
            helper.make_tensor_value_info("is_pad", TensorProto.BOOL, ["batch", D]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", D])],
        [weight, gamma, mask_fill],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_conversion_types_and_values():
    model = _graph()
    onnx.checker.check_model(model, full_check=True)
    half = convert_to_float16(model, keep_fp32={"keep_me"})
    onnx.checker.check_model(half, full_check=True)
    graph = half.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    by_name = {n.name: n for n in graph.node}
    assert types[by_name["matmul"].output[0]] == TensorProto.FLOAT16
    for name in ("norm", "keep_me", "softmax"):
        assert types[by_name[name].output[0]] == TensorProto.FLOAT, name
    initializers = {t.name: t for t in graph.initializer}
    assert initializers["weight"].data_type == TensorProto.FLOAT  # read by the pinned node
    assert initializers["weight_fp16"].data_type == TensorProto.FLOAT16  # read by the fp16 matmul
    assert initializers["gamma"].data_type == TensorProto.FLOAT  # read only by LayerNorm
    assert numpy_helper.to_array(initializers["mask_fill"]).item() == -FLOAT16_MAX  # clamped, not -inf
    assert [o.name for o in graph.output] == ["y"] and types["y"] == TensorProto.FLOAT

    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((5, D)).astype(np.float32), "is_pad": rng.random((5, D)) < 0.3}
    run = lambda m: onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]
    want, got = run(model), run(half)
    assert got.dtype == np.float32
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=5e-3)


def test_float16_array_clamps_range_and_keeps_tiny_values():
    values = np.array([1e-12, -1e-12, 0.0, 1e6, -np.inf, 3.0], np.float32)
    out = float16_array(values)
    assert out.dtype == np.float16
    assert out[0] > 0 and out[1] < 0 and out[2] == 0
    assert out[3] == FLOAT16_MAX and out[4] == -np.inf and out[5] == 3.0


def test_subgraphs_are_refused():
    then = helper.make_graph([], "then", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=then)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ValueError, match="subgraph"):
        convert_to_float16(helper.make_model(graph))
