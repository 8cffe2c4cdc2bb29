"""`synergy mmr train`: missing-modality reconstruction heads on a frozen Synergy checkpoint.

For each target (image, audio, text) a head (:mod:`synergy.core.reconstruction`) learns to rebuild that modality
from the other two modalities' frozen-tower features. Unlike the published protocol (one batch of 32 drawn before the
loop, so every "epoch" was one step on the same samples), this trains real epochs over the whole manifest, shuffled
per epoch by ``(seed, epoch)``, validates on a separate split after every epoch, and saves a checkpoint after every
epoch that ``--resume`` continues exactly.

The encoders are frozen: eval mode, ``requires_grad=False``, never in the optimiser. Their features, and the targets,
are therefore computed once per row before the first epoch (every epoch would compute the same ones: no augmentation
reaches frozen features), decoded and preprocessed by ``synergy.runtime`` like every other command. A row whose file
is missing or broken is reported with its path and manifest line and left out (``on_bad_sample="error"`` stops).

Layout of ``out``::

    out/checkpoint/config.json        # the run: frozen checkpoint (path + sha256), data, split, head configs
    out/checkpoint/heads.safetensors  # every head's weights, "<target>.<name>"
    out/checkpoint/train_state/state.pt   # optimiser, schedule, epoch (weights_only)
    out/metrics.jsonl                 # one line per epoch: training and validation loss and main metrics
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from synergy.core.atomic_folder import atomic_folder, recover_folder
from synergy.core.checkpoint import CheckpointError, load_checkpoint, load_train_state
from synergy.core.config import ConfigError, checked_fields
from synergy.core.reconstruction import (
    TARGETS,
    ReconstructionConfig,
    Reconstructor,
    build_reconstructor,
    present_modalities,
    reconstruction_config,
    reconstruction_loss,
)
from synergy.runtime.text import tokenize
from synergy.train.data import Collate, DataError, ManifestDataset, read_manifest
from synergy.train.loop import cut_metrics, warmup_cosine
from synergy.train.mmr.metrics import reconstruction_metrics

FORMAT = 1
MAIN_METRIC = {"image": "psnr_db", "audio": "ssim", "text": "token_accuracy"}
HEAD_SIZES_FROM_CHECKPOINT = ("target", "input_widths", "output_shape", "vocab_size")


@dataclass(frozen=True)
class MMRConfig:
    """An MMR training run. The defaults train the demo's three heads on 2 CPU cores in about 4 minutes."""

    checkpoint: str  # the frozen Synergy checkpoint (a folder from `synergy train`)
    data: str  # the training manifest
    out: str = "runs/mmr"
    targets: tuple[str, ...] = TARGETS
    val_data: str | None = None  # None: a val_fraction of `data`, chosen by the seed
    val_fraction: float = 0.1
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    clip_norm: float = 1.0
    seed: int = 0
    on_bad_sample: str = "skip"  # skip (reported) | error
    head: dict = field(default_factory=dict)  # ReconstructionConfig overrides, e.g. {"fusion_width": 128}


def mmr_config(values: dict) -> MMRConfig:
    """A dict (from the CLI) -> a checked :class:`MMRConfig`; unknown keys and wrong types fail with the valid ones."""
    config = MMRConfig(**checked_fields(MMRConfig, values, "mmr"))
    bad_targets = [t for t in config.targets if t not in TARGETS]
    if bad_targets or not config.targets:
        raise ConfigError(f"mmr: targets {list(config.targets)}: choose from {list(TARGETS)}")
    if config.epochs < 1 or config.batch_size < 2 or not 0 < config.val_fraction < 1 or config.lr <= 0:
        raise ConfigError("mmr: epochs >= 1, batch_size >= 2, 0 < val_fraction < 1 and lr > 0 are required")
    if config.on_bad_sample not in ("skip", "error"):
        raise ConfigError(f"mmr: on_bad_sample {config.on_bad_sample!r}: choose skip or error")
    # the head's sizes come from the frozen checkpoint and the tokenizer: only its widths and depths are options
    checked_fields(ReconstructionConfig, config.head, "mmr: head", exclude=HEAD_SIZES_FROM_CHECKPOINT)
    return config


# ------------------------------------------------------------------------------------------- the frozen encoders


