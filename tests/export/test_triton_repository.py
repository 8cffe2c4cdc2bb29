"""The Triton model repository: every config.pbtxt parses into tritonclient's ModelConfig protobuf and agrees with
its ONNX graph (names, dims, dtypes), in the plain and in the external-data (directory) layout."""

from __future__ import annotations

import onnx
import pytest
from google.protobuf import text_format

from synergy.export.tensorrt_engines import BatchProfile
from synergy.export.triton_repository import model_config
from synergy.runtime.bundle import load_manifest
from synergy.runtime.manifest import TensorSpec

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]")

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}


def _parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("name", ["triton", "triton_external_fp16"])
def test_configs_parse_and_match_the_graphs(exports, name):
    repository, _ = exports[name]
    manifest = load_manifest(repository)
    assert manifest.extra["triton"]["platform"] == "onnxruntime"
    models = sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))
    assert models == ["synergy_audio", "synergy_image", "synergy_text"]
    for modality, tower in manifest.towers.items():
        folder = repository / f"synergy_{modality}"
        config = _parse(folder / "config.pbtxt")
        assert config.name == folder.name
        assert config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 64
        assert list(config.dynamic_batching.preferred_batch_size) == [8]
        assert config.dynamic_batching.max_queue_delay_microseconds > 0
        assert len(config.instance_group) == 1 and config.instance_group[0].count == 1
        # Triton's default file name in version folder 1: a file, or a folder holding model.onnx + its weights
        model_path = folder / "1" / "model.onnx"
        if name == "triton_external_fp16":
            assert model_path.is_dir() and tower.file == "synergy_" + modality + "/1/model.onnx/model.onnx"
            assert (model_path / "model.onnx.data").is_file()
        else:
            assert model_path.is_file() and tower.file == f"synergy_{modality}/1/model.onnx"
        graph = onnx.load(repository / tower.file).graph
        for entries, values in ((config.input, graph.input), (config.output, graph.output)):
            assert [e.name for e in entries] == [v.name for v in values]
            for entry, value in zip(entries, values):
                dtype = model_config_pb2.DataType.Name(entry.data_type)
                assert dtype == ONNX_TO_TRITON[value.type.tensor_type.elem_type]
                dims = [d.dim_value if d.dim_value else -1 for d in value.type.tensor_type.shape.dim]
                assert dims[0] == -1  # batch: Triton's, left out of dims
                if len(dims) == 1:  # a [batch] input (waveform_lengths): Triton's [batch, 1], reshaped to [batch]
                    assert list(entry.dims) == [1] and entry.HasField("reshape") and list(entry.reshape.shape) == []
                else:
                    assert list(entry.dims) == dims[1:]


def test_tensorrt_platform_config():
    spec = (TensorSpec("pixel_values", "float32", ("batch", 3, 30, 30)),)
    out = (TensorSpec("embedding", "float32", ("batch", 24)),)
    text = model_config("image", "tensorrt", spec, out, BatchProfile(1, 4, 16))
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(config.input[0].dims) == [3, 30, 30]
    with pytest.raises(ValueError, match="platform"):
        model_config("image", "pytorch", spec, out, BatchProfile())
