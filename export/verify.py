"""Verification of exported towers against PyTorch, run before an export reports success.

Per tower: every item of a fixed evaluation set goes through the exported graph (or engine) in batches of 1, 3
and 17 (so the dynamic batch dim is exercised), text at two or more lengths, audio in batches that mix clips of
different real lengths (a third of the built-in sounds are shorter than a clip) and at three tensor lengths
(shorter than a clip: padded frames; longer: cropped), and through the PyTorch model in float32. Measured: the largest
absolute error and the smallest cosine between the two embeddings of an item. Across towers: zero-shot top-1
agreement, i.e. how often the exported model picks the same label as PyTorch for an image or a sound, the labels
being embedded from the prompt templates by each side's own text tower. The text tower also embeds free text, whose
cosines count with the prompts': built-in sentences and, with a CSV, its captions.

Thresholds (from the export issues): fp32 max abs error <= 1e-4 and cosine >= 0.9999; fp16 cosine >= 0.999 and
top-1 agreement >= 99%; int8 cosine >= 0.99 and top-1 agreement >= 99% (the accuracy gate of a lossy precision: an
int8 bundle below it is refused with its numbers). ``synergy export --min-cosine / --min-agreement`` override the
precision's defaults; the manifest records the thresholds applied and what was measured. Agreement is gated on
the *decided* queries: those whose PyTorch top-1 label beats the runner-up by >= 1e-3 in cosine. A query PyTorch
itself decides by less is a tie at float rounding level, and which side of it fp16 lands on says nothing about the
export (an untrained model maps every prompt to almost the same vector: margins of 1e-6..1e-4, so a perfect fp16
graph "disagrees" on a few percent). The raw agreement over all queries is reported beside it; with fewer than 16
decided queries the gate cannot be applied, and the report says so.

The evaluation set is a built-in one: seeded pictures (smooth colour fields with a shape) and sounds (harmonic tones
with an envelope, over noise) and a fixed list of labels; with a Synergy-CLIP CSV (``img_path, wav_path, label,
caption``; e.g. the synthetic val split, decoded the way the runtime decodes) its rows join the built-in items and
its labels replace the built-in ones (:func:`combine_evaluation_sets`).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from synergy.core.model import SynergyModel
from synergy.runtime.prompts import fill_prompt

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]  # feeds -> embeddings [B, D]

BATCH_SIZES = (1, 3, 17)
DECIDED_MARGIN = 1e-3  # cosine gap between PyTorch's top-1 and runner-up label for a query to count as decided
MIN_DECIDED_QUERIES = 16
BUILTIN_LABELS = (
    "dog",
    "cat",
    "bird song",
    "car engine",
    "red circle",
    "blue square",
    "green star",
    "yellow cross",
    "piano",
    "rain",
    "siren",
    "speech",
)

# Free text for the text tower's check, beside the label prompts: a tower can embed short prompts well and sentences
# badly (all-MiniLM-L6-v2 in dynamic int8: min cosine 0.9905 on the prompts, 0.979 on real sentences;
# benchmarks/README.md), and a bundle embeds captions and queries, not only labels. Varied length and vocabulary.
BUILTIN_SENTENCES = (
    "A dog barks twice at the mail carrier, then runs back to the porch.",
    "Rain drums on a tin roof while thunder rolls somewhere far to the east.",
    "The violinist tunes her instrument before the quartet begins the second movement.",
    "Traffic noise",
    "Children laughing on a playground during the afternoon break",
    "An old diesel engine struggles to start on a cold winter morning, coughing smoke.",
    "Waves crash against the rocks below the lighthouse as gulls circle overhead.",
    "Somebody is typing quickly on a mechanical keyboard in a quiet office.",
    "A red square and a blue circle on a white background.",
    "The recipe calls for two cups of flour, three eggs, a pinch of salt and warm milk.",
    "Fireworks explode over the harbour and the crowd cheers after every burst of colour.",
    "A church bell rings noon across the valley, echoing off the hills.",
    "How do I reset my password if I no longer have access to the recovery email?",
    "Footsteps on gravel, a door creaks open, and a cat meows once.",
    "Electric guitar solo with heavy distortion and a fast drum beat underneath it.",
    "The committee postponed the vote until the budget figures had been independently audited.",
    "Birdsong at dawn in a pine forest, with a woodpecker knocking in the distance.",
    "A jet airliner takes off, its engines roaring, and slowly fades into the clouds.",
    "Photograph of a yellow taxi parked in front of a brick building at night.",
    "Crickets chirp in tall grass on a warm summer evening.",
    "She whispered the answer so quietly that nobody in the back row could hear it.",
    "A blender crushes ice, then stops; a spoon clinks against a glass.",
    "Snow falling silently on an empty street lit by orange lamps.",
    "Applause",
)


@dataclass(frozen=True)
class Thresholds:
    max_abs_error: float | None
    min_cosine: float
    min_agreement: float | None


THRESHOLDS = {
    "fp32": Thresholds(1e-4, 0.9999, None),
    "fp16": Thresholds(None, 0.999, 0.99),
    "int8": Thresholds(None, 0.99, 0.99),
}


def gate_thresholds(precision: str, min_cosine: float | None = None, min_agreement: float | None = None) -> Thresholds:
    """The precision's thresholds with the caller's min cosine / min top-1 agreement in place of the defaults."""
    limits = THRESHOLDS[precision]
    return replace(
        limits,
        min_cosine=limits.min_cosine if min_cosine is None else min_cosine,
        min_agreement=limits.min_agreement if min_agreement is None else min_agreement,
    )


@dataclass(frozen=True)
class EvaluationSet:
    images: np.ndarray  # [N, 3, S, S] float32, normalised
    waveforms: np.ndarray  # [M, T] float32 at the model's sample rate, T = one clip, rows zero-padded
    labels: tuple[str, ...]
    source: str
    waveform_lengths: np.ndarray  # [M] int64 real samples per row
    texts: tuple[str, ...] = ()  # free text (captions) checked through the text tower besides the label prompts


@dataclass(frozen=True)
class TowerCheck:
    max_abs_error: float
    min_cosine: float
    mean_cosine: float
    items: int
    batch_sizes: tuple[int, ...]
    lengths: tuple[int, ...] = ()  # text: token lengths; audio: samples; image: none


@dataclass
class Verification:
    target: str  # what ran the exported towers, e.g. "onnxruntime CPUExecutionProvider, fp16 graph"
    precision: str
    towers: dict[str, TowerCheck]
    agreement: float  # over all queries
    queries: int
    decided_agreement: float  # over the queries PyTorch decides by >= DECIDED_MARGIN (nan when there are none)
    decided_queries: int
    labels: int
    evaluation_set: str
    thresholds: Thresholds | None = None  # None: the precision's defaults (THRESHOLDS)

    def __post_init__(self):
        if self.thresholds is None:
            self.thresholds = THRESHOLDS[self.precision]

    def failures(self) -> list[str]:
        limits = self.thresholds
        failed = [problem for name, check in self.towers.items() for problem in self._tower_failures(name, check)]
        gated = limits.min_agreement is not None and self.agreement_gated
        if gated and not self.decided_agreement >= limits.min_agreement:
            failed.append(
                f"zero-shot top-1 agreement {self.decided_agreement:.2%} < {limits.min_agreement:.0%} "
                f"on the {self.decided_queries} decided queries"
            )
        return failed

    def failed_towers(self) -> list[str]:
        """The towers that missed their own thresholds (max abs error, min cosine)."""
        return [name for name, check in self.towers.items() if self._tower_failures(name, check)]

    def _tower_failures(self, name: str, check: TowerCheck) -> list[str]:
        limits, failed = self.thresholds, []
        if limits.max_abs_error is not None and not check.max_abs_error <= limits.max_abs_error:
            failed.append(f"{name}: max abs error {check.max_abs_error:.3g} > {limits.max_abs_error:g}")
        if not check.min_cosine >= limits.min_cosine:
            failed.append(f"{name}: min cosine {check.min_cosine:.6f} < {limits.min_cosine}")
        return failed

    @property
    def agreement_gated(self) -> bool:
        return self.decided_queries >= MIN_DECIDED_QUERIES

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "precision": self.precision,
            "passed": not self.failures(),
            "thresholds": asdict(self.thresholds),
            "towers": {k: asdict(v) for k, v in self.towers.items()},
            "min_cosine": min(v.min_cosine for v in self.towers.values()),
            "zero_shot_top1_agreement": self.agreement,
            "zero_shot_queries": self.queries,
            "zero_shot_top1_agreement_decided": None if self.decided_queries == 0 else self.decided_agreement,
            "zero_shot_decided_queries": self.decided_queries,
            "zero_shot_decided_margin": DECIDED_MARGIN,
            "zero_shot_gate_applied": self.agreement_gated,
            "zero_shot_labels": self.labels,
            "evaluation_set": self.evaluation_set,
        }

    def format(self) -> str:
        lines = [
            f"verification vs PyTorch fp32: {self.target}",
            "  tower  max|err|   min cos    mean cos   batches    lengths",
        ]
        for name, c in self.towers.items():
            lengths = ",".join(map(str, c.lengths)) or "-"
            batches = ",".join(map(str, c.batch_sizes))
            lines.append(
                f"  {name:<6} {c.max_abs_error:<10.3g} {c.min_cosine:<10.7f} {c.mean_cosine:<10.7f} "
                f"{batches:<10} {lengths}"
            )
        lines.append(
            f"  zero-shot top-1 agreement {self.agreement:.2%} of {self.queries} images+sounds, {self.labels} labels "
            f"({self.evaluation_set})"
        )
        if self.agreement_gated:
            lines.append(
                f"  on the {self.decided_queries} queries PyTorch decides by >= {DECIDED_MARGIN:g}: "
                f"{self.decided_agreement:.2%}"
            )
        else:
            lines.append(
                f"  agreement not gated: PyTorch decides only {self.decided_queries} queries by >= {DECIDED_MARGIN:g} "
                f"(< {MIN_DECIDED_QUERIES}); an untrained checkpoint? pass a real evaluation set with --data"
            )
        failed = self.failures()
        lines.append("  FAILED: " + "; ".join(failed) if failed else "  passed")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- evaluation sets


def builtin_evaluation_set(
    image_size: int, mean, std, sample_rate: int, clip_samples: int, count: int = 64, seed: int = 0
) -> EvaluationSet:
    """``count`` seeded pictures and sounds, the same for every export of the same model shape."""
    rng = np.random.default_rng(seed)
    s = image_size
    # pictures: a smooth random colour field (4x4 grid, bilinear) with a filled disc or square of another colour
    grid = rng.random((count, 3, 4, 4)).astype(np.float32)
    position = np.linspace(0, 3, s, dtype=np.float32)
    i0 = np.minimum(position.astype(int), 2)
    frac = position - i0
    rows = grid[:, :, i0, :] * (1 - frac)[None, None, :, None] + grid[:, :, i0 + 1, :] * frac[None, None, :, None]
    field_ = rows[..., i0] * (1 - frac) + rows[..., i0 + 1] * frac  # [count, 3, s, s]
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
    images = np.empty_like(field_)
    for n in range(count):
        cy, cx, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.12, 0.3)
        if n % 2:
            inside = (np.abs(y - cy) < radius) & (np.abs(x - cx) < radius)
        else:
            inside = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
        colour = rng.random(3).astype(np.float32)
        picture = np.where(inside[None], colour[:, None, None], field_[n])
        picture = np.clip(picture + rng.normal(0, 0.03, picture.shape), 0, 1).astype(np.float32)
        images[n] = (picture - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    # sounds: a tone with 1-4 harmonics and an attack/decay envelope at a random onset, over white noise
    t = np.arange(clip_samples, dtype=np.float64) / sample_rate
    waveforms = np.empty((count, clip_samples), np.float32)
    lengths = np.full(count, clip_samples, np.int64)
    for n in range(count):
        f0 = rng.uniform(110, min(2000, sample_rate / 8))
        tone = sum(rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) for k in range(1, 5))
        onset = rng.uniform(0, 0.4) * t[-1]
        envelope = np.clip((t - onset) * 40, 0, 1) * np.exp(-np.clip(t - onset, 0, None) * rng.uniform(1, 8))
        wave = rng.uniform(0.05, 0.5) * tone / 4 * envelope + rng.normal(0, rng.uniform(0.001, 0.02), t.shape)
        if n % 3 == 2:  # a third are short clips, so batches mix real lengths (padding must not move them)
            lengths[n] = max(clip_samples // 10, round(rng.uniform(0.1, 0.9) * clip_samples))
            wave[lengths[n] :] = 0.0
        waveforms[n] = wave.astype(np.float32)
    source = (
        f"built-in set: {count} pictures, {count} sounds ({int((lengths < clip_samples).sum())} short), seed {seed}"
    )
    return EvaluationSet(images.astype(np.float32), waveforms, BUILTIN_LABELS, source, lengths, BUILTIN_SENTENCES)


def read_evaluation_set(
    csv_path: str | Path,
    image_size: int,
    mean,
    std,
    sample_rate: int,
    clip_samples: int,
    limit: int = 128,
    image_preprocessing=None,
) -> EvaluationSet:
    """Up to ``limit`` pictures and sounds of a Synergy-CLIP CSV, decoded as the runtime decodes them (images as
    ``image_preprocessing`` says: the model's ``ImagePreprocessing``; None: CLIP's at ``image_size``, ``mean``,
    ``std``); labels are the CSV's distinct labels. Raises ``ValueError`` naming what is wrong with the file."""
    from synergy.runtime.audio import cut_window, load_audio, window_spans
    from synergy.runtime.errors import InputError
    from synergy.runtime.image import load_image, preprocess_with
    from synergy.runtime.manifest import ImagePreprocessing

    image_preprocessing = image_preprocessing or ImagePreprocessing(image_size, tuple(mean), tuple(std))

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"evaluation data {csv_path}: no such file (pass a CSV with img_path, wav_path, label)")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"img_path", "wav_path", "label"} <= set(rows[0]):
        raise ValueError(f"evaluation data {csv_path}: expected a CSV with columns img_path, wav_path, label")
    images, waveforms, lengths = [], [], []
    try:
        for row in rows:
            if row["img_path"] and len(images) < limit:
                picture = load_image(csv_path.parent / row["img_path"])
                images.append(preprocess_with(picture, image_preprocessing))
            if row["wav_path"] and len(waveforms) < limit:
                wave = load_audio(csv_path.parent / row["wav_path"], sample_rate)
                window, length = cut_window(wave, window_spans(wave.shape[0], clip_samples)[0], clip_samples)
                waveforms.append(window)
                lengths.append(length)
    except InputError as error:
        raise ValueError(f"evaluation data {csv_path}: {error}") from error
    labels = tuple(sorted({row["label"] for row in rows if row["label"]}))
    if not images or not waveforms or len(labels) < 2:
        raise ValueError(f"evaluation data {csv_path}: needs pictures, sounds and at least two labels")
    captions = tuple(dict.fromkeys(c.strip() for row in rows if (c := row.get("caption") or "").strip()))[:limit]
    source = f"{csv_path.name}: {len(images)} pictures, {len(waveforms)} sounds, {len(captions)} captions"
    images, waveforms = np.stack(images).astype(np.float32), np.stack(waveforms).astype(np.float32)
    return EvaluationSet(images, waveforms, labels, source, np.asarray(lengths, np.int64), captions)