def load_frozen(checkpoint: str | Path):
    """-> (model, tokenizer): eval mode, every parameter ``requires_grad=False``."""
    model, tokenizer = load_checkpoint(checkpoint)
    model.eval().requires_grad_(False)
    return model, tokenizer


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def special_ids(model, tokenizer) -> tuple[int, int]:
    """(pad id, end-of-sequence id) of the model's tokenizer."""
    pad = tokenizer.padding["pad_id"] if tokenizer.padding else model.text_tower.config.pad_token_id
    eos = tokenizer.token_to_id("</s>")
    if eos is None:
        eos = tokenizer.token_to_id("[SEP]")
    if eos is None:
        eos = model.text_tower.config.eos_token_id
    return int(pad), int(eos)


@torch.no_grad()
def encode_rows(
    model, tokenizer, rows, batch_size: int = 64, on_bad_sample: str = "skip", report=print, features: bool = True
) -> dict:
    """Manifest rows -> everything MMR needs per row, on the CPU:

    ``features`` {m: [N, width]} pooled tower outputs; ``embeddings`` {m: [N, D]} the model's L2-normalised
    embeddings (nearest-neighbour baseline); ``image`` [N, 3, S, S] uint8 (pixels, the runtime's resize and crop);
    ``log_mel`` [N, frames, mels] (the model's front end on the first clip-long window); ``ids`` / ``token_mask``
    [N, max_length] (the caption, or the label in the first template); ``masks`` {m: [N] bool}; ``labels``;
    ``bad`` (messages of the rows left out). ``features=False``: the targets only (no tower runs; ``features`` and
    ``embeddings`` stay empty), for rows whose targets alone are needed (evaluation's nearest neighbours)."""
    config = model.config
    dataset = ManifestDataset.for_model(rows, config, text_mode="caption")
    collate = Collate(tokenizer, config.image.image_size, dataset.clip_samples)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    pad_id, _ = special_ids(model, tokenizer)
    parts: dict[str, list] = {}
    labels, bad = [], []
    for batch in loader:
        for message in batch["bad"]:
            if on_bad_sample == "error":
                raise DataError(f"bad sample: {message} (use --set on_bad_sample=skip to skip such rows)")
            report(f"skipping bad sample: {message}")
        bad += batch["bad"]
        for key, value in encode_batch(model, batch, pad_id, features).items():
            parts.setdefault(key, []).append(value)
        labels += batch["labels"]
    flat = {k: torch.cat(v) for k, v in parts.items()}
    out: dict = {"features": {}, "embeddings": {}, "masks": {}, "labels": labels, "bad": bad}
    for key, value in flat.items():
        group, _, name = key.partition(".")
        if name:
            out[group][name] = value
        else:
            out[key] = value
    return out


def encode_batch(model, batch: dict, pad_id: int, features: bool) -> dict[str, torch.Tensor]:
    """One collated batch -> its rows' targets, masks and (with ``features``) the frozen towers' outputs, under
    flat keys ("image", "masks.audio", "features.text", ...) that ``encode_rows`` concatenates and groups."""
    config = model.config
    mean = torch.tensor(config.image.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image.std).view(1, 3, 1, 1)
    length = config.text.max_length
    owner = batch["audio_owner"]
    first = torch.ones_like(owner, dtype=torch.bool)
    first[1:] = owner[1:] != owner[:-1]  # each row's first window: one clip per row, the log-mel geometry
    log_mel = model.audio_frontend(batch["waveform"][first], batch["waveform_lengths"][first])
    ids, mask = batch["input_ids"][:, :length], batch["attention_mask"][:, :length]
    ids = F.pad(ids, (0, length - ids.shape[1]), value=pad_id)
    mask = F.pad(mask, (0, length - mask.shape[1]), value=0)
    values = {
        "image": ((batch["pixel_values"] * std + mean).clamp(0, 1) * 255).round().to(torch.uint8),
        "log_mel": log_mel.float(),
        "ids": ids,
        "token_mask": mask,
    }
    for m in ("image", "text", "audio"):
        values[f"masks.{m}"] = batch[f"{m}_mask"]
    if features:
        pooled = {
            "image": model.image_features(batch["pixel_values"]),
            "text": model.text_features(ids, mask),
            "audio": model.audio_features(log_mel),
        }
        for m, f in pooled.items():
            values[f"features.{m}"] = f.float()
            values[f"embeddings.{m}"] = F.normalize(getattr(model, f"{m}_projection")(f).float(), dim=-1)
    return values


def usable_mask(encoded: dict, target: str) -> torch.Tensor:
    """[N] bool: the rows where the target and both modalities it is rebuilt from are present."""
    ok = encoded["masks"][target].clone()
    for m in present_modalities(target):
        ok &= encoded["masks"][m]
    return ok


