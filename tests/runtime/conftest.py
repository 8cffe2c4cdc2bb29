"""A small real bundle for the runtime tests, built once per session.

Three tiny torch towers that follow the graph contract (pixel_values / input_ids + attention_mask / waveform +
waveform_lengths ->
L2-normalised ``embedding``), exported with ``torch.onnx.export(dynamo=True)`` with dynamic batch (and length),
a word-level ``tokenizers`` tokenizer with a template post-processor and padding, and a manifest written by
``runtime.bundle.write_manifest`` with every file's sha256. Sizes are odd on purpose (D=21, S=37, L=13).
Tests may import torch; the runtime package may not.
"""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from synergy.runtime.bundle import sha256_file, write_manifest
from synergy.runtime.manifest import (
    AudioPreprocessing,
    ImagePreprocessing,
    Manifest,
    TensorSpec,
    TextPreprocessing,
    TowerSpec,
)

EMBED_DIM = 21
IMAGE_SIZE = 37
SAMPLE_RATE = 8000
CLIP_SECONDS = 0.5
MAX_LENGTH = 13
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TEMPLATES = ("a photo of a {}.", "the sound of a {}.", "{}")
LOGIT_SCALES = {"image_text": 50.0, "text_audio": 30.0, "audio_image": 40.0}
LABELS = ("dog", "cat", "car engine", "rain", "bird song", "piano")
CORPUS = [*LABELS, "a photo of a", "the sound of a", "a dog barking in the rain", "an old piano", "a small bird"]


class TinyImageTower(torch.nn.Module):
    """pixel_values [B, 3, S, S] -> embedding [B, D]."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 17, kernel_size=6, stride=6)
        self.proj = torch.nn.Linear(17, EMBED_DIM, bias=False)

    def forward(self, pixel_values):
        features = self.patch(pixel_values).relu().mean(dim=(2, 3))  # [B, 17]
        return torch.nn.functional.normalize(self.proj(features), dim=-1)


class TinyTextTower(torch.nn.Module):
    """input_ids, attention_mask [B, L] -> embedding [B, D]: masked mean of token embeddings."""

    def __init__(self, vocab: int):
        super().__init__()
        # a Parameter indexed directly, not nn.Embedding: torch.onnx (2.13, dynamo) names the Gather's output
        # "embedding", which collides with the renamed graph output "embedding" (an invalid model)
        self.tokens = torch.nn.Parameter(torch.randn(vocab, 19))
        self.proj = torch.nn.Linear(19, EMBED_DIM, bias=False)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(torch.float32)  # [B, L, 1]
        pooled = (self.tokens[input_ids] * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, 19]
        return torch.nn.functional.normalize(self.proj(pooled), dim=-1)


class TinyAudioTower(torch.nn.Module):
    """waveform [B, T], waveform_lengths [B] -> embedding [B, D]: a strided Conv1d "front end", log-magnitude,
    mean over the frames that lie inside each row's real samples."""

    def __init__(self):
        super().__init__()
        self.frames = torch.nn.Conv1d(1, 23, kernel_size=64, stride=32)
        self.proj = torch.nn.Linear(23, EMBED_DIM, bias=False)

    def forward(self, waveform, waveform_lengths):
        frames = torch.log1p(self.frames(waveform.unsqueeze(1)).abs())  # [B, 23, F]
        ends = torch.arange(frames.shape[-1], device=waveform.device) * 32 + 64  # [F]
        real = (ends[None] <= waveform_lengths[:, None]).to(frames.dtype)[:, None]  # [B, 1, F]
        pooled = (frames * real).sum(-1) / real.sum(-1).clamp(min=1.0)  # [B, 23]
        return torch.nn.functional.normalize(self.proj(pooled), dim=-1)


def build_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("<pad>"), pad_token="<pad>")
    return tokenizer


def _export(module, args: tuple, path: Path, names: list[str], dynamic: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=names,
            output_names=["embedding"],
            dynamic_shapes=dynamic,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))


def build_bundle(folder: Path, seed: int = 0) -> dict:
    """Write a bundle into ``folder``; returns the torch towers and the tokenizer for comparisons. Another ``seed``
    gives other weights (the same shapes and tokenizer): a second model."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    towers = {
        "image": TinyImageTower().eval(),
        "text": TinyTextTower(tokenizer.get_vocab_size()).eval(),
        "audio": TinyAudioTower().eval(),
    }
    batch, length = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("length", min=1, max=4096)
    clip = round(CLIP_SECONDS * SAMPLE_RATE)
    with torch.no_grad():
        _export(
            towers["image"],
            (torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE),),
            folder / "image.onnx",
            ["pixel_values"],
            {"pixel_values": {0: batch}},
        )
        ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 5))
        _export(
            towers["text"],
            (ids, torch.ones_like(ids)),
            folder / "text.onnx",
            ["input_ids", "attention_mask"],
            {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
        )
        _export(
            towers["audio"],
            (torch.randn(2, clip), torch.tensor([clip, clip // 2])),
            folder / "audio.onnx",
            ["waveform", "waveform_lengths"],
            {"waveform": {0: batch}, "waveform_lengths": {0: batch}},
        )
    output = (TensorSpec("embedding", "float32", ("batch", EMBED_DIM)),)
    manifest = Manifest(
        embed_dim=EMBED_DIM,
        logit_scales=dict(LOGIT_SCALES),
        towers={
            "image": TowerSpec(
                "image.onnx", (TensorSpec("pixel_values", "float32", ("batch", 3, IMAGE_SIZE, IMAGE_SIZE)),), output
            ),
            "text": TowerSpec(
                "text.onnx",
                (
                    TensorSpec("input_ids", "int64", ("batch", "length")),
                    TensorSpec("attention_mask", "int64", ("batch", "length")),
                ),
                output,
            ),
            "audio": TowerSpec(
                "audio.onnx",
                (
                    TensorSpec("waveform", "float32", ("batch", clip)),
                    TensorSpec("waveform_lengths", "int64", ("batch",)),
                ),
                output,
            ),
        },
        image=ImagePreprocessing(IMAGE_SIZE, MEAN, STD),
        audio=AudioPreprocessing(SAMPLE_RATE, CLIP_SECONDS),
        text=TextPreprocessing(MAX_LENGTH, TEMPLATES),
        files={p.name: sha256_file(p) for p in sorted(folder.iterdir())},
        versions={"torch": torch.__version__},
    )
    write_manifest(folder, manifest)
    return {"towers": towers, "tokenizer": tokenizer}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """(bundle folder, {"towers": torch modules, "tokenizer": Tokenizer}). Read-only: copy it to change it."""
    folder = tmp_path_factory.mktemp("bundle") / "tiny"
    reference = build_bundle(folder)
    return folder, reference


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], target)
    return target


@pytest.fixture(scope="session")
def runtime(tiny_bundle):
    from synergy.runtime import Runtime

    rt = Runtime.open(tiny_bundle[0], threads=1, batch_size=4)
    yield rt
    rt.close()


def tone(seconds: float, rate: int = SAMPLE_RATE, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """A sine (plus a little deterministic noise), [T] or [T, C] float32."""
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(round(freq)).standard_normal(t.size)
    wave = wave.astype(np.float32)
    return wave if channels == 1 else np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1)


def audio_bytes(wave: np.ndarray, rate: int = SAMPLE_RATE, format: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format=format, subtype=subtype)
    return buffer.getvalue()


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    noise = rng.integers(0, 60, (height, width, 3))
    return Image.fromarray(np.clip(gradient * (seed % 3 + 1) / 3 + noise, 0, 255).astype(np.uint8))
