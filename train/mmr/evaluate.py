"""`synergy mmr eval | reconstruct`: metrics with two baselines and a semantic check; files and a grid to look at.

Per target, on each manifest, with the heads in eval mode, every number comes with two baselines on the same rows:

- ``mean_of_training``: the mean of the training targets (the mean image, the mean log-mel; for text, the most
  frequent training token at each position), the best constant guess under MSE;
- ``nearest_neighbour``: the target of the training row whose fused embedding of the same two present modalities
  (the mean of their L2-normalised embeddings, re-normalised) is closest, i.e. retrieval instead of generation;

and the ``truth`` itself where a number needs no reconstruction. The **semantic check** re-encodes every
reconstruction (and every baseline's guess, and the truth) with the frozen tower of its modality and measures
zero-shot top-1 against the labels (the prompt-ensemble label embeddings of ``synergy eval``) and R@1 of
reconstruction -> its own item among the split's truths. Metric definitions: :mod:`synergy.train.mmr.metrics`.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from synergy.core.reconstruction import present_modalities
from synergy.train.data import read_manifest
from synergy.train.evaluate import label_embeddings, recall_at_k
from synergy.train.mmr.metrics import cut_at_eos, reconstruction_metrics
from synergy.train.mmr.train import (
    MMRRun,
    encode_rows,
    head_inputs,
    heads_for,
    special_ids,
    split_rows,
    tokens_of,
    truth,
    usable,
)

DEFINITIONS = {
    "psnr_db": "image PSNR in dB, each image's own MSE at peak 1.0 (pixels in [0, 1]), averaged over images",
    "ssim": "Gaussian-window SSIM (11 x 11, sigma 1.5, K1 0.01, K2 0.03, valid positions; = scikit-image's with "
    "gaussian_weights=True, use_sample_covariance=False); image at data range 1.0, audio log-mel at audio_range",
    "mse": "audio: mean squared error of the z-scored log-mel (the model's front-end units)",
    "token_accuracy": "text: % of the truth's real tokens (no padding, no <s>) predicted at their position",
    "exact_match": "text: % of sequences equal to the truth up to and including the first </s>",
    "zero_shot_top1": "% of items whose re-encoded reconstruction is closest to its own label among all labels",
    "R@1": "% of items whose re-encoded reconstruction is closest to its own truth among the split's truths",
}
BATCH = 128


@torch.no_grad()
def embed_as(model, tokenizer, target: str, values: torch.Tensor) -> torch.Tensor:
    """Re-encode targets with the frozen tower of their modality -> [N, D] L2-normalised. ``values``: pixels in
    [0, 1] | z-scored log-mels | token ids (cut after the first </s>)."""
    out = []
    config = model.config
    pad_id, eos_id = special_ids(model, tokenizer)
    for chunk in values.split(BATCH):
        if target == "image":
            mean = torch.tensor(config.image.mean).view(1, 3, 1, 1)
            std = torch.tensor(config.image.std).view(1, 3, 1, 1)
            out.append(model.encode_image((chunk.float() - mean) / std))
        elif target == "audio":
            out.append(F.normalize(model.audio_projection(model.audio_features(chunk.float())), dim=-1))
        else:
            ids, mask = cut_at_eos(chunk, eos_id, pad_id)
            out.append(model.encode_text(ids, mask))
    return torch.cat(out).float()


def _semantic(query: torch.Tensor, truths: torch.Tensor, classes: torch.Tensor, target_class: torch.Tensor) -> dict:
    known = target_class >= 0
    top1 = (query[known] @ classes.T).argmax(-1) == target_class[known]
    return {
        "zero_shot_top1": round(100 * top1.float().mean().item(), 2) if known.any() else None,
        "R@1": recall_at_k(query, truths)["R@1"],  # query i's match is truth i
    }


def _metrics(run: MMRRun, target: str, prediction: torch.Tensor, true: torch.Tensor, token_mask) -> dict:
    pad_eos = special_ids(run.model, run.tokenizer)
    values = reconstruction_metrics(target, prediction, true, token_mask, run.audio_range, pad_eos)
    scale = 100 if target == "text" else 1
    return {name: round(scale * v.float().mean().item(), 4) for name, v in values.items()}


def training_rows(run: MMRRun) -> list:
    """The training split the heads saw (the manifest, less the validation rows when they were carved from it)."""
    config = run.run["train_config"]
    rows = read_manifest(run.run["data"])
    return split_rows(rows, run.run["val_data"], config["val_fraction"], config["seed"])[0]


def nearest_neighbour_rows(run: MMRRun, target: str, encoded: dict, index: torch.Tensor) -> torch.Tensor:
    """[n] the training-split row number of each row's nearest training row by fused embedding."""
    similarity = fused_embedding(encoded, target, index) @ run.baselines[f"fused.{target}"].T  # [n, N_train]
    return run.baselines[f"rows.{target}"][similarity.argmax(-1)]


