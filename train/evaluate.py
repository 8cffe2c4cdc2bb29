"""Evaluation: zero-shot classification (audio, image, audio+image -> label, prompt ensembles) and retrieval
R@1/5/10 in all six directions, plus two-modality queries and the same queries with one modality missing."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from synergy.core.model import SynergyModel
from synergy.train.data import Collate, ManifestDataset, read_manifest

DIRECTIONS = [(q, t) for q in ("image", "text", "audio") for t in ("image", "text", "audio") if q != t]


@torch.no_grad()
def embed_manifest(model: SynergyModel, tokenizer, csv_path, batch_size: int = 64, workers: int = 0) -> dict:
    """Every row of a manifest -> {"image"|"text"|"audio": [N, D], "<m>_mask": [N] bool, "labels": [N]}.
    Text is the caption (the label in the first template where the caption is empty)."""
    config = model.config
    rows = read_manifest(csv_path)
    dataset = ManifestDataset(
        rows,
        image_size=config.image.image_size,
        mean=config.image.mean,
        std=config.image.std,
        sample_rate=config.audio.sample_rate,
        clip_seconds=config.audio.clip_seconds,
        text_mode="caption",
        templates=config.prompt_templates,
    )
    collate = Collate(tokenizer, config.image.image_size, dataset.clip_samples)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {k: [] for k in ("image", "text", "audio", "image_mask", "text_mask", "audio_mask")}
    labels, bad = [], []
    for batch in loader:
        bad += batch["bad"]
        image, text, audio, _ = model(
            batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["waveform"]
        )
        for name, value in (("image", image), ("text", text), ("audio", audio)):
            parts[name].append(value.float())
            parts[f"{name}_mask"].append(batch[f"{name}_mask"])
        labels += batch["labels"]
    model.train(was_training)
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["labels"], out["bad"] = labels, bad
    return out


@torch.no_grad()
def label_embeddings(model: SynergyModel, tokenizer, labels: list[str], templates=None) -> torch.Tensor:
    """[K, D]: each label through every prompt template, embeddings averaged and re-normalised (prompt ensemble)."""
    templates = templates or model.config.prompt_templates
    texts = [t.format(label) for label in labels for t in templates]
    enc = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    was_training = model.training
    model.eval()
    emb = model.encode_text(ids, mask).float().reshape(len(labels), len(templates), -1).mean(1)
    model.train(was_training)
    return F.normalize(emb, dim=-1)


def _accuracy(query: torch.Tensor, classes: torch.Tensor, target: torch.Tensor, k: int) -> float:
    top = (query @ classes.T).topk(min(k, classes.shape[0]), dim=-1).indices  # [N, k]
    return (top == target[:, None]).any(-1).float().mean().item()


def _recall(query: torch.Tensor, keys: torch.Tensor) -> dict:
    """Query row i's match is key row i. -> {"R@1", "R@5", "R@10"} in percent."""
    sim = query @ keys.T  # [N, N]
    rank = (sim > sim.diagonal()[:, None]).sum(-1)  # strictly better keys
    return {f"R@{k}": round(100 * (rank < k).float().mean().item(), 2) for k in (1, 5, 10)}


def evaluate(model: SynergyModel, tokenizer, csv_path, labels: list[str] | None = None, batch_size: int = 64) -> dict:
    """Metrics in percent. ``labels``: the candidate classes (default: the manifest's own labels)."""
    data = embed_manifest(model, tokenizer, csv_path, batch_size)
    labels = labels or sorted(set(data["labels"]))
    index = {name: i for i, name in enumerate(labels)}
    known = torch.tensor([label in index for label in data["labels"]])
    target = torch.tensor([index.get(label, -1) for label in data["labels"]])
    classes = label_embeddings(model, tokenizer, labels)
    result: dict = {"rows": len(data["labels"]), "classes": len(labels), "bad_rows": data["bad"], "zero_shot": {}}
    image_ok, audio_ok = data["image_mask"] & known, data["audio_mask"] & known
    fused = F.normalize(data["image"] + data["audio"], dim=-1)
    queries = {
        "audio": (data["audio"], audio_ok),
        "image": (data["image"], image_ok),
        "audio+image": (fused, image_ok & audio_ok),
    }
    for name, (query, ok) in queries.items():
        if ok.any():
            result["zero_shot"][name] = {
                "top1": round(100 * _accuracy(query[ok], classes, target[ok], 1), 2),
                "top5": round(100 * _accuracy(query[ok], classes, target[ok], 5), 2),
                "n": int(ok.sum()),
            }
    retrieval = {}
    for q, t in DIRECTIONS:
        ok = data[f"{q}_mask"] & data[f"{t}_mask"]
        if ok.sum() > 1:
            retrieval[f"{q}->{t}"] = _recall(data[q][ok], data[t][ok])
    # two modalities as one query (mean of normalised embeddings), and the same query with one of them missing
    for target_name in ("image", "text", "audio"):
        a, b = (m for m in ("image", "text", "audio") if m != target_name)
        ok = data[f"{a}_mask"] & data[f"{b}_mask"] & data[f"{target_name}_mask"]
        if ok.sum() > 1:
            both = F.normalize(data[a][ok] + data[b][ok], dim=-1)
            retrieval[f"{a}+{b}->{target_name}"] = _recall(both, data[target_name][ok])
            retrieval[f"{a}+({b} missing)->{target_name}"] = _recall(data[a][ok], data[target_name][ok])
            retrieval[f"({a} missing)+{b}->{target_name}"] = _recall(data[b][ok], data[target_name][ok])
    result["retrieval"] = retrieval
    return result


def format_report(results: dict[str, dict]) -> str:
    """results: split name -> evaluate() output. A table for people."""
    lines = []
    splits = list(results)
    header = f"{'zero-shot top-1 (%)':<24}" + "".join(f"{s:>14}" for s in splits)
    lines += [header, "-" * len(header)]
    for task in ("audio", "image", "audio+image"):
        cells = []
        for s in splits:
            value = results[s]["zero_shot"].get(task)
            cells.append(f"{value['top1']:>14.1f}" if value else f"{'-':>14}")
        lines.append(f"{task + ' -> label':<24}" + "".join(cells))
    lines.append(f"{'classes (chance %)':<24}" + "".join(f"{100 / results[s]['classes']:>14.1f}" for s in splits))
    lines.append("")
    header = f"{'retrieval R@1/R@5 (%)':<34}" + "".join(f"{s:>14}" for s in splits)
    lines += [header, "-" * len(header)]
    keys = list(results[splits[0]]["retrieval"])
    for key in keys:
        cells = []
        for s in splits:
            r = results[s]["retrieval"].get(key)
            cells.append(f"{r['R@1']:>7.1f}/{r['R@5']:<6.1f}" if r else f"{'-':>14}")
        lines.append(f"{key:<34}" + "".join(cells))
    return "\n".join(lines)


def write_report(results: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
