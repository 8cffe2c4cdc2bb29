"""The onnxruntime TensorRT EP's engine cache is keyed by the graph's weights, not its names: two bundles of one
preset never share an engine (the EP hashes a graph's structure and names, so a shared folder ran one bundle's
engine for the other on ``--device cuda``, past every sha256 check). Built on CPU: the options are pure."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from synergy.runtime.bundle import load_manifest
from synergy.runtime.onnxruntime_backend import trt_cache_dir
from synergy.runtime.towers import Towers, tensorrt_ep_options

from .test_hostile_bundles import _external_weights


def _cache_paths(bundle: Path, modality: str = "audio") -> tuple[str, str]:
    towers = Towers(bundle, load_manifest(bundle), "onnxruntime", "cpu", 1, 8, trusted=False)
    options = tensorrt_ep_options(towers.source(modality))
    return options["trt_engine_cache_path"], options["trt_timing_cache_path"]


def _relist(bundle: Path, *names: str) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in names:
        manifest["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_bundles_with_different_weights_get_different_engine_caches(bundle_copy, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    other = tmp_path / "other"
    shutil.copytree(bundle_copy, other)
    model = onnx.load(other / "audio.onnx")
    initializer = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    weights = numpy_helper.to_array(initializer) * 1.5  # same graph, same names, other weights
    initializer.CopyFrom(numpy_helper.from_array(weights, initializer.name))
    onnx.save_model(model, other / "audio.onnx")
    _relist(other, "audio.onnx")

    engines, timing = _cache_paths(bundle_copy)
    assert engines == timing == str(trt_cache_dir(load_manifest(bundle_copy).files["audio.onnx"]))
    assert Path(engines).parent == trt_cache_dir()
    assert _cache_paths(other)[0] != engines
    assert _cache_paths(bundle_copy, "image")[0] not in (engines, _cache_paths(other)[0])  # one folder per graph
    copy = tmp_path / "copy"  # the same bytes elsewhere: the same engines, built once
    shutil.copytree(bundle_copy, copy)
    assert _cache_paths(copy) == (engines, timing)


def test_external_weights_are_part_of_the_key(bundle_copy, tmp_path):
    """Two bundles whose graph files are identical byte for byte and whose external weights differ."""
    _external_weights(bundle_copy, list_data=True)
    other = tmp_path / "other"
    shutil.copytree(bundle_copy, other)
    with open(other / "audio.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\1\2\3\4")
    _relist(other, "audio.onnx.data")
    assert (other / "audio.onnx").read_bytes() == (bundle_copy / "audio.onnx").read_bytes()
    assert _cache_paths(other)[0] != _cache_paths(bundle_copy)[0]
