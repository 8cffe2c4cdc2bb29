"""Parity with transformers' own pipelines, through the real path: a file on disk -> ``Runtime`` (the exported ONNX
bundle of a checkpoint built from pretrained towers) -> embedding, against transformers' processor -> the same
tower weights -> the checkpoint's projection -> L2 norm.

The towers are random-weight transformers models built from the real configs and saved with ``save_pretrained``
(no hub): an AST with the ``base`` preset's input geometry (128 mels x 1024 frames, strides 12/12, so 852 tokens),
a CLIP vision tower at 224 px, and a RoBERTa with a byte-level BPE tokenizer saved by ``RobertaTokenizer``
(``<s> ... </s>``, pad id 1). Widths are tiny (36) because the width does not touch preprocessing.

Tolerance: fp32 cosine >= 0.9999 for every item (what a user can trust); measured worst cosines are printed
(``pytest -s``) and quoted in docs/verification.md. Audio at 22.05, 44.1 and 8 kHz: ``ASTFeatureExtractor`` takes 16 kHz
only, so the reference resamples with the same soxr HQ call the runtime uses; the comparison covers everything
after the resampler (soxr itself is checked against ideal band-limited tones in tests/runtime/test_audio.py).
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import soundfile
import soxr
import torch
import torch.nn.functional as F
from PIL import Image

pytestmark = pytest.mark.slow

MIN_COSINE = 0.9999
EMBED_DIM = 24
MAX_LENGTH = 24
CORPUS = ["a dog barking in the rain", "the sound of a piano", "a photo of a red car", "café naïve 東京 über"] * 20


def _roberta_tokenizer(folder):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: <s> 0, <pad> 1, </s> 2
    bpe.train_from_iterator(CORPUS, vocab_size=300, special_tokens=special, show_progress=False)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = RobertaTokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.save_pretrained(folder)
    return len(model["vocab"])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(folders, synergy model, bundle folder): pretrained towers saved locally, a checkpoint built from them
    and exported by ``synergy.export``."""
    from transformers import ASTConfig, ASTModel, CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaModel

    from synergy.core.checkpoint import save_checkpoint
    from synergy.core.model import create_model
    from synergy.core.tokenizer import load_pretrained_tokenizer
    from synergy.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("pretrained")
    folders = {m: root / m for m in ("image", "text", "audio")}
    torch.manual_seed(0)
    small = {"hidden_size": 36, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 37}
    vocab = _roberta_tokenizer(folders["text"])
    roberta = RobertaConfig(vocab_size=vocab, max_position_embeddings=MAX_LENGTH + 2, pad_token_id=1, **small)
    RobertaModel(roberta, add_pooling_layer=False).save_pretrained(folders["text"])
    ast = ASTConfig(num_mel_bins=128, max_length=1024, frequency_stride=12, time_stride=12, **small)
    ASTModel(ast).save_pretrained(folders["audio"])
    CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=32, **small)).save_pretrained(folders["image"])

    overrides = {f"{m}.pretrained": str(folder) for m, folder in folders.items()}
    model = create_model("base", embed_dim=EMBED_DIM, **overrides, **{"text.max_length": MAX_LENGTH}).eval()
    tokenizer = load_pretrained_tokenizer(folders["text"], MAX_LENGTH, model.text_tower.config.pad_token_id)
    save_checkpoint(root / "checkpoint", model, tokenizer)
    export_bundle(root / "checkpoint", root / "bundle")
    return folders, model, root / "bundle"


@pytest.fixture(scope="module")
def runtime(pretrained):
    from synergy.runtime import Runtime

    # fp32 parity is onnxruntime's: "auto" may pick OpenVINO bf16 for this bundle (its export's check passed)
    rt = Runtime.open(pretrained[2], backend="onnxruntime", threads=2, batch_size=4)  # batches of 4 mix lengths
    yield rt
    rt.close()