def usable(encoded: dict, target: str) -> torch.Tensor:
    """Row indices where the target and both modalities it is rebuilt from are present."""
    return usable_mask(encoded, target).nonzero().flatten()


def head_inputs(encoded: dict, target: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = present_modalities(target)
    return encoded["features"][a][index], encoded["features"][b][index]


def truth(encoded: dict, target: str, index: torch.Tensor) -> torch.Tensor:
    """The target of rows ``index``: pixels in [0, 1] | z-scored log-mel | token ids."""
    if target == "image":
        return encoded["image"][index].float() / 255
    if target == "audio":
        return encoded["log_mel"][index]
    return encoded["ids"][index]


def split_rows(rows, val_data: str | None, val_fraction: float, seed: int):
    """-> (training rows, validation rows, a description). Without ``val_data``, a seeded ``val_fraction`` of the
    training manifest's rows (at least one) is held out."""
    if val_data:
        return rows, read_manifest(val_data), str(val_data)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(val_fraction * len(rows)))
    held = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in held]
    val = [r for i, r in enumerate(rows) if i in held]
    return train, val, f"{n_val} rows ({100 * val_fraction:g}%) of the training manifest, chosen by seed {seed}"


# ------------------------------------------------------------------------------------------------ the checkpoint


@dataclass
class MMRRun:
    """A trained MMR run, loaded: the frozen model, its tokenizer, the heads and the run description."""

    model: torch.nn.Module
    tokenizer: object
    heads: torch.nn.ModuleDict
    run: dict
    folder: Path
    baselines: dict

    @property
    def audio_range(self) -> float:
        return float(self.run["audio_range"])


def training_baselines(train_set: dict, targets) -> dict[str, torch.Tensor]:
    """What evaluation's baselines need from the training rows, so that `synergy mmr eval` does not encode them
    again: ``mean.<target>`` the mean-of-training guess [1, ...] (text: the most frequent token at each position,
    padding included), ``fused.<target>`` [N_t, D] the training rows' fused embeddings of the two present
    modalities (the mean of their L2-normalised embeddings, re-normalised) and ``rows.<target>`` [N_t] their row
    numbers in the training split (the nearest neighbour's target is decoded from its files)."""
    out = {}
    for target in targets:
        index = usable(train_set, target)
        values = truth(train_set, target, index)
        out[f"mean.{target}"] = (
            values.mode(0).values[None] if target == "text" else values.float().mean(0, keepdim=True)
        )
        a, b = present_modalities(target)
        fused = train_set["embeddings"][a][index] + train_set["embeddings"][b][index]
        out[f"fused.{target}"] = F.normalize(fused, dim=-1)
        out[f"rows.{target}"] = index
    return out


def save_mmr(folder: Path, heads: torch.nn.ModuleDict, run: dict, train_state: dict | None, baselines: dict) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(run, indent=2) + "\n")
        (tmp / "heads.safetensors").write_bytes(save_safetensors(state, metadata={"format": "pt"}))
        baselines = {k: v.contiguous() for k, v in baselines.items()}
        (tmp / "baselines.safetensors").write_bytes(save_safetensors(baselines, metadata={"format": "pt"}))
        if train_state is not None:
            (tmp / "train_state").mkdir()
            with open(tmp / "train_state" / "state.pt", "wb") as f:
                torch.save(train_state, f)


def mmr_checkpoint_folder(path: str | Path) -> Path:
    """The run folder (``out``) or its ``checkpoint/`` -> the checkpoint folder; a clear error otherwise."""
    path = Path(path)
    for folder in (path / "checkpoint", path):
        if all((folder / name).is_file() for name in ("config.json", "heads.safetensors", "baselines.safetensors")):
            return folder
    raise CheckpointError(
        f"{path}: no MMR checkpoint (expected {path}/checkpoint/heads.safetensors and config.json, written by "
        "`synergy mmr train --out DIR`)"
    )


def _frozen_checkpoint_path(run: dict, folder: Path) -> Path:
    candidates = [Path(run["checkpoint"]), (folder / run["checkpoint_relative"]).resolve()]
    for path in candidates:
        if (path / "model.safetensors").is_file():
            return path
    raise CheckpointError(
        f"{folder}: the frozen checkpoint it was trained on is gone ({run['checkpoint']}); put it back there"
    )