def neighbour_targets(run: MMRRun, nearest: dict, train_rows) -> dict:
    """``nearest`` {(split, target): [n] training row numbers} -> {(split, target): those rows' targets}, decoded from
    their files. Every distinct row is decoded and encoded once, however many splits and targets pick it."""
    if not nearest:
        return {}
    unique = torch.cat(list(nearest.values())).unique()  # sorted
    rows = [train_rows[i] for i in unique.tolist()]
    neighbours = encode_rows(run.model, run.tokenizer, rows, features=False, report=lambda text: None)
    return {key: truth(neighbours, key[1], torch.searchsorted(unique, found)) for key, found in nearest.items()}


def fused_embedding(encoded: dict, target: str, index: torch.Tensor) -> torch.Tensor:
    a, b = present_modalities(target)
    return F.normalize(encoded["embeddings"][a][index] + encoded["embeddings"][b][index], dim=-1)


@torch.no_grad()
def predict(run: MMRRun, target: str, encoded: dict, index: torch.Tensor) -> torch.Tensor:
    """The head's reconstruction of rows ``index``: pixels | log-mel | token ids."""
    head = heads_for(run, target)
    out = torch.cat([head(*head_inputs(encoded, target, chunk)) for chunk in index.split(BATCH)])
    return out.argmax(-1) if target == "text" else out


@torch.no_grad()
def evaluate_mmr(run: MMRRun, csv_paths, labels: list[str] | None = None, report=print) -> dict:
    """-> {"definitions", "audio_range", "labels", "splits": {split: {target: {...}}}} (see the module doc)."""
    train_rows = training_rows(run)
    encoded = {Path(p).stem: encode_rows(run.model, run.tokenizer, read_manifest(p), report=report) for p in csv_paths}
    labels = labels or sorted({label for e in encoded.values() for label in e["labels"] if label})
    classes = label_embeddings(run.model, run.tokenizer, labels)
    class_index = {label: i for i, label in enumerate(labels)}
    result = {
        "definitions": DEFINITIONS,
        "audio_range": run.audio_range,
        "labels": len(labels),
        "training_rows": len(train_rows),
        "splits": {},
    }
    indices = {(split, t): usable(data, t) for split, data in encoded.items() for t in run.heads}
    indices = {key: index for key, index in indices.items() if len(index) >= 2}
    nearest = {(split, t): nearest_neighbour_rows(run, t, encoded[split], i) for (split, t), i in indices.items()}
    neighbours = neighbour_targets(run, nearest, train_rows)
    for split, data in encoded.items():
        report(f"evaluating {split}: {len(data['labels'])} rows")
        per_target = {}
        for target in run.heads:
            if (split, target) not in indices:
                continue
            index = indices[split, target]
            true = truth(data, target, index)
            token_mask = data["token_mask"][index] if target == "text" else None
            guesses = {
                "reconstruction": predict(run, target, data, index),
                "mean_of_training": run.baselines[f"mean.{target}"].expand_as(true).contiguous(),
                "nearest_neighbour": neighbours[split, target],
            }
            truths = embed_as(run.model, run.tokenizer, target, true)
            target_class = torch.tensor([class_index.get(data["labels"][i], -1) for i in index.tolist()])
            entry: dict = {"n": len(index), "from": list(present_modalities(target))}
            for name, guess in guesses.items():
                entry[name] = _metrics(run, target, guess, true, token_mask)
                query = embed_as(run.model, run.tokenizer, target, guess)
                entry[name].update(_semantic(query, truths, classes, target_class))
            entry["truth"] = _semantic(truths, truths, classes, target_class)
            per_target[target] = entry
        result["splits"][split] = {"rows": len(data["labels"]), "bad_rows": data["bad"], "targets": per_target}
    return result