def combine_evaluation_sets(builtin: EvaluationSet, data: EvaluationSet) -> EvaluationSet:
    """The built-in items followed by a CSV's rows, ranked against the CSV's labels (the labels the model was
    trained on): the gate sees both the fixed items every export shares and the user's own data."""
    return EvaluationSet(
        images=np.concatenate([builtin.images, data.images]),
        waveforms=np.concatenate([builtin.waveforms, data.waveforms]),
        labels=data.labels,
        source=f"{builtin.source}; {data.source}; labels of {data.source.split(':')[0]}",
        waveform_lengths=np.concatenate([builtin.waveform_lengths, data.waveform_lengths]),
        texts=builtin.texts + data.texts,
    )


# ------------------------------------------------------------------------------------------------ verification


def _batches(count: int) -> list[np.ndarray]:
    """Index batches of sizes 1, 3, 17, 17, ... covering items 0..count-1 in order (wrapping round when there are
    fewer than 21 items, so every batch size still runs)."""
    sizes, total = list(BATCH_SIZES), sum(BATCH_SIZES)
    while total < count:
        sizes.append(min(BATCH_SIZES[-1], count - total))
        total += sizes[-1]
    starts = np.cumsum([0, *sizes[:-1]])
    return [np.arange(start, start + size) % count for start, size in zip(starts, sizes)]


