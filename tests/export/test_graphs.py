"""Graph files: external weights must stay inside the bundle, and the checks name what is wrong."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from synergy.export.graphs import check_graph, external_data_files, save_graph
from synergy.runtime.manifest import TensorSpec

INPUTS = (TensorSpec("x", "float32", ("batch", 300)),)
OUTPUTS = (TensorSpec("embedding", "float32", ("batch", 300)),)


def _model(op: str = "Add") -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones(300, np.float32), "w")  # 1.2 KB: above save_graph's 1 KB threshold
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w"], ["embedding"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 300])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 300])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_external_data_stays_beside_the_graph(tmp_path):
    files = save_graph(_model(), tmp_path / "tower.onnx", external_data=True)
    assert [f.name for f in files] == ["tower.onnx", "tower.onnx.data"]
    assert external_data_files(tmp_path / "tower.onnx", tmp_path) == [(tmp_path / "tower.onnx.data").resolve()]
    check_graph(tmp_path / "tower.onnx", tmp_path, INPUTS, OUTPUTS)


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "missing.bin"])
def test_external_data_outside_the_bundle_is_refused(tmp_path, location):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    save_graph(_model(), bundle / "tower.onnx", external_data=True)
    (tmp_path / "outside.bin").write_bytes((bundle / "tower.onnx.data").read_bytes())
    model = onnx.load(bundle / "tower.onnx", load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, bundle / "tower.onnx")
    with pytest.raises(ValueError, match="outside the bundle|missing"):
        check_graph(bundle / "tower.onnx", bundle, INPUTS, OUTPUTS)


def test_io_contract_is_checked(tmp_path):
    save_graph(_model(), tmp_path / "tower.onnx")
    wrong = (TensorSpec("pixel_values", "float32", ("batch", 300)),)
    with pytest.raises(ValueError, match="graph inputs"):
        check_graph(tmp_path / "tower.onnx", tmp_path, wrong, OUTPUTS)


def test_stft_and_dft_are_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("DFT", ["x"], ["embedding"], onesided=0)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 2])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 16, 2])],
    )
    save_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "audio.onnx")
    specs = (TensorSpec("x", "float32", ("batch", 16, 2)),), (TensorSpec("embedding", "float32", ("batch", 16, 2)),)
    with pytest.raises(ValueError, match=r"\['DFT'\]"):
        check_graph(tmp_path / "audio.onnx", tmp_path, *specs)