MAIN = {"image": ("psnr_db", "ssim"), "audio": ("ssim", "mse"), "text": ("token_accuracy", "exact_match")}


def format_mmr_report(result: dict) -> str:
    """A table per split: every metric of every target, reconstruction beside both baselines and the truth."""
    lines = []
    columns = ("reconstruction", "mean_of_training", "nearest_neighbour", "truth")
    for split, data in result["splits"].items():
        header = f"{split} ({data['rows']} rows, {result['labels']} labels)"
        lines += [f"{header:<34}" + "".join(f"{c:>19}" for c in columns), "-" * (34 + 19 * len(columns))]
        for target, entry in data["targets"].items():
            source = " + ".join(entry["from"])
            for metric in (*MAIN[target], "zero_shot_top1", "R@1"):
                cells = [entry[c].get(metric) for c in columns]
                text = ["-" if v is None else f"{v:.3f}" if metric in ("ssim", "mse") else f"{v:.1f}" for v in cells]
                lines.append(f"{f'{target} <- {source}: {metric}':<34}" + "".join(f"{t:>19}" for t in text))
        lines.append("")
    return "\n".join(lines).rstrip()


def write_mmr_report(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


# ------------------------------------------------------------------------------------ single inputs -> files


@torch.no_grad()
def reconstruct_files(run: MMRRun, image=None, audio=None, text: str | None = None):
    """Two of (image path, audio path, text) -> (target, output): pixels [3, S, S] in [0, 1] | a waveform | text."""
    from synergy.runtime.audio import cut_window, load_audio, window_spans
    from synergy.runtime.image import load_image, preprocess_with

    given = {"image": image, "audio": audio, "text": text}
    present = [m for m, v in given.items() if v is not None]
    if len(present) != 2:
        raise ValueError(f"give exactly two of --image, --audio, --text (got {', '.join(present) or 'none'})")
    target = next(m for m in given if given[m] is None)
    model, config = run.model, run.model.config
    features = {}
    if image is not None:
        pixels = preprocess_with(load_image(image, name=str(image)), config.image.preprocessing())
        features["image"] = model.image_features(torch.from_numpy(pixels)[None])
    if audio is not None:
        wave = load_audio(audio, config.audio.sample_rate, name=str(audio))
        clip = round(config.audio.clip_seconds * config.audio.sample_rate)
        window, length = cut_window(wave, window_spans(len(wave), clip)[0], clip)
        log_mel = model.audio_frontend(torch.from_numpy(window)[None], torch.tensor([length]))
        features["audio"] = model.audio_features(log_mel)
    if text is not None:
        features["text"] = model.text_features(*tokens_of(model, run.tokenizer, [text]))
    a, b = present_modalities(target)
    out = heads_for(run, target)(features[a], features[b])[0]
    if target == "image":
        return target, out
    if target == "audio":
        from synergy.train.mmr.audio import log_mel_to_waveform

        return target, log_mel_to_waveform(out.numpy(), config.audio.sample_rate, config.audio.mean, config.audio.std)
    return target, decode_text(run, out.argmax(-1)[None])[0]


def decode_text(run: MMRRun, ids: torch.Tensor) -> list[str]:
    pad_id, eos_id = special_ids(run.model, run.tokenizer)
    cut, mask = cut_at_eos(ids, eos_id, pad_id)
    return [
        run.tokenizer.decode([i for i, m in zip(r, k) if m], skip_special_tokens=True)
        for r, k in zip(cut.tolist(), mask.tolist())
    ]


def save_image(pixels: torch.Tensor, path: str | Path) -> None:
    array = (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


# ------------------------------------------------------------------------------------------------------ the grid

CELL = 96
# a dark-to-bright ramp (black, purple, orange, pale yellow) for log-mels: the eye reads levels from it
RAMP = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], np.float64)


