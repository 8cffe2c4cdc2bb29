"""TensorRT engines. The build itself needs TensorRT and an NVIDIA GPU (tests marked ``tensorrt``, skipped here
with the reason); the profile and engine-key logic is plain Python and runs everywhere."""

from __future__ import annotations

import pytest

from synergy.export import ExportError, export_bundle
from synergy.export.bundle import resolved_int8_method
from synergy.export.tensorrt_engines import INSTALL_HINT, BatchProfile, engine_key, input_profiles
from synergy.runtime.bundle import load_manifest
from synergy.runtime.manifest import TensorSpec


def _tensorrt_and_gpu() -> str | None:
    """None when engines can be built here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"TensorRT is not installed: {INSTALL_HINT}"
    import torch

    if not torch.cuda.is_available():
        return "TensorRT engines need an NVIDIA GPU; none is visible to torch"
    return None


def test_input_profiles():
    text = (
        TensorSpec("input_ids", "int64", ("batch", "length")),
        TensorSpec("attention_mask", "int64", ("batch", "length")),
    )
    profiles = input_profiles(text, BatchProfile(2, 8, 32), max_length=13, clip_samples=8000)
    assert profiles["input_ids"] == ((2, 1), (8, 13), (32, 13)) == profiles["attention_mask"]
    image = (TensorSpec("pixel_values", "float32", ("batch", 3, 30, 30)),)
    assert input_profiles(image, BatchProfile(), 13, 8000)["pixel_values"] == (
        (1, 3, 30, 30),
        (8, 3, 30, 30),
        (64, 3, 30, 30),
    )
    audio = (
        TensorSpec("waveform", "float32", ("batch", "samples")),
        TensorSpec("waveform_lengths", "int64", ("batch",)),
    )
    profiles = input_profiles(audio, BatchProfile(), 13, 8000)
    assert profiles["waveform"][1] == (8, 8000)
    assert profiles["waveform_lengths"] == ((1,), (8,), (64,))  # the real lengths travel with every batch


def test_engine_key_covers_every_input():
    profiles = {"waveform": ((1, 8000), (8, 8000), (64, 8000))}
    base = engine_key("abc", "10.13.0", "9.0", "fp16", profiles)
    assert base == engine_key("abc", "10.13.0", "9.0", "fp16", dict(profiles))
    changed = [
        engine_key("abd", "10.13.0", "9.0", "fp16", profiles),
        engine_key("abc", "11.0.0", "9.0", "fp16", profiles),
        engine_key("abc", "10.13.0", "8.9", "fp16", profiles),
        engine_key("abc", "10.13.0", "9.0", "fp32", profiles),
        engine_key("abc", "10.13.0", "9.0", "fp16", {"waveform": ((1, 8000), (8, 8000), (32, 8000))}),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_batch_profile_is_checked():
    with pytest.raises(ExportError, match="min <= opt <= max"):
        BatchProfile(4, 2, 8)


def test_engines_take_static_int8_unless_told_otherwise():
    """TensorRT builds int8 only from QDQ graphs, so an int8 engine export without --quantize is static, whatever
    the graphs' size; fp32 / fp16 have none (a dynamic int8 engine export is refused before any work: test_bundle's
    argument checks; the ONNX bundles' default: test_quantize)."""
    assert resolved_int8_method("int8", engines=True, int8_method=None) == "static"
    assert resolved_int8_method("int8", engines=False, int8_method="static") == "static"
    assert resolved_int8_method("fp16", engines=True, int8_method=None) is None


@pytest.mark.tensorrt
@pytest.mark.skipif(_tensorrt_and_gpu() is not None, reason=str(_tensorrt_and_gpu()))
def test_trt_int8_bundle_builds_from_the_qdq_graph(checkpoint, tmp_path):
    """int8 engines: the static QDQ graph (calibrated on the verification rows) built strongly typed, verified at
    int8's gate (agreement lowered as for the tiny checkpoint's onnxruntime static bundle, test_quantize); the text
    tower stays fp32 as in every static bundle."""
    import onnx

    out = tmp_path / "trt-int8"
    report = export_bundle(checkpoint, out, fmt="trt", precision="int8", batch=BatchProfile(1, 4, 32),
                           min_agreement=0.9)  # fmt: skip
    assert "TensorRT" in report and "passed" in report
    manifest = load_manifest(out)
    engines = manifest.extra["tensorrt"]
    assert manifest.extra["int8"]["method"] == "static"
    for modality in ("image", "audio"):
        assert engines[modality]["precision"] == "int8" and engines[modality]["strongly_typed"]
        ops = {node.op_type for node in onnx.load(out / f"{modality}.onnx", load_external_data=False).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert engines["text"]["precision"] == "fp32"


@pytest.mark.tensorrt
@pytest.mark.skipif(_tensorrt_and_gpu() is not None, reason=str(_tensorrt_and_gpu()))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_bundle_builds_and_verifies(checkpoint, tmp_path, precision):
    out = tmp_path / "trt"
    report = export_bundle(checkpoint, out, fmt="trt", precision=precision, batch=BatchProfile(1, 4, 32))
    assert "TensorRT" in report and "passed" in report
    manifest = load_manifest(out)
    assert manifest.backend == "tensorrt"
    for modality, tower in manifest.towers.items():
        assert tower.file == f"{modality}.plan" and f"{modality}.onnx" in manifest.files
        assert len(manifest.extra["tensorrt"][modality]["engine_key"]) == 64
    # same graph, TensorRT, GPU, precision and profiles: the second export takes the cached engines
    export_bundle(checkpoint, out, fmt="trt", precision=precision, batch=BatchProfile(1, 4, 32), force=True)
    assert all(info["from_cache"] for info in load_manifest(out).extra["tensorrt"].values())
