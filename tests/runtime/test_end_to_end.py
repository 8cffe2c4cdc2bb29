"""End to end: a tiny-preset checkpoint exported by `synergy.export` and run by the runtime. Embeddings equal the
PyTorch model's within the export tolerance (max abs error 1e-4), zero-shot probabilities equal training's
evaluation path, long audio is the mean of its windows, and `synergy infer` runs on the bundle.

The export costs most of this file's time (torch.export of three towers + the exporter's own verification)."""

import shutil

import numpy as np
import pytest
import soundfile
import torch

from synergy.cli.infer import InferInputs, InferOptions, run
from synergy.runtime import Runtime
from synergy.runtime.audio import audio_windows
from synergy.runtime.image import load_image, preprocess_image
from synergy.runtime.text import tokenize

from .conftest import picture, tone

pytestmark = pytest.mark.slow
EXPORT_ATOL = 1e-4  # the exporter's fp32 gate: onnxruntime vs PyTorch, max abs error
LABELS = ["red square", "blue circle", "dog", "rain", "piano"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(bundle folder, torch model, checkpoint tokenizer) for the tiny preset with fixed random weights."""
    from synergy.core.checkpoint import save_checkpoint
    from synergy.core.model import create_model
    from synergy.core.tokenizer import train_tokenizer
    from synergy.export import export_bundle

    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    words = "a photo of the sound red blue green square circle dog rain piano barking".split()  # noqa: SIM905
    tokenizer = train_tokenizer([" ".join(words), *words, *LABELS], vocab_size=131, max_length=13)
    save_checkpoint(root / "checkpoint", model, tokenizer)
    export_bundle(root / "checkpoint", root / "bundle", fmt="onnx", precision="fp32")
    return root / "bundle", model, tokenizer


@pytest.fixture(scope="module")
def e2e_runtime(exported):
    # fp32 parity is onnxruntime's: "auto" may pick OpenVINO bf16 for this bundle (its export's check passed)
    with Runtime.open(exported[0], backend="onnxruntime", threads=2, batch_size=8) as runtime:
        yield runtime


def _torch(fn, *arrays) -> np.ndarray:
    with torch.no_grad():
        return fn(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)).numpy()


def test_image_embeddings_equal_pytorch(exported, e2e_runtime, tmp_path):
    _, model, _ = exported
    image = e2e_runtime.manifest.image
    paths = []
    for i, (w, h) in enumerate([(30, 30), (64, 41), (29, 77), (100, 31), (45, 45)]):
        paths.append(tmp_path / f"{i}.png")
        picture(w, h, seed=i).save(paths[-1])
    pixels = np.stack([preprocess_image(load_image(p), image.size, image.mean, image.std) for p in paths])
    np.testing.assert_allclose(e2e_runtime.embed_image(paths), _torch(model.encode_image, pixels), atol=EXPORT_ATOL)


def test_text_embeddings_equal_pytorch(exported, e2e_runtime):
    _, model, tokenizer = exported
    texts = ["a photo of a dog", "red square", "", "the sound of rain " * 5, "piano", "blue", "unknown words here"]
    ids, mask = tokenize(e2e_runtime._text_tokenizer(), texts)
    reference = tokenizer.encode_batch(texts)  # the checkpoint's tokenizer, as training used it
    assert ids.tolist() == [e.ids for e in reference] and mask.tolist() == [e.attention_mask for e in reference]
    np.testing.assert_allclose(e2e_runtime.embed_text(texts), _torch(model.encode_text, ids, mask), atol=EXPORT_ATOL)


def test_audio_embeddings_equal_pytorch_short_and_windowed(exported, e2e_runtime, tmp_path):
    _, model, _ = exported
    rate = e2e_runtime.manifest.audio.sample_rate
    clip = round(e2e_runtime.manifest.audio.clip_seconds * rate)
    short, long = tone(0.3, rate=rate, freq=330), tone(1.37, rate=rate, freq=880)
    path = tmp_path / "long.wav"
    soundfile.write(path, long, rate, subtype="FLOAT")
    got = e2e_runtime.embed_audio([(short, rate), path])
    alone = _torch(model.encode_audio, short[None])[0]  # the short clip alone, unpadded
    np.testing.assert_allclose(got[0], alone, atol=EXPORT_ATOL)
    windows, lengths = audio_windows(long, clip, 0.5)
    assert windows.shape[0] == 5
    pooled = _torch(model.encode_audio, windows, lengths).mean(axis=0)
    np.testing.assert_allclose(got[1], pooled / np.linalg.norm(pooled), atol=EXPORT_ATOL)


def test_zero_shot_equals_the_evaluation_path(exported, e2e_runtime):
    from synergy.train.evaluate import label_embeddings

    _, model, tokenizer = exported
    rate = e2e_runtime.manifest.audio.sample_rate
    waves = [(tone(0.5, rate=rate, freq=f), rate) for f in (200, 450, 1200)]
    images = [picture(30, 30, seed=s) for s in (3, 4, 5)]
    predictions = e2e_runtime.classify(LABELS, audio=waves, image=images, top_k=len(LABELS))
    table = label_embeddings(model, tokenizer, LABELS).numpy()  # [K, D], training's prompt ensemble
    np.testing.assert_allclose(e2e_runtime.label_embeddings(LABELS), table, atol=EXPORT_ATOL)
    audio = e2e_runtime.embed_audio(waves)
    image = e2e_runtime.embed_image(images)
    fused = audio + image
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)  # evaluate.py: normalize(image + audio)
    scales = model.logit_scales().detach().numpy()  # (image-text, text-audio, audio-image)
    logits = (scales[0] + scales[1]) / 2 * fused @ table.T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    for prediction, row in zip(predictions, expected):
        got = {s.label: s.probability for s in prediction.top}
        np.testing.assert_allclose([got[label] for label in LABELS], row, atol=1e-4)


def test_infer_command_on_the_bundle_and_a_moved_copy(exported, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(exported[0], moved)  # relocatable: nothing in the bundle points back to where it was written
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS), encoding="utf-8")
    soundfile.write(tmp_path / "a.wav", tone(0.8, rate=44_100), 44_100)  # resampled to the model's rate
    picture(50, 40).save(tmp_path / "a.png")
    inputs = InferInputs([str(tmp_path / "a.wav")], [str(tmp_path / "a.png")])
    code = run(inputs, InferOptions(str(labels), bundle=str(moved), top_k=2, fuse=True))
    out = capsys.readouterr().out
    assert code == 0 and "a.png" in out.splitlines()[1]  # one fused row: "<...>/a.wav + <...>/a.png"