def load_mmr(path: str | Path) -> MMRRun:
    """Load an MMR run: its frozen checkpoint (checked against the sha256 recorded at training) and heads."""
    folder = mmr_checkpoint_folder(path)
    run = json.loads((folder / "config.json").read_text())
    if run.get("format") != FORMAT:
        raise CheckpointError(f"{folder}/config.json: MMR format {run.get('format')!r}, expected {FORMAT}")
    frozen = _frozen_checkpoint_path(run, folder)
    if file_sha256(frozen / "model.safetensors") != run["checkpoint_sha256"]:
        raise CheckpointError(
            f"{frozen}/model.safetensors changed since these heads were trained on it; retrain with "
            f"`synergy mmr train --checkpoint {frozen} ...`"
        )
    model, tokenizer = load_frozen(frozen)
    heads = torch.nn.ModuleDict(
        {t: build_reconstructor(ReconstructionConfig.from_dict(c)) for t, c in run["heads"].items()}
    )
    try:
        heads.load_state_dict(load_file(str(folder / "heads.safetensors")))
    except (RuntimeError, OSError) as error:  # a size mismatch, a truncated file
        raise CheckpointError(
            f"{folder}/heads.safetensors does not match its config.json: {str(error)[:300]}"
        ) from error
    heads.eval()
    baselines = load_file(str(folder / "baselines.safetensors"))
    return MMRRun(model=model, tokenizer=tokenizer, heads=heads, run=run, folder=folder, baselines=baselines)


# ------------------------------------------------------------------------------------------------- the training


def make_optimizer(heads: torch.nn.ModuleDict, config: MMRConfig) -> torch.optim.AdamW:
    """AdamW over the heads' parameters only: the frozen encoders are never handed to the optimiser."""
    return torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)


@torch.no_grad()
def validate(heads: torch.nn.ModuleDict, encoded: dict, audio_range: float, pad_eos: tuple[int, int], batch=256):
    """-> {target: {"loss", main metric...}} over the usable rows of ``encoded``, heads in eval mode."""
    was = heads.training
    heads.eval()
    result = {}
    for target, head in heads.items():
        index = usable(encoded, target)
        if len(index) == 0:
            continue
        sums: dict[str, float] = {}
        for chunk in index.split(batch):
            prediction = head(*head_inputs(encoded, target, chunk))
            true = truth(encoded, target, chunk)
            mask = encoded["token_mask"][chunk] if target == "text" else None
            loss = reconstruction_loss(target, prediction, true, mask, audio_range).item()
            sums["loss"] = sums.get("loss", 0.0) + loss * len(chunk)
            predicted = prediction.argmax(-1) if target == "text" else prediction  # text: logits -> token ids
            values = reconstruction_metrics(target, predicted, true, mask, audio_range, pad_eos)
            for name, v in values.items():
                sums[name] = sums.get(name, 0.0) + v.sum().item()
        result[target] = {name: round(v / len(index), 5) for name, v in sums.items()}
    heads.train(was)
    return result


def train_mmr(config: MMRConfig, resume: bool = False, force: bool = False, report=None) -> Path:
    """Train the heads of ``config.targets``; returns the checkpoint folder ``<out>/checkpoint``."""
    report = report or (lambda text: tqdm.write(text))
    out = Path(config.out)
    folder = out / "checkpoint"
    recover_folder(folder)
    run, state = start_or_resume(config, folder, resume, force)
    model, tokenizer = load_frozen(config.checkpoint)
    train_rows, val_rows, val_source = split_rows(
        read_manifest(config.data), config.val_data, config.val_fraction, config.seed
    )
    torch.manual_seed(config.seed)  # the heads' initial weights are a function of the seed
    head_configs = _head_configs(model, tokenizer.get_vocab_size(), config)
    heads = torch.nn.ModuleDict({t: build_reconstructor(c) for t, c in head_configs.items()})
    report(
        f"MMR on frozen {config.checkpoint}: targets {', '.join(config.targets)}; "
        f"{sum(p.numel() for p in heads.parameters()) / 1e6:.2f}M trainable parameters (encoders frozen: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M)\n"
        f"  training rows: {len(train_rows)} of {config.data}; validation: {val_source}"
    )
    train_set, val_set = encode_splits(model, tokenizer, train_rows, val_rows, config, report)
    run = run or describe_run(config, folder, model, tokenizer, train_set, val_source)
    steps = Steps(math.ceil(len(train_rows) / config.batch_size), config.epochs)
    optimizer, scheduler, epoch = make_schedule(heads, config, steps, folder, state, report)
    baselines = training_baselines(train_set, config.targets)
    out.mkdir(parents=True, exist_ok=True)
    cut_metrics(out / "metrics.jsonl", epoch * steps.per_epoch)
    bar = tqdm(total=steps.total, initial=epoch * steps.per_epoch, disable=not sys.stderr.isatty(), unit="step")
    heads.train()
    while epoch < config.epochs:
        tick = time.perf_counter()
        losses = train_epoch(heads, train_set, config, epoch, optimizer, scheduler, float(run["audio_range"]), bar)
        epoch += 1
        val = validate(heads, val_set, float(run["audio_range"]), special_ids(model, tokenizer))
        record = {
            "epoch": epoch,
            "step": epoch * steps.per_epoch,
            "train_loss": {t: round(v / steps.per_epoch, 5) for t, v in losses.sums.items()},
            "skipped_steps": losses.skipped,
            "val": val,
            "seconds": round(time.perf_counter() - tick, 1),
        }
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch}
        save_mmr(folder, heads, run, train_state, baselines)
        report(epoch_line(record, config))
    bar.close()
    return folder


