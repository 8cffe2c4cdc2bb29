"""Runtime on a real exported bundle: embeddings equal the torch towers', batching, windows, classify, search,
per-item errors, and bundle checks."""

import dataclasses
import json

import numpy as np
import pytest
import soundfile
import torch

from synergy.runtime import (
    BackendError,
    BundleError,
    InferUsageError,
    Runtime,
    UnsupportedAudio,
    UnsupportedImage,
    UnsupportedText,
)
from synergy.runtime.audio import audio_windows
from synergy.runtime.bundle import load_manifest, sha256_file, write_manifest
from synergy.runtime.image import load_image, preprocess_image
from synergy.runtime.text import tokenize

from .conftest import (
    CLIP_SECONDS,
    EMBED_DIM,
    IMAGE_SIZE,
    LABELS,
    LOGIT_SCALES,
    MEAN,
    SAMPLE_RATE,
    STD,
    TEMPLATES,
    picture,
    tone,
)

CLIP = round(CLIP_SECONDS * SAMPLE_RATE)
ATOL = 1e-5  # ONNX Runtime vs torch eager, fp32


def _torch(tower, *arrays) -> np.ndarray:
    with torch.no_grad():
        return tower(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)).numpy()


def test_image_embeddings_equal_torch(runtime, tiny_bundle, tmp_path):
    towers = tiny_bundle[1]["towers"]
    sizes = [(37, 37), (70, 45), (45, 129), (20, 31), (129, 36), (50, 50), (41, 99)]  # 7 images, batch_size 4
    paths = []
    for i, (w, h) in enumerate(sizes):
        paths.append(tmp_path / f"{i}.png")
        picture(w, h, seed=i).save(paths[-1])
    got = runtime.embed_image(paths)
    pixels = np.stack([preprocess_image(load_image(p), IMAGE_SIZE, MEAN, STD) for p in paths])
    assert got.shape == (7, EMBED_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, _torch(towers["image"], pixels), atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_text_embeddings_equal_torch_and_ignore_padding(runtime, tiny_bundle):
    towers, tokenizer = tiny_bundle[1]["towers"], tiny_bundle[1]["tokenizer"]
    texts = ["dog", "a dog barking in the rain " * 4, "an old piano", "", "the sound of a small bird", "cat", "rain"]
    got = runtime.embed_text(texts)
    ids, mask = tokenize(runtime._text_tokenizer(), texts)
    assert ids.shape[1] == 13  # truncated to max_length, special tokens included
    assert tokenizer.encode(texts[0]).ids == list(ids[0][: mask[0].sum()])
    np.testing.assert_allclose(got, _torch(towers["text"], ids, mask), atol=ATOL)
    alone = np.concatenate([runtime.embed_text([t]) for t in texts])  # each padded only to its own length
    np.testing.assert_allclose(alone, got, atol=1e-6)


def test_audio_embeddings_equal_torch_for_short_and_long_audio(runtime, tiny_bundle):
    audio_tower = tiny_bundle[1]["towers"]["audio"]
    short, long = tone(0.2, freq=300), tone(1.7, freq=500)
    got = runtime.embed_audio([(short, SAMPLE_RATE), (long, SAMPLE_RATE)])
    padded = np.pad(short, (0, CLIP - short.size))[None]
    np.testing.assert_allclose(got[0], _torch(audio_tower, padded, np.array([short.size]))[0], atol=ATOL)
    windows, lengths = audio_windows(long, CLIP, 0.5)
    assert windows.shape[0] == 6  # starts 0, 2000, ..., 8000 and a tail window at 9600
    pooled = _torch(audio_tower, windows, lengths).mean(axis=0)
    np.testing.assert_allclose(got[1], pooled / np.linalg.norm(pooled), atol=ATOL)


def test_audio_sources_agree(runtime, tmp_path):
    wave = tone(0.3, rate=16_000)
    path = tmp_path / "a.flac"
    soundfile.write(path, wave, 16_000, subtype="PCM_24")
    from_path, from_bytes, from_array = runtime.embed_audio(
        [path, path.read_bytes(), (soundfile.read(path, dtype="float32")[0], 16_000)]
    )
    np.testing.assert_array_equal(from_path, from_bytes)
    np.testing.assert_array_equal(from_path, from_array)
    single = runtime.embed_audio(str(path))  # one item is accepted as is
    np.testing.assert_array_equal(single[0], from_path)


def test_embed_batch_keeps_going_past_bad_items(runtime, tmp_path):
    good = [(tone(0.2, freq=f), SAMPLE_RATE) for f in (200, 400, 800)]
    items = [good[0], b"not audio", good[1], tmp_path / "missing.wav", good[2]]
    result = runtime.embed_batch("audio", items)
    assert result.ok.tolist() == [True, False, True, False, True]
    assert isinstance(result.errors[1], UnsupportedAudio) and "<audio bytes #1" in str(result.errors[1])
    assert "missing.wav: no such file" in str(result.errors[3])
    np.testing.assert_allclose(result.vectors[result.ok], runtime.embed_audio(good), atol=1e-6)
    assert np.isnan(result.vectors[~result.ok]).all()
    with pytest.raises(UnsupportedAudio, match=r"missing.wav"):
        runtime.embed_audio([good[0], tmp_path / "missing.wav"])
    with pytest.raises(UnsupportedImage, match=r"not a recognised image"):
        runtime.embed_image([b"nope"])
    with pytest.raises(UnsupportedText, match=r"expected a string"):
        runtime.embed_text(["ok", 5])
    with pytest.raises(InferUsageError, match=r"\(waveform, sample_rate\)"):
        runtime.embed_audio(np.zeros(100, np.float32))


def test_label_embeddings_are_cached_prompt_ensembles(runtime):
    expected = []
    for label in LABELS[:3]:
        prompts = runtime.embed_text([t.format(label) for t in TEMPLATES]).mean(axis=0)
        expected.append(prompts / np.linalg.norm(prompts))
    got = runtime.label_embeddings(list(LABELS[:3]))
    np.testing.assert_allclose(got, np.stack(expected), atol=1e-6)
    assert set(LABELS[:3]) <= set(runtime._labels)
    again = runtime.label_embeddings([" dog ", "cat"])  # cleaned, then served from the cache
    np.testing.assert_array_equal(again, got[:2])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_classify_probabilities_use_the_pair_scale(runtime, tmp_path):
    labels = list(LABELS)
    table = runtime.label_embeddings(labels)
    wave = (tone(0.4, freq=700), SAMPLE_RATE)
    image = picture(60, 40, seed=5)
    audio_vec, image_vec = runtime.embed_audio([wave])[0], runtime.embed_image([image])[0]
    fused = audio_vec + image_vec
    fused /= np.linalg.norm(fused)
    cases = [
        ({"audio": [wave]}, audio_vec, LOGIT_SCALES["text_audio"]),
        ({"image": [image]}, image_vec, LOGIT_SCALES["image_text"]),
        ({"audio": [wave], "image": [image]}, fused, (LOGIT_SCALES["text_audio"] + LOGIT_SCALES["image_text"]) / 2),
    ]
    for inputs, vector, scale in cases:
        (prediction,) = runtime.classify(labels, top_k=4, **inputs)
        probabilities = _softmax(scale * (table @ vector))
        order = np.argsort(-probabilities)[:4]
        assert prediction.ok and [s.label for s in prediction.top] == [labels[i] for i in order]
        np.testing.assert_allclose([s.probability for s in prediction.top], probabilities[order], atol=1e-5)
        np.testing.assert_allclose([s.similarity for s in prediction.top], (table @ vector)[order], atol=1e-5)
    (full,) = runtime.classify(labels, image=image, top_k=100)
    assert len(full.top) == len(labels) and abs(sum(s.probability for s in full.top) - 1) < 1e-5


def test_rank_labels_scores_each_item_with_its_own_scale_and_never_answers_nan(runtime):
    """The one scoring path of classify, classify_video and the server: per-item logit scales, an item's own error
    kept, a NaN row an error blamed on the item's first modality."""
    labels = list(LABELS)
    table = runtime.label_embeddings(labels)
    wave, image = (tone(0.4, freq=700), SAMPLE_RATE), picture(60, 40, seed=5)
    vectors = np.stack([runtime.embed_audio([wave])[0], runtime.embed_image([image])[0]])
    fused = np.concatenate([vectors, np.full((2, EMBED_DIM), np.nan, np.float32)])  # [4, D]
    failed = UnsupportedImage("x.png", "cannot identify image file")
    modalities = [["audio"], ["image"], ["image"], ["audio", "image"]]
    errors = [None, None, failed, None]
    predictions = runtime.rank_labels(labels, table, fused, modalities, ["a", "b", "c", "d"], errors, top_k=3)
    scales = (LOGIT_SCALES["text_audio"], LOGIT_SCALES["image_text"])
    for prediction, vector, scale in zip(predictions, vectors, scales):
        probabilities = _softmax(scale * (table @ vector))
        order = np.argsort(-probabilities)[:3]
        assert prediction.ok and [s.label for s in prediction.top] == [labels[i] for i in order]
        np.testing.assert_allclose([s.probability for s in prediction.top], probabilities[order], atol=1e-5)
    assert predictions[2].error is failed
    error = predictions[3].error
    assert isinstance(error, UnsupportedAudio) and error.source == "d" and "non-finite probabilities" in str(error)
    (alone,) = runtime.classify(labels, audio=[wave], top_k=3)
    assert [s.label for s in alone.top] == [s.label for s in predictions[0].top]  # classify is this arithmetic
    np.testing.assert_allclose([s.probability for s in alone.top], [s.probability for s in predictions[0].top], 1e-5)


def test_classify_text_finds_its_own_label(runtime):
    predictions = runtime.classify(list(LABELS), text=list(LABELS), top_k=1)
    assert [p.top[0].label for p in predictions] == list(LABELS)


def test_classify_fused_item_fails_alone_and_counts_must_pair(runtime, tmp_path):
    waves = [(tone(0.2, freq=f), SAMPLE_RATE) for f in (200, 300, 400)]
    images = [picture(40, 40, 1), b"broken", picture(50, 40, 2)]
    predictions = runtime.classify(list(LABELS), audio=waves, image=images, top_k=2)
    assert [p.ok for p in predictions] == [True, False, True]
    assert predictions[1].source == "<waveform #1> + <image bytes #1, 6 B>"
    assert isinstance(predictions[1].error, UnsupportedImage)
    with pytest.raises(InferUsageError, match=r"pair one to one"):
        runtime.classify(list(LABELS), audio=waves, image=images[:2])
    with pytest.raises(InferUsageError, match=r"needs audio=, image= or text="):
        runtime.classify(list(LABELS))


def test_search_matches_brute_force(runtime):
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((70, EMBED_DIM)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[[3, 41]] + 0.01 * rng.standard_normal((2, EMBED_DIM)).astype(np.float32)
    hits = runtime.search(queries, corpus, top_k=5)
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ corpus.T
    for row, query_hits in zip(scores, hits):
        assert [h.index for h in query_hits] == np.argsort(-row)[:5].tolist()
        np.testing.assert_allclose([h.score for h in query_hits], np.sort(row)[::-1][:5], atol=1e-5)
    assert hits[0][0].index == 3 and hits[1][0].index == 41
    from synergy.runtime.search import cosine_top_k

    blocked_index, _ = cosine_top_k(queries / np.linalg.norm(queries, axis=1, keepdims=True), corpus, 5, 8)
    assert blocked_index.tolist() == [[h.index for h in q] for q in hits]
    text_hits = runtime.search(["dog", "piano"], runtime.embed_text(list(LABELS)), top_k=100)
    assert [h[0].index for h in text_hits] == [0, 5] and len(text_hits[0]) == len(LABELS)


def test_bundle_with_a_changed_file(bundle_copy):
    """A graph is hashed when its tower loads, on the bytes that load (`synergy infer` and `serve` load right after
    open); the tokenizer and files this backend never loads are hashed by open itself."""
    with open(bundle_copy / "audio.onnx", "ab") as f:
        f.write(b"\0")
    runtime = Runtime.open(bundle_copy, threads=1)
    assert runtime.embed_text(["dog"]).shape == (1, EMBED_DIM)  # the unchanged towers run
    with pytest.raises(BundleError, match=r"audio.onnx has changed since export \(sha256 mismatch\); re-export"):
        runtime.load()
    Runtime.open(bundle_copy, verify=False)  # an explicit opt-out
    (bundle_copy / "notes.txt").write_text("read by no tower")
    manifest = load_manifest(bundle_copy, verify=False)
    write_manifest(bundle_copy, dataclasses.replace(manifest, files={**manifest.files, "notes.txt": "0" * 64}))
    with pytest.raises(BundleError, match=r"notes.txt has changed since export"):
        Runtime.open(bundle_copy)  # a listed file no tower loads is hashed at open
    write_manifest(bundle_copy, manifest)
    with open(bundle_copy / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match=r"tokenizer.json has changed since export"):
        Runtime.open(bundle_copy)  # open loads the tokenizer


def test_bundle_with_a_missing_file(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer.json is missing"):
        Runtime.open(bundle_copy)


def test_bundle_from_a_newer_format(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] += 1
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"newer than this runtime reads.*upgrade synergy"):
        Runtime.open(bundle_copy)


def test_a_version_2_bundle_reads_as_clips_image_preprocessing(bundle_copy, tmp_path):
    """Version 2 wrote the image's size, mean and std only (every such bundle was CLIP-preprocessed): it still opens
    and embeds as it did; a version-3 bundle spells the same preprocessing out."""
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    image = manifest["image"]
    assert (image["resize"], image["resize_size"], image["resample"]) == ("shortest_edge", image["size"], "bicubic")
    picture(45, 70, seed=3).save(tmp_path / "x.png")
    with Runtime.open(bundle_copy) as runtime:
        want = runtime.embed_image([tmp_path / "x.png"])
    manifest["format_version"] = 2
    manifest["image"] = {key: image[key] for key in ("size", "mean", "std")}
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with Runtime.open(bundle_copy) as runtime:
        assert runtime.manifest.image.resize == "shortest_edge" and runtime.manifest.image.resize_size == image["size"]
        np.testing.assert_array_equal(runtime.embed_image([tmp_path / "x.png"]), want)


def test_bundle_from_an_older_format_is_refused_with_the_reexport_command(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 1  # its audio graph took a waveform only: short clips padded as samples
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        BundleError, match=r"format version 1 is older.*wrong embeddings.*synergy export --checkpoint CHECKPOINT"
    ):
        Runtime.open(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"not a folder"):
        Runtime.open(tmp_path / "nothing")
    with pytest.raises(BundleError, match=r"no manifest.json"):
        Runtime.open(tmp_path)


def test_bundle_without_a_tower(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["towers"]["image"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    runtime = Runtime.open(bundle_copy)
    assert runtime.embed_audio([(tone(0.1), SAMPLE_RATE)]).shape == (1, EMBED_DIM)
    with pytest.raises(BundleError, match=r"no image tower"):
        runtime.embed_image([picture(40, 40)])


def test_backend_and_device_errors(tiny_bundle):
    folder = tiny_bundle[0]
    with pytest.raises(BackendError, match=r"not one of"):
        Runtime.open(folder, backend="tflite")
    with pytest.raises(BackendError, match=r"not one of"):
        Runtime.open(folder, device="tpu")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendError, match=r"onnxruntime-gpu"):
            Runtime.open(folder, device="cuda")
    with pytest.raises(BackendError, match=r"device='cuda' only"):
        Runtime.open(folder, backend="tensorrt")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match=r"pip install 'synergy-clip\[tensorrt\]'"):
            Runtime.open(folder, backend="tensorrt", device="cuda")


def test_loaded_towers_and_providers(tiny_bundle):
    with Runtime.open(tiny_bundle[0], threads=1) as runtime:
        assert runtime.providers == {}  # towers load on first use
        runtime.load("audio")
        assert runtime.providers == {"audio": ["CPUExecutionProvider"]}


def _engine_bundle(bundle, keep_onnx: bool) -> None:
    """Turn the copy into a TensorRT-format bundle: towers point at ``*.plan`` (placeholder bytes: nothing on CPU
    loads them), with or without their ONNX sources listed beside them."""
    manifest = load_manifest(bundle)
    towers, files = {}, dict(manifest.files)
    for modality, spec in manifest.towers.items():
        plan = spec.file.replace(".onnx", ".plan")
        (bundle / plan).write_bytes(b"not a real engine")
        files[plan] = sha256_file(bundle / plan)
        if not keep_onnx:
            files.pop(spec.file)
        towers[modality] = dataclasses.replace(spec, file=plan)
    write_manifest(bundle, dataclasses.replace(manifest, towers=towers, files=files, backend="tensorrt"))


def test_engine_bundle_runs_its_onnx_sources_on_cpu(bundle_copy, runtime):
    _engine_bundle(bundle_copy, keep_onnx=True)
    wave = [(tone(0.2), SAMPLE_RATE)]
    for backend in ("auto", "onnxruntime"):
        with Runtime.open(bundle_copy, backend=backend, threads=1) as engines:
            assert engines.backend == "onnxruntime"
            np.testing.assert_array_equal(engines.embed_audio(wave), runtime.embed_audio(wave))


def test_engine_only_bundle_on_cpu_says_what_to_do(bundle_copy):
    _engine_bundle(bundle_copy, keep_onnx=False)
    with pytest.raises(BundleError, match=r"no ONNX graph for the \w+ tower .*backend='tensorrt', device='cuda'"):
        Runtime.open(bundle_copy)


def test_tensorrt_ep_profile_carries_the_audio_lengths():
    from synergy.runtime.manifest import TensorSpec, TowerSpec
    from synergy.runtime.onnxruntime_backend import tensorrt_profile

    inputs = (
        TensorSpec("waveform", "float32", ("batch", "samples")),
        TensorSpec("waveform_lengths", "int64", ("batch",)),
    )
    spec = TowerSpec("audio.onnx", inputs, (TensorSpec("embedding", "float32", ("batch", 8)),))
    profile = tensorrt_profile(spec, 8, 16_000)
    assert profile["trt_profile_min_shapes"] == "waveform:1x1,waveform_lengths:1"
    assert profile["trt_profile_max_shapes"] == "waveform:8x16000,waveform_lengths:8"
