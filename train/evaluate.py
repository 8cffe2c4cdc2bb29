"""Evaluation: zero-shot classification (audio, image, audio+image -> label, prompt ensembles) and retrieval
R@1/5/10 in all six directions, plus two-modality queries and the same queries with one modality missing."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from synergy.core.model import SynergyModel
from synergy.runtime.prompts import fill_prompt
from synergy.runtime.text import tokenize
from synergy.train.data import Collate, ManifestDataset, read_manifest

DIRECTIONS = [(q, t) for q in ("image", "text", "audio") for t in ("image", "text", "audio") if q != t]


@torch.no_grad()
def embed_manifest(model: SynergyModel, tokenizer, csv_path, batch_size: int = 64, workers: int = 0) -> dict:
    """Every row of a manifest -> {"image"|"text"|"audio": [N, D], "<m>_mask": [N] bool, "labels": [N]} on the
    CPU, in float32. Inputs are decoded and cut exactly as the runtime does (``synergy.runtime``): audio longer
    than a clip is every window, the window embeddings averaged and re-normalised, so ``synergy eval`` and
    ``synergy infer`` agree on every file. Text is the caption (the label in the first template where the caption
    is empty). Batches go to the model's device."""
    config = model.config
    rows = read_manifest(csv_path)
    dataset = ManifestDataset.for_model(rows, config, text_mode="caption")
    collate = Collate(tokenizer, config.image.image_size, dataset.clip_samples)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {k: [] for k in ("image", "text", "audio", "image_mask", "text_mask", "audio_mask")}
    labels, bad = [], []
    for batch in loader:
        bad += batch["bad"]
        on_device = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        image = model.encode_image(on_device["pixel_values"])
        if "video_frames" in on_device:  # video rows: the normalised mean of every sampled frame's embedding
            frames = torch.cat([model.encode_image(f).float() for f in on_device["video_frames"].split(batch_size)])
            owners = on_device["frame_owner"]
            pooled = torch.zeros(image.shape, device=device).index_add_(0, owners, frames)
            image = torch.where(torch.isin(torch.arange(len(image), device=device), owners)[:, None],
                                F.normalize(pooled, dim=-1), image.float())  # fmt: skip
        text = model.encode_text(on_device["input_ids"], on_device["attention_mask"])
        audio = torch.cat(  # long audio has several windows: run them batch_size at a time
            [
                model.encode_audio(waves, lengths).float()
                for waves, lengths in zip(
                    on_device["waveform"].split(batch_size), on_device["waveform_lengths"].split(batch_size)
                )
            ]
        )
        pooled = torch.zeros(len(batch["labels"]), audio.shape[1], device=device)
        pooled.index_add_(0, on_device["audio_owner"], audio)  # mean of the window embeddings, re-normalised
        audio = F.normalize(pooled, dim=-1)
        for name, value in (("image", image), ("text", text), ("audio", audio)):
            parts[name].append(value.float().cpu())
            parts[f"{name}_mask"].append(batch[f"{name}_mask"])
        labels += batch["labels"]
    model.train(was_training)
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["video_mask"] = torch.tensor([row.video is not None for row in rows])
    out["labels"], out["bad"] = labels, bad
    return out