def _cell_image(pixels: torch.Tensor) -> Image.Image:
    array = (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array).resize((CELL, CELL), Image.Resampling.NEAREST)


def _cell_log_mel(log_mel: torch.Tensor, low: float, high: float) -> Image.Image:
    """[frames, mels] -> time left to right, low mels at the bottom, one colour scale for every cell."""
    level = ((log_mel.T.flip(0).numpy() - low) / max(high - low, 1e-6)).clip(0, 1) * (len(RAMP) - 1)
    lower = np.floor(level).astype(int).clip(0, len(RAMP) - 2)
    frac = (level - lower)[..., None]
    rgb = RAMP[lower] * (1 - frac) + RAMP[lower + 1] * frac
    return Image.fromarray(rgb.round().astype(np.uint8)).resize((CELL, CELL), Image.Resampling.BILINEAR)


def _cell_text(text: str, font) -> Image.Image:
    cell = Image.new("RGB", (CELL, CELL), "white")
    draw = ImageDraw.Draw(cell)
    draw.multiline_text((3, 3), "\n".join(textwrap.wrap(text, 15)[:7]), fill="black", font=font, spacing=2)
    return cell


@torch.no_grad()
def write_grid(run: MMRRun, csv_path, out: str | Path, n: int = 6, seed: int = 0) -> Path:
    """One PNG: a panel per target (title: "image <- text + audio"), n rows of items drawn by ``seed`` from the
    rows with all three modalities, columns: the two inputs, the reconstruction, the truth."""
    rows = read_manifest(csv_path)
    data = encode_rows(run.model, run.tokenizer, rows, report=lambda text: None)
    complete = data["masks"]["image"] & data["masks"]["audio"] & data["masks"]["text"]
    candidates = complete.nonzero().flatten()
    pick = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:n]].sort().values
    font = ImageFont.load_default()
    low, high = data["log_mel"].min().item(), data["log_mel"].max().item()
    texts = decode_text(run, data["ids"][pick])

    def draw(modality: str, value, k: int) -> Image.Image:
        if modality == "image":
            return _cell_image(value)
        if modality == "audio":
            return _cell_log_mel(value, low, high)
        return _cell_text(value if isinstance(value, str) else texts[k], font)

    targets = list(run.heads)
    title, gap = 28, 8
    panel_width = 4 * CELL + 3 * 2
    sheet = Image.new("RGB", (len(targets) * (panel_width + gap) - gap, title + len(pick) * (CELL + 2)), "white")
    writer = ImageDraw.Draw(sheet)
    for p, target in enumerate(targets):
        a, b = present_modalities(target)
        x0 = p * (panel_width + gap)
        writer.text((x0 + 2, 2), f"{target} <- {a} + {b}", fill="black", font=font)
        writer.text((x0 + 2, 15), "input | input | reconstruction | truth", fill="gray", font=font)
        reconstruction = predict(run, target, data, pick)
        if target == "text":
            reconstruction = decode_text(run, reconstruction)
        for k, row in enumerate(pick.tolist()):
            values = {"image": data["image"][row].float() / 255, "audio": data["log_mel"][row], "text": texts[k]}
            cells = [
                draw(a, values[a], k),
                draw(b, values[b], k),
                draw(target, reconstruction[k], k),
                draw(target, values[target], k),
            ]
            for c, cell in enumerate(cells):
                sheet.paste(cell, (x0 + c * (CELL + 2), title + k * (CELL + 2)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return out
