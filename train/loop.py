"""`synergy train`: AdamW, warm-up + cosine, cached-embedding gradient accumulation, clipping, bf16 autocast on
CUDA, atomic checkpoints with exact resume, metrics JSONL, and DDP under torchrun with global negatives."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from synergy.core.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from synergy.core.config import load_config
from synergy.core.model import LOGIT_SCALE_MAX, SynergyModel
from synergy.core.tokenizer import load_pretrained_tokenizer, train_tokenizer
from synergy.kernels.contrastive import trimodal_contrastive_loss
from synergy.train.config import TrainConfig
from synergy.train.data import Collate, DataError, EpochBatches, ManifestDataset, read_manifest
from synergy.train.evaluate import evaluate

MODALITIES = ("image", "text", "audio")


def _distributed() -> tuple[int, int]:
    """(rank, world) under torchrun (gloo on CPU, nccl on CUDA); (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def build_tokenizer(model: SynergyModel, rows):
    text = model.config.text
    if text.pretrained:
        return load_pretrained_tokenizer(text.pretrained, text.max_length, model.text_tower.config.pad_token_id)
    corpus = [r.caption for r in rows if r.caption]
    corpus += [t.format(r.label) for r in rows if r.label for t in model.config.prompt_templates]
    return train_tokenizer(corpus, text.vocab_size, text.max_length)


def contrastive_loss(features, scales, masks, rank: int, world: int) -> torch.Tensor:
    """This process's share of the full-batch loss: local rows against all processes' columns (gathered with
    gradient), divided by the global count, so the sum over processes is the full-batch loss."""
    if world == 1:
        return trimodal_contrastive_loss(*features, scales, masks=masks)
    from torch.distributed.nn.functional import all_gather

    global_features = tuple(torch.cat(all_gather(f.contiguous())) for f in features)
    global_masks = []
    for m in masks:
        gathered = [torch.empty_like(m) for _ in range(world)]
        dist.all_gather(gathered, m.contiguous())
        global_masks.append(torch.cat(gathered))
    return trimodal_contrastive_loss(
        *features,
        scales,
        masks=masks,
        global_features=global_features,
        global_masks=tuple(global_masks),
        row_offset=rank * features[0].shape[0],
    )


def _inputs(batch, device):
    keys = ("pixel_values", "input_ids", "attention_mask", "waveform")
    return [batch[k].to(device, non_blocking=True) for k in keys]


def _masks(batch, device):
    return tuple(batch[f"{m}_mask"].to(device) for m in MODALITIES)


def train_step(model, batch, accumulation: int, rank: int, world: int, autocast) -> torch.Tensor:
    """Forward + backward of one global batch (this process's rows). Returns this process's loss share.

    With ``accumulation`` > 1 the embeddings are first computed without a graph, the loss and its gradient with
    respect to the embeddings are taken over the whole batch, and each micro-batch is then re-run with a graph and
    back-propagated with its slice of those gradients (GradCache): the gradient equals the full-batch one and the
    negatives stay global, at the price of one extra forward.
    """
    device = next(model.parameters()).device
    inputs, masks = _inputs(batch, device), _masks(batch, device)
    if accumulation == 1:
        with autocast():
            *features, scales = model(*inputs)
        # embeddings go in as produced (bf16 under autocast): the Triton loss accumulates in fp32 on tensor cores
        loss = contrastive_loss(features, scales, masks, rank, world)
        (loss * world).backward()  # DDP averages gradients over processes; the loss shares add up
        return loss.detach()
    chunks = [torch.tensor_split(x, accumulation) for x in inputs]
    with torch.no_grad(), autocast():
        outs = [model(*(c[i] for c in chunks)) for i in range(accumulation)]
    features = [torch.cat([o[m] for o in outs]).requires_grad_() for m in range(3)]
    scales = outs[0][3].detach().float().requires_grad_()
    loss = contrastive_loss(features, scales, masks, rank, world)
    (loss * world).backward()
    sizes = [len(c) for c in chunks[0]]
    offsets = [sum(sizes[:i]) for i in range(accumulation)]
    for i in range(accumulation):
        last = i == accumulation - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync, autocast():
            *out, out_scales = model(*(c[i] for c in chunks))
        rows = slice(offsets[i], offsets[i] + sizes[i])
        surrogate = sum((o.float() * f.grad[rows]).sum() for o, f in zip(out, features))
        surrogate = surrogate + (out_scales.float() * (scales.grad if last else torch.zeros_like(scales.grad))).sum()
        surrogate.backward()
    return loss.detach()


def _schedule(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(model: SynergyModel, config: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # gains, biases, the logit scales and embedding tables are not decayed (CLIP's recipe)
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6, fused=torch.cuda.is_available())


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train; returns the checkpoint folder (``<out>/checkpoint``)."""
    rank, world = _distributed()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(config.out)
    checkpoint = out / "checkpoint"
    torch.manual_seed(config.seed)
    rows = read_manifest(config.data)

    state = None
    if resume and checkpoint.exists():
        model, tokenizer = load_checkpoint(checkpoint)
        state = load_train_state(checkpoint)
        if state is None:
            raise DataError(f"{checkpoint}: no train_state/ to resume from; it is a final export-only checkpoint")
    elif resume:
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
    else:
        model = SynergyModel(load_config(config.model, **config.model_overrides))
        tokenizer = build_tokenizer(model, rows)
    model.to(device)
    mc = model.config
    dataset = ManifestDataset(
        rows,
        image_size=mc.image.image_size,
        mean=mc.image.mean,
        std=mc.image.std,
        sample_rate=mc.audio.sample_rate,
        clip_seconds=mc.audio.clip_seconds,
        text_mode=config.text_mode,
        templates=mc.prompt_templates,
    )
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index else None)
    sampler = EpochBatches(len(dataset), config.batch_size, config.seed, step, config.steps, rank, world)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.workers,
        collate_fn=Collate(tokenizer, mc.image.image_size, dataset.clip_samples),
        persistent_workers=False,
        prefetch_factor=4 if config.workers else None,
    )
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    )
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    # appended across resumes; open for the whole loop and closed after it
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    bar = tqdm(total=config.steps, initial=step, disable=not progress or rank != 0, unit="step", dynamic_ncols=True)
    bad_total = int(state["bad_samples"]) if state else 0
    window_start, window_samples = time.perf_counter(), 0

    def save():
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "bad_samples": bad_total,
        }
        save_checkpoint(checkpoint, model, tokenizer, train_state)

    model.train()
    for batch in loader:
        if batch["bad"]:
            bad_total += len(batch["bad"])
            if config.on_bad_sample == "error":
                raise DataError(f"bad sample: {batch['bad'][0]} (use --set on_bad_sample=skip to skip such rows)")
            for message in batch["bad"]:
                tqdm.write(f"skipping bad sample: {message}")
        optimizer.zero_grad(set_to_none=True)
        loss = train_step(ddp, batch, config.accumulation, rank, world, autocast)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=LOGIT_SCALE_MAX)
        step += 1
        if world > 1:
            dist.all_reduce(loss)
        window_samples += len(batch["labels"]) * world
        bar.update(1)
        if rank == 0:
            elapsed = time.perf_counter() - window_start
            rate = window_samples / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.0f}")
            record = {
                "step": step,
                "loss": round(loss.item(), 5),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": round(float(grad_norm), 4),
                "samples_per_s": round(rate, 2),
                "logit_scales": [round(s, 3) for s in model.logit_scales().tolist()],
                "bad_samples": bad_total,
            }
            if config.eval_every and config.val_data and step % config.eval_every == 0 and step < config.steps:
                record["val"] = evaluate(model, tokenizer, config.val_data)["zero_shot"]
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if step % config.save_every == 0 or step == config.steps:
            if rank == 0:
                save()
            if world > 1:
                dist.barrier()
    bar.close()
    if metrics is not None:
        metrics.close()
    if rank == 0 and bad_total:
        print(f"skipped {bad_total} bad sample(s) in total; see the messages above")
    if world > 1:
        dist.barrier()
    return checkpoint