def _compare(got: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, float]:
    """-> (cosine per item, in float64 so that 1 - cosine resolves below float32's 6e-8; max abs difference)."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    cosines = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    return cosines, float(np.abs(got - want).max())


def _report(name: str, compared: tuple[np.ndarray, float], cases: list[str]) -> None:
    cosines, max_abs = compared
    worst = int(np.argmin(cosines))
    print(
        f"\nparity {name}: worst 1 - cosine {1 - cosines[worst]:.1e} ({cases[worst]}), "
        f"max abs difference {max_abs:.1e}, over {len(cases)} inputs"
    )
    assert cosines.min() >= MIN_COSINE, dict(zip(cases, cosines.round(6).tolist()))


def _sound(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A chirp-like tone over noise with an envelope: energy in quiet and loud bins."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    tone = np.sin(2 * np.pi * (200 + 300 * seed) * t * (1 + 0.3 * t))
    wave = 0.3 * tone * np.exp(-t * rng.uniform(0.1, 2)) + 0.02 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


def _hf_audio(folders, model, waves_16k: list[np.ndarray]) -> np.ndarray:
    """transformers' pipeline: ASTFeatureExtractor -> the AST weights -> the checkpoint's projection -> L2 norm."""
    from transformers import ASTFeatureExtractor, ASTModel

    with warnings.catch_warnings():  # 128 kaldi bins over 257 FFT bins leave the lowest filter empty: expected
        warnings.simplefilter("ignore", UserWarning)
        extractor = ASTFeatureExtractor()  # AudioSet defaults: 16 kHz, 128 mels, 1024 frames, its mean and std
    tower = ASTModel.from_pretrained(folders["audio"]).eval()
    features = extractor(waves_16k, sampling_rate=16_000, return_tensors="pt")["input_values"]  # each alone
    with torch.no_grad():
        return F.normalize(model.audio_projection(tower(input_values=features).pooler_output), dim=-1).numpy()


AUDIO_CASES = [  # (seconds, sample rate): a fraction of a second up to exactly one clip, several rates
    (0.05, 16_000),
    (0.5, 16_000),
    (1.0, 16_000),
    (5.0, 16_000),
    (10.0, 16_000),
    (10.24, 16_000),
    (0.5, 44_100),
    (5.0, 22_050),
    (3.0, 8_000),
]


def test_audio_matches_ast_feature_extractor_pipeline(pretrained, runtime, tmp_path):
    folders, model, _ = pretrained
    paths, resampled = [], []
    for seed, (seconds, rate) in enumerate(AUDIO_CASES):
        wave = _sound(seconds, rate, seed)
        paths.append(tmp_path / f"{seconds}s_{rate}.wav")
        soundfile.write(paths[-1], wave, rate, subtype="FLOAT")
        resampled.append(wave if rate == 16_000 else soxr.resample(wave, rate, 16_000, quality="HQ"))
    got = runtime.embed_audio(paths)  # batches of 4 that mix 0.05 s .. 10.24 s clips
    want = _hf_audio(folders, model, resampled)
    _report("audio (AST, base geometry)", _compare(got, want), [f"{s} s at {r} Hz" for s, r in AUDIO_CASES])
    alone = np.concatenate([runtime.embed_audio([p]) for p in paths])
    np.testing.assert_allclose(alone, got, atol=1e-5)  # padding in a mixed batch changes nothing


def test_images_match_clip_image_processor_pipeline(pretrained, runtime, tmp_path):
    from transformers import CLIPVisionModel

    try:  # transformers >= 5.2x names the PIL-backed processor apart; CLIPImageProcessor needs torchvision there
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    folders, model, _ = pretrained
    cases = [(224, 224, "RGB"), (640, 480, "RGB"), (333, 999, "RGB"), (1000, 223, "RGB"), (97, 300, "RGBA")]
    cases += [(500, 301, "L"), (257, 256, "P"), (300, 200, "P+transparency"), (150, 400, "LA")]
    paths = []
    for seed, (width, height, mode) in enumerate(cases):
        paths.append(tmp_path / f"{seed}.png")
        _picture(width, height, mode, seed).save(paths[-1])
    got = runtime.embed_image(paths)
    processor, tower = Processor(), CLIPVisionModel.from_pretrained(folders["image"]).eval()
    pixels = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            pixels.append(processor(images=image, return_tensors="pt")["pixel_values"])
    with torch.no_grad():
        pooled = tower(pixel_values=torch.cat(pixels)).pooler_output
        want = F.normalize(model.image_projection(pooled), dim=-1).numpy()
    _report("image (CLIP vision, 224 px)", _compare(got, want), [f"{w}x{h} {m}" for w, h, m in cases])


def _picture(width: int, height: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    red, green = x * 255 // max(1, width - 1), y * 255 // max(1, height - 1)
    pixels = np.stack([red, green, rng.integers(0, 256, (height, width))], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":  # a real alpha gradient: transparency must be composited onto white, as transformers does
        image.putalpha(Image.fromarray(((x + y) % 256).astype(np.uint8)))
    elif mode.startswith("P"):
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        if mode == "P+transparency":
            image.info["transparency"] = 3  # palette index 3 is transparent
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def test_text_matches_roberta_tokenizer_pipeline(pretrained, runtime):
    from transformers import AutoTokenizer, RobertaModel

    folders, model, _ = pretrained
    texts = [
        "a dog barking in the rain",
        "café naïve 東京 über 🎵",  # non-ASCII through byte-level BPE
        " ".join(["the sound of a piano"] * 20),  # far longer than max_length: truncated, </s> kept
        "",
        "birds",
    ]
    got = runtime.embed_text(texts)
    tokenizer = AutoTokenizer.from_pretrained(folders["text"])
    tower = RobertaModel.from_pretrained(folders["text"], add_pooling_layer=False).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    assert encoded["input_ids"][3].tolist()[:3] == [0, 2, 1]  # "" is <s> </s> <pad>...: RoBERTa's ids
    with torch.no_grad():
        first = tower(**encoded).last_hidden_state[:, 0]
        want = F.normalize(model.text_projection(first), dim=-1).numpy()
    _report("text (RoBERTa)", _compare(got, want), [text[:40] for text in texts])


def test_eval_and_infer_give_the_same_embedding_for_the_same_file(pretrained, runtime, tmp_path):
    """`synergy eval` (train.evaluate.embed_manifest, PyTorch) and `synergy infer` (the runtime, ONNX) on a short
    clip, exactly one clip, and long audio that the runtime cuts into overlapping windows."""
    from synergy.core.tokenizer import load_pretrained_tokenizer
    from synergy.train.evaluate import embed_manifest

    folders, model, _ = pretrained
    rows = ["img_path,wav_path,label,caption"]
    paths = []
    for seed, seconds in enumerate((0.7, 10.24, 23.0)):
        paths.append(tmp_path / f"{seconds}.wav")
        soundfile.write(paths[-1], _sound(seconds, 16_000, seed), 16_000, subtype="PCM_16")
        rows.append(f",{paths[-1].name},dog,")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    tokenizer = load_pretrained_tokenizer(folders["text"], MAX_LENGTH, 1)
    evaluated = embed_manifest(model, tokenizer, tmp_path / "data.csv", batch_size=2)["audio"].numpy()
    inferred = runtime.embed_audio(paths)
    _report("eval vs infer (0.7 s, one clip, 23 s windowed)", _compare(evaluated, inferred), ["0.7s", "1 clip", "23s"])


def test_exported_bundle_from_before_lengths_is_refused(pretrained, tmp_path):
    from synergy.runtime import BundleError, Runtime

    old = tmp_path / "old"
    shutil.copytree(pretrained[2], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="older than this runtime reads.*re-export"):
        Runtime.open(old)