def text_feeds(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[dict[str, np.ndarray]]:
    """One text graph feed per text, unpadded (``input_ids`` and an all-ones ``attention_mask``, [1, tokens])."""
    return [
        {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        for ids in tokenize(tokenizer, texts, max_length)
    ]


def tokenize(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, unpadded, cut at ``max_length`` (the tokenizer's own padding and truncation off)."""
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_padding()
    plain.enable_truncation(max_length)
    return [e.ids for e in plain.encode_batch(texts)]


def _pad(sequences: list[list[int]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pad_id(tokenizer: Tokenizer) -> int:
    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"])
    pad = tokenizer.token_to_id("<pad>")
    return 0 if pad is None else pad


class _Comparison:
    """Accumulates per-item errors between the exported tower and PyTorch."""

    def __init__(self):
        self.max_abs, self.cosines, self.batch_sizes, self.lengths = 0.0, [], set(), set()

    def add(self, exported: np.ndarray, reference: np.ndarray, length: int | None = None) -> None:
        exported = np.asarray(exported, np.float64)
        reference = np.asarray(reference, np.float64)
        if exported.shape != reference.shape:
            raise ValueError(f"exported tower returned shape {exported.shape}, PyTorch {reference.shape}")
        self.max_abs = max(self.max_abs, float(np.abs(exported - reference).max()))
        norms = np.linalg.norm(exported, axis=1) * np.linalg.norm(reference, axis=1)
        self.cosines.extend((exported * reference).sum(axis=1) / np.maximum(norms, 1e-30))
        self.batch_sizes.add(exported.shape[0])
        if length is not None:
            self.lengths.add(length)

    def result(self) -> TowerCheck:
        cosines = np.asarray(self.cosines)
        return TowerCheck(
            max_abs_error=self.max_abs,
            min_cosine=float(np.nan_to_num(cosines, nan=-1.0).min()),
            mean_cosine=float(cosines.mean()),
            items=len(cosines),
            batch_sizes=tuple(sorted(self.batch_sizes)),
            lengths=tuple(sorted(self.lengths)),
        )


def _torch_embeddings(model: SynergyModel, modality: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    with torch.no_grad():
        if modality == "image":
            return model.encode_image(tensors["pixel_values"]).numpy()
        if modality == "text":
            return model.encode_text(tensors["input_ids"], tensors["attention_mask"]).numpy()
        return model.encode_audio(tensors["waveform"], tensors["waveform_lengths"]).numpy()


def verify_towers(
    model: SynergyModel,
    tokenizer: Tokenizer,
    runners: dict[str, Runner],
    evaluation: EvaluationSet,
    precision: str,
    target: str,
    audio_lengths: tuple[float, ...] = (0.6, 1.3),
    thresholds: Thresholds | None = None,
    references: dict | None = None,
) -> Verification:
    """Run ``evaluation`` through the exported towers (``runners``) and PyTorch; see the module docstring.

    ``audio_lengths``: extra waveform lengths, in clips, run through the audio tower besides one clip (none for
    TensorRT engines, whose profile holds one clip: the runtime cuts audio into clips). ``thresholds``: the gate
    (None: the precision's defaults). ``references``: a dict shared by the calls that verify several engines of one
    model on one evaluation set; PyTorch's embeddings are kept there by their feeds, so the second engine does not
    run the model again."""
    model = model.eval()
    config = model.config
    references = {} if references is None else references

    def reference(modality: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        digests = (hashlib.blake2b(np.ascontiguousarray(v)).digest() for v in feeds.values())
        key = (modality, *((n, v.dtype.str, v.shape, d) for (n, v), d in zip(feeds.items(), digests)))
        if key not in references:
            references[key] = _torch_embeddings(model, modality, feeds)
        return references[key]

    def embed_all(modality, count, make_feeds, length_of=None):
        """-> (exported [count, D], reference [count, D], TowerCheck), batches of 1, 3, 17, ..."""
        comparison, exported, expected = _Comparison(), [], []
        for index in _batches(count):
            feeds = make_feeds(index)
            got, want = runners[modality](feeds), reference(modality, feeds)
            comparison.add(got, want, length_of(feeds) if length_of else None)
            exported.append(got)
            expected.append(want)
        return np.concatenate(exported)[:count], np.concatenate(expected)[:count], comparison

    # images
    image_out, image_ref, image_cmp = embed_all(
        "image", len(evaluation.images), lambda i: {"pixel_values": evaluation.images[i]}
    )
    # sounds at one clip, then at a shorter and a longer length
    waves, real = evaluation.waveforms, evaluation.waveform_lengths
    clip = waves.shape[1]
    audio_out, audio_ref, audio_cmp = embed_all(
        "audio",
        len(waves),
        lambda i: {"waveform": waves[i], "waveform_lengths": real[i]},
        lambda f: f["waveform"].shape[1],
    )
    for length in (round(fraction * clip) for fraction in audio_lengths):
        part = np.concatenate([waves[:3], waves[:3]], axis=1)[:, :length]  # longer: the clip played twice
        feeds = {"waveform": np.ascontiguousarray(part), "waveform_lengths": np.full(3, length, np.int64)}
        audio_cmp.add(runners["audio"](feeds), reference("audio", feeds), length)
    # prompts: each batch padded to its longest, then all of them padded to max_length
    templates = config.prompt_templates
    prompts = [fill_prompt(template, label) for label in evaluation.labels for template in templates]
    sequences = tokenize(tokenizer, prompts, config.text.max_length)
    pad_id = _pad_id(tokenizer)
    text_out, text_ref, text_cmp = embed_all(
        "text",
        len(prompts),
        lambda i: _pad([sequences[j] for j in i], max(len(sequences[j]) for j in i), pad_id),
        lambda f: f["input_ids"].shape[1],
    )
    feeds = _pad(sequences[:17], config.text.max_length, pad_id)
    text_cmp.add(runners["text"](feeds), reference("text", feeds), config.text.max_length)
    # free text (built-in sentences and --data captions), batches of 8 padded to their longest: in the tower's
    # cosines, not in the zero-shot labels
    free = tokenize(tokenizer, list(evaluation.texts), config.text.max_length)
    for start in range(0, len(free), 8):
        part = free[start : start + 8]
        feeds = _pad(part, max(len(s) for s in part), pad_id)
        text_cmp.add(runners["text"](feeds), reference("text", feeds), feeds["input_ids"].shape[1])

    # zero-shot: label = normalised mean of its normalised prompt embeddings, as the runtime computes it
    def label_matrix(prompt_embeddings: np.ndarray) -> np.ndarray:
        per_label = prompt_embeddings.reshape(len(evaluation.labels), len(templates), -1).mean(axis=1)
        return per_label / np.linalg.norm(per_label, axis=1, keepdims=True)

    labels_out, labels_ref = label_matrix(text_out), label_matrix(text_ref)
    scores_out = np.concatenate([image_out, audio_out]) @ labels_out.T  # [queries, labels]
    scores_ref = np.concatenate([image_ref, audio_ref]) @ labels_ref.T
    top1_out, top1_ref = scores_out.argmax(1), scores_ref.argmax(1)
    best_two = np.sort(scores_ref, axis=1)[:, -2:]
    decided = best_two[:, 1] - best_two[:, 0] >= DECIDED_MARGIN
    agree = top1_out == top1_ref
    return Verification(
        target=target,
        precision=precision,
        towers={"image": image_cmp.result(), "text": text_cmp.result(), "audio": audio_cmp.result()},
        agreement=float(agree.mean()),
        queries=len(agree),
        decided_agreement=float(agree[decided].mean()) if decided.any() else float("nan"),
        decided_queries=int(decided.sum()),
        labels=len(evaluation.labels),
        evaluation_set=evaluation.source,
        thresholds=thresholds,
    )
