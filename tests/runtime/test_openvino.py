"""The OpenVINO backend on the tiny bundle: the same embeddings as onnxruntime (f32 to float rounding, bf16 close),
the checks it makes when it loads, and the CLI's backend choices, which spell out the registry."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import pytest

from synergy.runtime import Runtime
from synergy.runtime.errors import BackendError
from synergy.runtime.towers import BACKEND_CHOICES, BACKENDS

from .conftest import LABELS, SAMPLE_RATE, picture, tone

# OpenVINO brings its own threading and allocator libraries: its tests run in a child pytest, away from torch and
# the rest of the suite (tests/conftest.py; a full CI run segfaulted after these tests ran in-process)
pytestmark = pytest.mark.isolated

if importlib.util.find_spec("openvino") is None:  # found, not imported: this module is collected in the parent too
    pytest.skip("the openvino extra is not installed: pip install '.[openvino]'", allow_module_level=True)


def _inputs():
    audio = [(tone(seconds, freq=freq), SAMPLE_RATE) for seconds, freq in ((0.5, 440.0), (0.2, 880.0), (1.3, 300.0))]
    images = [picture(40 + 7 * seed, 37 + 3 * seed, seed) for seed in range(3)]
    texts = ["a dog barking in the rain", "piano", "the sound of a small bird"]
    return audio, images, texts


def _embeddings(bundle, backend: str) -> dict[str, np.ndarray]:
    audio, images, texts = _inputs()
    with Runtime.open(bundle, backend=backend, threads=1, batch_size=2) as runtime:
        return {
            "audio": runtime.embed_audio(audio),
            "image": runtime.embed_image(images),
            "text": runtime.embed_text(texts),
        }


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    return _embeddings(tiny_bundle[0], "onnxruntime")


@pytest.mark.parametrize(("backend", "least_cosine"), [("openvino", 0.9999), ("openvino-bf16", 0.999)])
def test_openvino_matches_onnxruntime(tiny_bundle, reference, backend, least_cosine):
    got = _embeddings(tiny_bundle[0], backend)
    for modality, want in reference.items():
        assert got[modality].shape == want.shape and got[modality].dtype == np.float32
        cosine = _min_cosine(got[modality], want)
        print(f"{backend} {modality}: min cosine {cosine:.7f}")  # the bf16 number the report quotes (pytest -s)
        assert cosine >= least_cosine, (modality, cosine)
    if backend == "openvino":
        for modality, want in reference.items():
            np.testing.assert_allclose(got[modality], want, atol=1e-5)


def test_zero_shot_answers_agree(tiny_bundle):
    audio, _, _ = _inputs()
    answers = {}
    for backend in ("onnxruntime", "openvino"):
        with Runtime.open(tiny_bundle[0], backend=backend, threads=1) as runtime:
            answers[backend] = [p.top[0].label for p in runtime.classify(list(LABELS), audio=audio, top_k=1)]
    assert answers["openvino"] == answers["onnxruntime"]


def test_openvino_names_what_it_runs_and_refuses_cuda(tiny_bundle):
    with Runtime.open(tiny_bundle[0], backend="openvino-bf16", threads=1) as runtime:
        runtime.embed_text(["dog"])
        assert runtime.backend == "openvino-bf16"
        (names,) = runtime.providers.values()
        assert names[0].startswith("OpenVINO ") and names[0].endswith("CPU (bf16)")
    with pytest.raises(BackendError, match="device='cpu'"):
        BACKENDS["openvino"].check("cuda")


def test_a_graph_with_external_weights_is_refused_with_what_to_do(tiny_bundle):
    from synergy.runtime.manifest import TowerSpec
    from synergy.runtime.openvino_backend import OpenVINOTower

    graph = (tiny_bundle[0] / "text.onnx").read_bytes()
    spec = TowerSpec("text.onnx", (), ())
    with pytest.raises(BackendError, match="re-export without --external-data"):
        OpenVINOTower(tiny_bundle[0] / "text.onnx", spec, graph, {"text.onnx.data": b"x"}, 1, "f32")


def test_cli_backend_choices_are_the_registry():
    from synergy.cli.options import BACKEND_CHOICES as CLI_CHOICES

    assert CLI_CHOICES == BACKEND_CHOICES


# ------------------------------------------------------------------------------- what "auto" picks on the CPU


def _with(manifest, precision: str = "fp32", **extra):
    return replace(manifest, precision=precision, extra=extra)


STATIC_INT8 = {"int8": {"method": "static"}}


@pytest.mark.parametrize(
    ("precision", "extra", "engine"),
    [
        ("fp32", {}, "onnxruntime"),  # no record: the precision its export verified, on onnxruntime
        ("fp32", {"openvino_bf16": {"passed": True}}, "openvino-bf16"),
        ("fp32", {"openvino_bf16": {"passed": False}}, "onnxruntime"),
        ("fp32", {"openvino_bf16": {"passed": "yes"}}, "onnxruntime"),  # only a JSON true passes
        ("int8", STATIC_INT8, "openvino-bf16"),  # no record (an earlier export): static int8 as before
        ("int8", {**STATIC_INT8, "openvino_bf16": {"passed": False}}, "onnxruntime"),  # the record wins
        ("int8", {"int8": {"method": "dynamic"}}, "onnxruntime"),
        ("int8", {"int8": {"method": "dynamic"}, "openvino_bf16": {"passed": True}}, "openvino-bf16"),
    ],
)
def test_auto_follows_the_export_s_openvino_record(tiny_bundle, precision, extra, engine):
    from synergy.runtime.bundle import load_manifest
    from synergy.runtime.towers import choose_backend

    manifest = _with(load_manifest(tiny_bundle[0]), precision, **extra)
    assert choose_backend("auto", "cpu", manifest) == engine


def test_auto_keeps_onnxruntime_for_graphs_openvino_does_not_read(tiny_bundle):
    from dataclasses import replace

    from synergy.runtime.bundle import load_manifest
    from synergy.runtime.towers import choose_backend

    manifest = _with(load_manifest(tiny_bundle[0]), openvino_bf16={"passed": True})
    side_file = replace(manifest, files={**manifest.files, "audio.onnx.data": "0" * 64})  # external weights
    assert choose_backend("auto", "cpu", side_file) == "onnxruntime"


def test_auto_leaves_small_bundles_on_onnxruntime(tiny_bundle):
    """OpenVINO's start-up outweighs a small tower in a one-shot call (the demo bundle: 0.8 s on OpenVINO against 0.5 s
    on onnxruntime for its 320 val clips), so a passed record moves only bundles of OPENVINO_MIN_GRAPH_BYTES or more."""
    from synergy.runtime.bundle import load_manifest
    from synergy.runtime.towers import OPENVINO_MIN_GRAPH_BYTES, choose_backend, graph_bytes

    manifest = _with(load_manifest(tiny_bundle[0]), openvino_bf16={"passed": True})
    size = graph_bytes(tiny_bundle[0], manifest)
    assert 0 < size < OPENVINO_MIN_GRAPH_BYTES
    assert size == sum((tiny_bundle[0] / t.file).stat().st_size for t in manifest.towers.values())
    assert choose_backend("auto", "cpu", manifest, size) == "onnxruntime"
    assert choose_backend("auto", "cpu", manifest, OPENVINO_MIN_GRAPH_BYTES) == "openvino-bf16"
    assert choose_backend("openvino-bf16", "cpu", manifest, size) == "openvino-bf16"  # asked for: no floor
    # an int8 tower's file weighs the fp32 graph it was quantized from: four times its bytes (fp16: twice)
    towers = {
        m: replace(t, precision={"audio": "int8", "image": "fp16"}.get(m, "fp32")) for m, t in manifest.towers.items()
    }
    mixed = replace(manifest, towers=towers)
    files = {m: (tiny_bundle[0] / t.file).stat().st_size for m, t in manifest.towers.items()}
    assert graph_bytes(tiny_bundle[0], mixed) == 4 * files["audio"] + 2 * files["image"] + files["text"]
