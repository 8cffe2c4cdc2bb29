"""GPU backends on the tiny bundle: native TensorRT engines built from its ONNX graphs, and onnxruntime's CUDA/TensorRT
execution providers. Both must give the CPU embeddings. They skip, with the reason, on machines without them."""

import dataclasses
import shutil

import numpy as np
import pytest

from synergy.runtime import Runtime
from synergy.runtime.manifest import load_manifest, sha256_file, write_manifest

from .conftest import SAMPLE_RATE, picture, tone

pytestmark = [pytest.mark.requires_cuda]


def _inputs():
    return {
        "audio": [(tone(0.2, freq=300), SAMPLE_RATE), (tone(1.3, freq=900), SAMPLE_RATE)],
        "image": [picture(40, 60, 1), picture(90, 37, 2), picture(37, 37, 3)],
        "text": ["a dog barking in the rain", "piano", ""],
    }


def _embed_all(runtime) -> dict:
    inputs = _inputs()
    return {
        "audio": runtime.embed_audio(inputs["audio"]),
        "image": runtime.embed_image(inputs["image"]),
        "text": runtime.embed_text(inputs["text"]),
    }


def _build_engines(bundle, max_batch: int = 8) -> None:
    """Build one ``<tower>.plan`` per ONNX graph (fp32, TF32 off, batch 1..max_batch) and list them in the
    manifest beside the ONNX files."""
    trt = pytest.importorskip("tensorrt", reason="needs the TensorRT Python package (pip install 'synergy[tensorrt]')")
    manifest = load_manifest(bundle)
    logger = trt.Logger(trt.Logger.WARNING)
    files = dict(manifest.files)
    for spec in manifest.towers.values():
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        assert parser.parse((bundle / spec.file).read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
        config = builder.create_builder_config()
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 math, so the comparison with the CPU stays tight
        profile = builder.create_optimization_profile()
        for tensor in spec.inputs:
            low = [1 if isinstance(d, str) else d for d in tensor.shape]
            high = [max_batch, *(16 if isinstance(d, str) else d for d in tensor.shape[1:])]
            profile.set_shape(tensor.name, low, high, high)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        assert plan is not None, "TensorRT could not build the engine"
        name = spec.file.replace(".onnx", ".plan")
        (bundle / name).write_bytes(bytes(plan))
        files[name] = sha256_file(bundle / name)
    write_manifest(bundle, dataclasses.replace(manifest, files=files))


@pytest.mark.tensorrt
def test_native_tensorrt_engines_match_cpu(bundle_copy, tiny_bundle):
    with Runtime.open(tiny_bundle[0], threads=1) as cpu:
        expected = _embed_all(cpu)
    _build_engines(bundle_copy)
    # batch_size above the engines' max batch: the backend splits batches to fit the profile
    with Runtime.open(bundle_copy, backend="tensorrt", device="cuda", batch_size=32) as gpu:
        got = _embed_all(gpu)
    for modality, vectors in expected.items():
        np.testing.assert_allclose(got[modality], vectors, atol=1e-4, err_msg=modality)


@pytest.mark.tensorrt
def test_engine_only_bundle_selects_tensorrt_automatically(bundle_copy):
    _build_engines(bundle_copy)
    manifest = load_manifest(bundle_copy)
    towers = {m: dataclasses.replace(t, file=t.file.replace(".onnx", ".plan")) for m, t in manifest.towers.items()}
    for spec in manifest.towers.values():
        (bundle_copy / spec.file).unlink()
    files = {k: v for k, v in manifest.files.items() if not k.endswith(".onnx")}
    write_manifest(bundle_copy, dataclasses.replace(manifest, towers=towers, files=files, backend="tensorrt"))
    with Runtime.open(bundle_copy, device="cuda") as runtime:
        assert runtime.backend == "tensorrt"
        assert runtime.embed_text(["dog"]).shape == (1, manifest.embed_dim)


def test_onnxruntime_gpu_providers_match_cpu(tiny_bundle, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    with Runtime.open(bundle, threads=1) as cpu:
        expected = _embed_all(cpu)
    with Runtime.open(bundle, device="cuda") as gpu:
        got = _embed_all(gpu)
        assert all(p[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider") for p in gpu.providers.values())
    for modality, vectors in expected.items():
        np.testing.assert_allclose(got[modality], vectors, atol=2e-3, err_msg=modality)  # TF32 convolutions on GPU