def start_or_resume(config: MMRConfig, folder: Path, resume: bool, force: bool) -> tuple[dict | None, dict | None]:
    """-> (the run description, the train state) to continue with ``resume``; (None, None) for a new run. Refuses
    to resume a different configuration or checkpoint, and to replace a checkpoint without ``force``."""
    if not resume:
        if folder.is_dir() and not force:
            raise CheckpointError(
                f"{folder} already holds an MMR checkpoint; continue it with --resume or replace it with --force"
            )
        return None, None
    if not (folder / "train_state" / "state.pt").is_file():
        raise CheckpointError(f"--resume: no MMR checkpoint with train_state at {folder}; start without --resume")
    run = json.loads((folder / "config.json").read_text())
    if run["train_config"] != _config_json(config):
        raise ConfigError(
            f"--resume: {folder} was trained with a different configuration; resume it with the same options "
            f"({run['train_config']}) or start a new --out"
        )
    if file_sha256(Path(config.checkpoint) / "model.safetensors") != run["checkpoint_sha256"]:
        raise CheckpointError(
            f"--resume: {config.checkpoint} is not the checkpoint {folder} was trained on (its weights changed); "
            "start again with --force"
        )
    state = load_train_state(folder)  # weights_only, with the checkpoint's own errors for a pickle or a bad file
    if state is None:
        raise CheckpointError(f"--resume: {folder} has no train_state/ to resume from; start again with --force")
    return run, state


def encode_splits(model, tokenizer, train_rows, val_rows, config: MMRConfig, report) -> tuple[dict, dict]:
    """Both splits through the frozen towers, once (see ``encode_rows``); every target needs a usable training row."""
    start = time.perf_counter()
    train_set = encode_rows(model, tokenizer, train_rows, on_bad_sample=config.on_bad_sample, report=report)
    val_set = encode_rows(model, tokenizer, val_rows, on_bad_sample=config.on_bad_sample, report=report)
    bad = len(train_set["bad"]) + len(val_set["bad"])
    report(
        f"  encoded {len(train_rows) + len(val_rows)} rows with the frozen towers "
        f"in {time.perf_counter() - start:.0f} s" + (f"; {bad} bad row(s) skipped (listed above)" if bad else "")
    )
    for target in config.targets:
        if len(usable(train_set, target)) == 0:
            a, b = present_modalities(target)
            raise DataError(
                f"{config.data}: no training row has {target}, {a} and {b} together, so the {target} head has "
                f"nothing to learn from; add such rows or leave {target} out (--target)"
            )
    return train_set, val_set


def describe_run(config: MMRConfig, folder: Path, model, tokenizer, train_set: dict, val_source: str) -> dict:
    """The run's config.json: the frozen checkpoint (path and sha256), the data, the heads and the options."""
    log_mel = train_set["log_mel"][train_set["masks"]["audio"]]
    frozen = Path(config.checkpoint).resolve()
    return {
        "format": FORMAT,
        "checkpoint": str(frozen),
        "checkpoint_relative": os.path.relpath(frozen, folder.resolve()),
        "checkpoint_sha256": file_sha256(frozen / "model.safetensors"),
        "data": str(Path(config.data).resolve()),
        "val_data": str(Path(config.val_data).resolve()) if config.val_data else None,
        "validation": val_source,
        # SSIM's data range for z-scored log-mels: their spread over the training targets, fixed for the run
        "audio_range": round(float(log_mel.max() - log_mel.min()), 6) if len(log_mel) else 1.0,
        "heads": {t: c.to_dict() for t, c in _head_configs(model, tokenizer.get_vocab_size(), config).items()},
        "train_config": _config_json(config),
    }