@torch.no_grad()
def label_embeddings(model: SynergyModel, tokenizer, labels: list[str], templates=None) -> torch.Tensor:
    """[K, D] on the CPU: each label through every prompt template, embeddings averaged and re-normalised
    (prompt ensemble), tokenized as the runtime tokenizes."""
    templates = templates or model.config.prompt_templates
    texts = [fill_prompt(t, label) for label in labels for t in templates]
    ids, mask = tokenize(tokenizer, texts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    emb = model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
    emb = emb.float().cpu().reshape(len(labels), len(templates), -1).mean(1)
    model.train(was_training)
    return F.normalize(emb, dim=-1)


def _accuracy(query: torch.Tensor, classes: torch.Tensor, target: torch.Tensor, k: int) -> float:
    top = (query @ classes.T).topk(min(k, classes.shape[0]), dim=-1).indices  # [N, k]
    return (top == target[:, None]).any(-1).float().mean().item()


def recall_at_k(query: torch.Tensor, keys: torch.Tensor) -> dict:
    """Query row i's match is key row i. -> {"R@1", "R@5", "R@10"} in percent; a tie does not count against the
    match (only strictly better keys do). `synergy eval` and `synergy mmr eval`'s semantic check use it."""
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
            retrieval[f"{q}->{t}"] = recall_at_k(data[q][ok], data[t][ok])
    # two modalities as one query (mean of normalised embeddings), and the same query with one of them missing
    for target_name in ("image", "text", "audio"):
        a, b = (m for m in ("image", "text", "audio") if m != target_name)
        ok = data[f"{a}_mask"] & data[f"{b}_mask"] & data[f"{target_name}_mask"]
        if ok.sum() > 1:
            both = F.normalize(data[a][ok] + data[b][ok], dim=-1)
            retrieval[f"{a}+{b}->{target_name}"] = recall_at_k(both, data[target_name][ok])
            retrieval[f"{a}+({b} missing)->{target_name}"] = recall_at_k(data[a][ok], data[target_name][ok])
            retrieval[f"({a} missing)+{b}->{target_name}"] = recall_at_k(data[b][ok], data[target_name][ok])
    result["retrieval"] = retrieval
    if data["video_mask"].any():
        result["video_retrieval"] = video_retrieval(data)
    return result


def ranks_with_ties(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Query row i's match is key row i. -> [N] float 1-based ranks of the match, a tie with k other keys counted as
    the mean of the tied places (rank = 1 + better + ties / 2), so a constant score gives (N + 1) / 2, not 1."""
    sim = query @ keys.T  # [N, N]
    own = sim.diagonal()[:, None]
    better = (sim > own).sum(-1)
    ties = (sim == own).sum(-1) - 1  # other keys with exactly the match's score
    return 1.0 + better.float() + ties.float() / 2.0


def _recall_with_ties(query: torch.Tensor, keys: torch.Tensor) -> dict:
    """-> {"R@1", "R@5", "R@10" in percent, "MdR": median rank, "n"}, ranks from ``ranks_with_ties``."""
    rank = ranks_with_ties(query, keys)
    out = {f"R@{k}": round(100 * (rank <= k).float().mean().item(), 2) for k in (1, 5, 10)}
    out["MdR"] = round(rank.quantile(0.5).item(), 2)  # an even count: the mean of the two middle ranks
    out["n"] = int(rank.numel())
    return out


def video_retrieval(data: dict) -> dict:
    """CLIP4VLA's retrieval over the rows with a video: text -> video (pooled frames), text -> audio (the soundtrack)
    and text -> video + audio (their normalised mean), each over the rows that have both sides."""
    video, text, audio = data["video_mask"], data["text_mask"], data["audio_mask"]
    frames = video & data["image_mask"]
    out = {}
    if (ok := frames & text).sum() > 1:
        out["text->video"] = _recall_with_ties(data["text"][ok], data["image"][ok])
    if (ok := video & audio & text).sum() > 1:
        out["text->audio"] = _recall_with_ties(data["text"][ok], data["audio"][ok])
    if (ok := frames & audio & text).sum() > 1:
        both = F.normalize(data["image"][ok] + data["audio"][ok], dim=-1)
        out["text->video+audio"] = _recall_with_ties(data["text"][ok], both)
    return out


def format_report(results: dict[str, dict]) -> str:
    """results: split name -> evaluate() output. A table for people; each column is as wide as its split's name."""
    splits = list(results)
    widths = [max(10, len(s)) + 2 for s in splits]  # two spaces between columns, whatever the names

    def row(title: str, cells: list[str], first: int) -> str:
        return f"{title:<{first}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths))

    lines = []
    header = row("zero-shot top-1 (%)", splits, 24)
    lines += [header, "-" * len(header)]
    for task in ("audio", "image", "audio+image"):
        values = [results[s]["zero_shot"].get(task) for s in splits]
        lines.append(row(task + " -> label", [f"{v['top1']:.1f}" if v else "-" for v in values], 24))
    lines.append(row("classes (chance %)", [f"{100 / results[s]['classes']:.1f}" for s in splits], 24))
    lines.append("")
    header = row("retrieval R@1/R@5 (%)", splits, 34)
    lines += [header, "-" * len(header)]
    for key in results[splits[0]]["retrieval"]:
        values = [results[s]["retrieval"].get(key) for s in splits]
        lines.append(row(key, [f"{v['R@1']:.1f}/{v['R@5']:.1f}" if v else "-" for v in values], 34))
    videos = [key for key in ("text->video", "text->audio", "text->video+audio") if any(
        key in results[s].get("video_retrieval", {}) for s in splits)]  # fmt: skip
    if videos:
        header = row("video retrieval R@1/R@5/MdR", splits, 34)
        lines += ["", header, "-" * len(header)]
        for key in videos:
            values = [results[s].get("video_retrieval", {}).get(key) for s in splits]
            lines.append(row(key, [f"{v['R@1']:.1f}/{v['R@5']:.1f}/{v['MdR']:g}" if v else "-" for v in values], 34))
    return "\n".join(lines)


def write_report(results: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