@dataclass(frozen=True)
class Steps:
    """Optimiser steps: one per batch of the training rows (a skipped one counts too, so resuming lines up)."""

    per_epoch: int
    epochs: int

    @property
    def total(self) -> int:
        return self.per_epoch * self.epochs


def make_schedule(heads, config: MMRConfig, steps: Steps, folder: Path, state: dict | None, report):
    """-> (optimizer, warmup-cosine scheduler, epochs done): fresh, or as the train state left them."""
    optimizer = make_optimizer(heads, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, steps.total))
    if state is None:
        return optimizer, scheduler, 0
    heads.load_state_dict(load_file(str(folder / "heads.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    report(f"  resuming after epoch {int(state['epoch'])} of {config.epochs}")
    return optimizer, scheduler, int(state["epoch"])


@dataclass(frozen=True)
class EpochLosses:
    """One epoch's training: the sum of each target's batch losses, and the steps skipped for want of any row."""

    sums: dict[str, float]
    skipped: int


def train_epoch(heads, train_set: dict, config: MMRConfig, epoch: int, optimizer, scheduler, audio_range, bar):
    """One pass over the training rows, shuffled by ``(seed, epoch)``. -> ``EpochLosses``.

    A batch in which no head has a usable row (a sparse-modality manifest's small last batch) has no loss to
    follow: its step is skipped and counted, the schedule still advances (it is a function of the step number)."""
    n = len(train_set["labels"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    usable_rows = {t: usable_mask(train_set, t) for t in heads}  # [N] bool each
    sums, skipped = dict.fromkeys(heads, 0.0), 0
    for batch in order.split(config.batch_size):
        optimizer.zero_grad(set_to_none=True)
        losses = {}
        for target, head in heads.items():
            index = batch[usable_rows[target][batch]]  # the batch's usable rows, in the batch's order
            if len(index) == 0:
                continue
            mask = train_set["token_mask"][index] if target == "text" else None
            prediction = head(*head_inputs(train_set, target, index))
            losses[target] = reconstruction_loss(target, prediction, truth(train_set, target, index), mask, audio_range)
        if losses:
            sum(losses.values()).backward()  # the heads share no parameters: one backward trains each on its own
            for head in heads.values():
                torch.nn.utils.clip_grad_norm_(head.parameters(), config.clip_norm)
            optimizer.step()
        else:
            skipped += 1
        for target, loss in losses.items():
            sums[target] += loss.item()
        scheduler.step()
        bar.update(1)
    return EpochLosses(sums, skipped)


def epoch_line(record: dict, config: MMRConfig) -> str:
    """The line printed after an epoch: each target's training / validation loss and its main metric."""
    train, val = record["train_loss"], record["val"]
    line = "  ".join(
        f"{t} loss {train[t]:.4f}/{val[t]['loss']:.4f} {MAIN_METRIC[t]} {val[t][MAIN_METRIC[t]]:.3f}"
        for t in config.targets
        if t in val
    )
    skipped = f"  ({record['skipped_steps']} step(s) without a usable row skipped)" if record["skipped_steps"] else ""
    return f"epoch {record['epoch']}/{config.epochs} ({record['seconds']:.0f} s)  train/val: {line}{skipped}"


def _head_configs(model, vocab: int, config: MMRConfig) -> dict[str, ReconstructionConfig]:
    return {t: reconstruction_config(model, t, vocab, **config.head) for t in config.targets}


def _config_json(config: MMRConfig) -> dict:
    """The run's options as JSON values (tuples as lists), for config.json and the resume check."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def heads_for(run: MMRRun, target: str) -> Reconstructor:
    if target not in run.heads:
        raise ValueError(f"{run.folder}: no {target} head (trained: {', '.join(run.heads)}); train it with --target")
    return run.heads[target]


def tokens_of(model, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> ids, mask [B, max_length], tokenized by the runtime and padded to the model's text length."""
    length = model.config.text.max_length
    pad_id, _ = special_ids(model, tokenizer)
    ids, mask = (torch.from_numpy(a)[:, :length] for a in tokenize(tokenizer, texts))
    return F.pad(ids, (0, length - ids.shape[1]), value=pad_id), F.pad(mask, (0, length - mask.shape[1]), value=0)
