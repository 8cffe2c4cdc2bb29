"""`synergy train`: AdamW, warm-up + cosine, cached-embedding gradient accumulation, clipping, bf16 autocast on
CUDA, crash-safe checkpoints with exact resume, metrics JSONL, evaluation, and DDP under torchrun with global
negatives.

:func:`train` is the recipe, and the parts follow it down this file: the process (rank, device, process group), the
model and its state (fresh or resumed), the data, the step (GradCache with replayed randomness), the run log, the
evaluation and the save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from synergy.core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_train_state,
    recover_checkpoint,
    save_checkpoint,
)
from synergy.core.config import ConfigError, load_config
from synergy.core.model import LOGIT_SCALE_MAX, SynergyModel
from synergy.core.spec_augment import SpecAugment, audio_intra_loss
from synergy.core.tokenizer import load_pretrained_tokenizer, train_tokenizer
from synergy.kernels.contrastive import gather_features, trimodal_contrastive_loss
from synergy.runtime.prompts import fill_prompt
from synergy.train.config import TrainConfig, check_train_config
from synergy.train.data import Collate, DataError, EpochBatches, ManifestDataset, batch_for_rows, read_manifest
from synergy.train.evaluate import evaluate, format_report, write_report
from synergy.train.locked_features import lock_towers
from synergy.train.manifest_check import ManifestCheck, check_manifest
from synergy.train.seeds import stable_seed

MODALITIES = ("image", "text", "audio")
LOG_EVERY_S = 30.0  # off a terminal, one progress line this often: a bar's \r updates would fill a log file
RATE_WINDOW = 20  # steps behind samples/s: the recent speed, not a lifetime average with evaluations and saves in it
# the other ranks wait in a collective while rank 0 evaluates or saves; NCCL's default 10 minutes is too short for that
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


def train(config: TrainConfig, resume: bool = False, progress: bool = True, force: bool = False) -> Path:
    """Train; returns the checkpoint folder (``<out>/checkpoint``). ``resume``: continue from it (the same data order,
    schedule and randomness as an uninterrupted run); ``force``: replace an existing checkpoint; without either, an
    existing checkpoint is an error. With ``val_data``, the run ends with an evaluation, written to ``<out>/eval.json``
    (the report `synergy eval` writes)."""
    # on every rank alike, and before the process group exists: a refused config stops each rank on its own, never
    # one rank while another still waits at the rendezvous (it saw "connection reset by peer" instead of the error)
    check_train_config(config, int(os.environ.get("WORLD_SIZE", "1")))
    process = start_process()
    out = Path(config.out)
    checkpoint = out / "checkpoint"
    rows = read_manifest(config.data)
    model, tokenizer, state = model_and_state(config, rows, checkpoint, resume, force, process)
    check_audio_intra(config, model)
    lock_towers(model, config.lock, config.unlock_last_layers, resumed=state is not None)  # before the optimizer
    dataset = _dataset(config, model, rows)
    checks = [check_manifest(config.data, dataset)]  # before any step: wrong paths stop the run here, counted
    if config.val_data:
        checks.append(check_manifest(config.val_data, _dataset(config, model, read_manifest(config.val_data))))
    step = int(state["step"]) if state else 0
    model.to(process.device)
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.steps))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    loader = _loader(config, dataset, tokenizer, step, process)
    ddp = model
    if process.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ddp_device_ids(process.device))
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if process.device.type == "cuda"
        else contextlib.nullcontext
    )
    log = RunLog(out, config, step, process, show=progress)
    log.start(model, checks, process, resumed_from=step if state else None)
    bad_total = int(state["bad_samples"]) if state else 0
    saved = step

    def save():
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "bad_samples": bad_total,
        }
        on_rank_zero(lambda: save_checkpoint(checkpoint, model, tokenizer, train_state), process, "checkpoint save")

    model.train()
    tick = time.perf_counter()
    with StopOnInterrupt() as stop:
        for batch in loader:
            _check_batch(batch, step, config, log, process)
            record = update(ddp, model, batch, optimizer, scheduler, step, config, process, autocast, stop)
            step = record["step"]
            bad_total += record.pop("bad")
            stopping = record.pop("stop")  # agreed by every rank in the step's all_reduce: all stop at this step
            record["bad_samples"] = bad_total
            seconds, samples = time.perf_counter() - tick, len(batch["labels"]) * process.world
            final = step == config.steps
            # save before evaluating: an evaluation that fails loses no training
            if step % config.save_every == 0 or final:
                save()
                saved = step
            result = None
            if config.val_data and (final or (config.eval_every and step % config.eval_every == 0)):
                try:
                    result = evaluate_on_rank_zero(model, tokenizer, config.val_data, process, step)
                except Exception:  # raised on every rank together (the failure is shared): same collectives
                    log.step(record, seconds, samples)
                    if step > saved:
                        save()
                    log.message(f"the evaluation at step {step} failed; {checkpoint} holds step {step}")
                    log.close()
                    raise
                if result is not None:
                    record["val"] = result["zero_shot"]
                    log.message(f"step {step}: val zero-shot top-1 {_zero_shot_line(result)}")
            log.step(record, seconds, samples)
            if final and result is not None:
                report = {Path(config.val_data).stem: result}
                write_report(report, out / "eval.json")
                log.message(f"evaluation of the final model on {config.val_data}:\n{format_report(report)}")
                log.message(f"report: {out / 'eval.json'}")
            if stopping and not final:  # Ctrl-C: keep what was trained since the last save, then stop
                if step > saved:
                    save()
                log.message(f"interrupted at step {step}; {checkpoint} holds step {step}")
                log.close()
                raise KeyboardInterrupt
            tick = time.perf_counter()  # after logging, evaluation and saving: samples/s counts training only
    log.close()
    if bad_total:
        log.message(f"skipped {bad_total} bad sample(s) in total; see the messages above")
    barrier(process)
    return checkpoint


# --------------------------------------------------------------------------------------------------- the process


@dataclass(frozen=True)
class Process:
    rank: int
    world: int
    device: torch.device


def start_process() -> Process:
    """torchrun's environment -> this process's rank, world size and device; (0, 1, cuda:0 or cpu) without torchrun.
    On CUDA the device is set BEFORE the process group exists, so NCCL binds each rank to its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    rank = dist.get_rank() if world > 1 else 0
    if rank != 0:  # every process hits the same library warnings: rank 0 shows them once
        warnings.simplefilter("ignore")
    return Process(rank=rank, world=world, device=device)


def ddp_device_ids(device: torch.device) -> list[int] | None:
    """DDP's ``device_ids``: the GPU's index (0 included: a bare truth test of the index would drop GPU 0), or
    None on the CPU."""
    return [device.index] if device.type == "cuda" else None


def barrier(process: Process) -> None:
    if process.world > 1:
        dist.barrier()


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when work that only rank 0 does failed (rank 0 raises the work's own error)."""


def on_rank_zero(work, process: Process, what: str):
    """``work()`` on rank 0 -> its result there (None on the other ranks). The others wait in one all_reduce that
    carries whether it failed, so every rank runs the same collectives in the same order and a failure raises on
    every rank at once, instead of leaving the others in a barrier until the process group's timeout (60 minutes;
    STYLE rule 19). KeyboardInterrupt and the like are not caught: they end the process, and gloo/NCCL then fail the
    others' wait."""
    result, error = None, None
    if process.rank == 0:
        try:
            result = work()
        except Exception as caught:  # shared below, then raised
            error = caught
    if any_rank(error is not None, process):
        if error is not None:
            raise error
        raise RankZeroFailed(f"rank 0's {what} failed; its error is in rank 0's output")
    return result


def any_rank(flag: bool, process: Process) -> bool:
    """Whether ``flag`` is true on any rank; a collective: every rank must call it at the same point."""
    if process.world == 1:
        return flag
    value = torch.tensor([float(flag)], device=process.device)
    dist.all_reduce(value)
    return value.item() > 0


# ---------------------------------------------------------------------------------------- the model and its state


def build_tokenizer(model: SynergyModel, rows):
    text = model.config.text
    if text.pretrained:
        return load_pretrained_tokenizer(text.pretrained, text.max_length, model.text_tower.config.pad_token_id)
    corpus = [r.caption for r in rows if r.caption]
    corpus += [fill_prompt(t, r.label) for r in rows if r.label for t in model.config.prompt_templates]
    return train_tokenizer(corpus, text.vocab_size, text.max_length)


def model_and_state(config: TrainConfig, rows, checkpoint: Path, resume: bool, force: bool, process: Process):
    """-> (model, tokenizer, train state or None). Resuming loads all three from ``checkpoint``, after putting back
    the last complete checkpoint if a save was killed; a fresh run refuses to replace a checkpoint unless forced."""
    # no rank reads the checkpoint while rank 0 may still be renaming it back
    on_rank_zero(lambda: recover_checkpoint(checkpoint), process, f"recovery of {checkpoint}")
    if resume:
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
        model, tokenizer = load_checkpoint(checkpoint)
        state = load_train_state(checkpoint)
        if state is None:
            raise DataError(f"{checkpoint}: no train_state/ to resume from; it is a final export-only checkpoint")
        return model, tokenizer, state
    if checkpoint.is_dir() and not force:
        raise CheckpointError(
            f"{checkpoint} already holds a checkpoint; continue it with --resume, replace it with --force, or "
            "choose another folder with --set out=DIR"
        )
    torch.manual_seed(config.seed)  # the initial weights are a function of the seed
    model = SynergyModel(load_config(config.model, **config.model_overrides))
    return model, build_tokenizer(model, rows), None


def check_audio_intra(config: TrainConfig, model: SynergyModel) -> None:
    """``audio_intra_weight`` masks the log-mel (SpecAugment), which only AST's front end has: with a wav2vec2 /
    HuBERT or aisfx tower it is refused before any step, naming the tower's family."""
    if config.audio_intra_weight and model.audio_family != "ast":
        raise ConfigError(
            f"audio_intra_weight={config.audio_intra_weight}: its SpecAugment copies need AST's log-mel front end, "
            f"and this audio tower is {model.audio_family}; set audio_intra_weight=0"
        )


def _optimizer(model: SynergyModel, config: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # gains, biases, the logit scales and embedding tables are not decayed (CLIP's recipe)
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6, fused=torch.cuda.is_available())


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LambdaLR's factor at ``step``: a linear warm-up over ``warmup_steps``, then a cosine to 0 at ``total_steps``
    (held at 0 after it). `synergy train` and `synergy mmr train` both schedule with it."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ------------------------------------------------------------------------------------------------------- the data


def _dataset(config: TrainConfig, model: SynergyModel, rows) -> ManifestDataset:
    # a locked tower sees evaluation's input (no random crops), so its feature cache hits from the second epoch on
    fixed = [name for name, unlocked in model.locked.items() if not unlocked]
    return ManifestDataset.for_model(
        rows, model.config, text_mode=config.text_mode, unaugmented=fixed, speed_perturb=config.audio_speed_perturb
    )


def _loader(config: TrainConfig, dataset: ManifestDataset, tokenizer, start_step: int, process: Process):
    """Batches from ``start_step`` on: a pure function of (seed, step), so a resumed run sees what it would have."""
    batch_size = batch_for_rows(config.batch_size, len(dataset), process.world * config.accumulation)
    sampler = EpochBatches(len(dataset), batch_size, config.seed, start_step, config.steps, process.rank, process.world)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.workers,
        collate_fn=Collate(tokenizer, dataset.image_size, dataset.clip_samples),
        persistent_workers=False,
        prefetch_factor=4 if config.workers else None,
    )


def _check_batch(batch, step: int, config: TrainConfig, log: RunLog, process: Process) -> None:
    """Bad samples are reported (or stop the run); a global batch in which no row has two usable modalities stops
    the run, since its loss would be a silent 0. Every rank decides from the same all_reduce, so a bad sample on one
    rank stops them all here, none left waiting in the step's collectives."""
    stop_here = bool(batch["bad"]) and config.on_bad_sample == "error"
    usable = sum(batch[f"{m}_mask"].long() for m in MODALITIES) >= 2  # [b]: the row gives the loss a pair
    counts = torch.stack([usable.sum(), torch.tensor(int(stop_here))]).to(process.device)  # [usable rows, stops]
    if process.world > 1:
        dist.all_reduce(counts)  # another rank's rows are negatives here too: only the global count matters
    if stop_here:
        raise DataError(f"bad sample: {batch['bad'][0]} (use --set on_bad_sample=skip to skip such rows)")
    if counts[1].item() > 0:
        raise DataError(
            f"step {step + 1}: another process stopped on a bad sample (on_bad_sample=error); its error names it"
        )
    for message in batch["bad"]:
        log.message(f"skipping bad sample: {message}")
    if counts[0].item() == 0:
        raise DataError(
            f"step {step + 1}: no row of the batch has two usable modalities ({len(batch['bad'])} bad sample(s) "
            "here); its loss would be 0. Check the manifest (paths are relative to the CSV's folder) or raise "
            "batch_size"
        )


# -------------------------------------------------------------------------------------------------------- the step


def contrastive_loss(features, scales, masks, rank: int, world: int) -> torch.Tensor:
    """This process's share of the full-batch loss: local rows against all processes' columns (gathered with
    gradient), divided by the global count, so the sum over processes is the full-batch loss."""
    if world == 1:
        return trimodal_contrastive_loss(*features, scales, masks=masks)
    global_features, global_masks = gather_features(tuple(features), masks)
    return trimodal_contrastive_loss(
        *features,
        scales,
        masks=masks,
        global_features=global_features,
        global_masks=global_masks,
        row_offset=rank * features[0].shape[0],
    )


def _inputs(batch, device):
    keys = ("pixel_values", "input_ids", "attention_mask", "waveform", "waveform_lengths")
    return [batch[k].to(device, non_blocking=True) for k in keys]


def _masks(batch, device):
    return tuple(batch[f"{m}_mask"].to(device) for m in MODALITIES)


@dataclass(frozen=True)
class RandomState:
    """The CPU and (on CUDA) the device generator's state: taken before a micro-batch's no-grad forward and put back
    before its re-forward, so dropout drops the same units in both and the cached gradients fit the graph."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@contextlib.contextmanager
def kept_log_mel(model, keep: bool = True):
    """Inside: the log-mels the audio front end computes in ``model``'s forwards, appended to the list it yields, so
    that the intra-audio SpecAugment copy starts from the forward's own log-mel instead of running the front end
    (framing, DFT, mel, log) a second time. The front end has no trainable weights: the same waveform gives the same
    log-mel. ``keep=False``: nothing is kept (the list stays empty)."""
    encoder = getattr(model, "module", model)  # DDP: its forward runs the wrapped model's front end
    kept: list[torch.Tensor] = []
    handle = encoder.audio_frontend.register_forward_hook(lambda module, args, out: kept.append(out)) if keep else None
    try:
        yield kept
    finally:
        if handle is not None:
            handle.remove()


def audio_copies(model, inputs, log_mel: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's clips through the audio tower again with SpecAugment on the log-mel (inside the model, so on the
    GPU): [B, D], for CLIP4VLA's intra-audio NT-Xent. Masks sized as AST's AudioSet recipe (48 of 128 mel bins,
    192 of 1024 frames), scaled to the model's geometry. ``log_mel``: [B, frames, mels], the front end's output for
    these clips when the forward already computed it (:func:`kept_log_mel`); None runs the front end here."""
    encoder = getattr(model, "module", model)  # DDP: the same parameters, their gradients reduced with the rest
    a = encoder.config.audio
    masks = (1, max(1, a.n_mels * 48 // 128), 1, max(1, a.num_frames * 192 // 1024))
    augment = SpecAugment(*masks, fill=encoder.audio_frontend.padding_value)
    if log_mel is None:
        return encoder.encode_audio(inputs[3], inputs[4], augment=augment)
    # encode_audio's augmented path after its front end (the same masks from the same draws; a test holds them equal)
    lengths, frames = inputs[4], None
    if lengths is not None:
        frames = (encoder.audio_frontend.frame_ends[None, :] <= lengths[:, None]).sum(-1)  # [B] real frames per row
    return F.normalize(encoder.audio_projection(encoder.audio_features(augment(log_mel, frames))), dim=-1)


def train_step(
    model, batch, accumulation: int, rank: int, world: int, autocast, audio_intra_weight: float = 0.0
) -> torch.Tensor:
    """Forward + backward of one global batch (this process's rows). Returns this process's loss share.

    With ``accumulation`` > 1 the embeddings are first computed without a graph, the loss and its gradient with
    respect to the embeddings are taken over the whole batch, and each micro-batch is then re-run with a graph, with
    the random state of its first pass, and back-propagated with its slice of those gradients (GradCache): the
    gradient equals that of the whole batch with the same dropout, the negatives stay global, at the price of one
    extra forward.

    ``audio_intra_weight`` > 0 adds CLIP4VLA's intra-audio term: weight x NT-Xent between each clip and its
    SpecAugment copy (``core.spec_augment``), negatives from this process's rows, its share divided by ``world``.
    """
    device = next(model.parameters()).device
    inputs, masks = _inputs(batch, device), _masks(batch, device)
    if accumulation == 1:
        with autocast(), kept_log_mel(model, keep=audio_intra_weight > 0) as log_mel:
            *features, scales = model(*inputs)
            copies = audio_copies(model, inputs, log_mel[0]) if audio_intra_weight else None
        # embeddings go in as produced (bf16 under autocast): the Triton loss accumulates in fp32 on tensor cores
        loss = contrastive_loss(features, scales, masks, rank, world)
        if copies is not None:
            loss = loss + audio_intra_weight * audio_intra_loss(features[2], copies, masks[2]) / world
        (loss * world).backward()  # DDP averages gradients over processes; the loss shares add up
        return loss.detach()
    chunks = [torch.tensor_split(x, accumulation) for x in inputs]
    states, outs = [], []
    with torch.no_grad(), autocast(), kept_log_mel(model, keep=audio_intra_weight > 0) as log_mel:
        for i in range(accumulation):
            states.append(RandomState.capture(device))
            outs.append(model(*(c[i] for c in chunks)))
            if audio_intra_weight:  # drawn right after the forward, in the same order in the re-forward
                outs[-1] = (*outs[-1], audio_copies(model, [c[i] for c in chunks], log_mel[-1]))
    after = RandomState.capture(device)
    features = [torch.cat([o[m] for o in outs]).requires_grad_() for m in range(3)]
    scales = outs[0][3].detach().float().requires_grad_()
    loss = contrastive_loss(features, scales, masks, rank, world)
    copies = torch.cat([o[4] for o in outs]).requires_grad_() if audio_intra_weight else None
    if copies is not None:
        loss = loss + audio_intra_weight * audio_intra_loss(features[2], copies, masks[2]) / world
    (loss * world).backward()
    sizes = [len(c) for c in chunks[0]]
    offsets = [sum(sizes[:i]) for i in range(accumulation)]
    for i in range(accumulation):
        last = i == accumulation - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        states[i].restore()
        with sync, autocast(), kept_log_mel(model, keep=copies is not None) as log_mel:
            *out, out_scales = model(*(c[i] for c in chunks))
            copy = audio_copies(model, [c[i] for c in chunks], log_mel[0]) if copies is not None else None
        rows = slice(offsets[i], offsets[i] + sizes[i])
        surrogate = sum((o.float() * f.grad[rows]).sum() for o, f in zip(out, features))
        if copy is not None:
            surrogate = surrogate + (copy.float() * copies.grad[rows]).sum()
        surrogate = surrogate + (out_scales.float() * (scales.grad if last else torch.zeros_like(scales.grad))).sum()
        surrogate.backward()
    after.restore()  # the generators end where the cached pass left them, as if each micro-batch ran once
    return loss.detach()


def update(
    ddp, model, batch, optimizer, scheduler, step: int, config: TrainConfig, process: Process, autocast, stop=None
):
    """Step ``step`` -> ``step + 1`` on one global batch: forward, backward, clip, AdamW, schedule. -> the step's
    metrics record (with ``bad``, the bad samples of the batch over all ranks, and ``stop``: whether any rank's
    ``stop`` (a :class:`StopOnInterrupt`) was requested by the time of the step's all_reduce)."""
    # dropout draws from a generator seeded by (seed, step, rank): an exact resume needs no saved RNG state
    torch.manual_seed(stable_seed(config.seed, step, process.rank))
    optimizer.zero_grad(set_to_none=True)
    loss = train_step(ddp, batch, config.accumulation, process.rank, process.world, autocast, config.audio_intra_weight)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(max=LOGIT_SCALE_MAX)
    # the flag is read once, here, and only the reduced value is used: a Ctrl-C that lands on one rank after its
    # reduce counts at the next step on every rank, so no rank stops a step before another (mismatched collectives)
    loss, bad, stopping = _reduce(loss, len(batch["bad"]), stop is not None and stop.requested, process)
    return {
        "step": step + 1,
        "loss": round(loss, 5),
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": round(float(grad_norm), 4),
        "logit_scales": [round(s, 3) for s in model.logit_scales().tolist()],
        "bad": bad,
        "stop": stopping,
    }


def _reduce(loss: torch.Tensor, bad: int, stop: bool, process: Process) -> tuple[float, int, bool]:
    """(the full-batch loss, bad samples over all ranks, whether any rank asked to stop): one all_reduce carries
    the three (sums; a stop count above 0 is a stop)."""
    if process.world == 1:
        return loss.item(), bad, stop
    counts = torch.tensor([float(bad), float(stop)], device=loss.device)
    stats = torch.cat([loss.float().reshape(1), counts])  # [3]
    dist.all_reduce(stats)
    return stats[0].item(), int(stats[1].item()), stats[2].item() > 0


class StopOnInterrupt:
    """Ctrl-C (SIGINT) asks the loop to stop at the end of the current step, so the checkpoint saved then is never
    torn between an optimizer update and the step count; a second Ctrl-C interrupts at once. Off the main thread
    (where no handler can be installed) Ctrl-C keeps its default.

    One press can arrive twice: under torchrun the terminal signals every worker, and torchrun's agent, on its own
    SIGINT, sends each worker SIGINT again (then SIGKILL after 30 s). A SIGINT within ``SAME_PRESS_S`` of the first
    is that echo, not a second press."""

    SAME_PRESS_S = 2.0

    def __init__(self):
        self.first, self.previous = None, None  # first: time.monotonic() of the first SIGINT

    @property
    def requested(self) -> bool:
        return self.first is not None

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.first is None:
            self.first = now
        elif now - self.first > self.SAME_PRESS_S:
            raise KeyboardInterrupt

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# ------------------------------------------------------------------------------------------------------ the run log


class RecentRate:
    """Samples per second over the last ``window`` steps."""

    def __init__(self, window: int = RATE_WINDOW):
        self.steps: deque[tuple[float, int]] = deque(maxlen=window)

    def add(self, seconds: float, samples: int) -> None:
        self.steps.append((seconds, samples))

    @property
    def per_second(self) -> float:
        seconds = sum(s for s, _ in self.steps)
        return sum(n for _, n in self.steps) / seconds if seconds > 0 else 0.0


def cut_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (the restored checkpoint's), so a resumed run appends from there and no
    step appears twice; a torn last line (a kill mid-write) goes too. Replaced through a renamed temp file."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLog:
    """Rank 0's account of the run: ``train_config.json``, ``metrics.jsonl`` (cut back to the starting step), a
    tqdm bar on a terminal or a plain line every ``LOG_EVERY_S`` seconds elsewhere, and messages; other ranks are
    silent."""

    def __init__(self, out: Path, config: TrainConfig, start_step: int, process: Process, show: bool):
        self.main, self.total, self.config = process.rank == 0, config.steps, config
        self.show = show and self.main
        self.interactive = self.show and sys.stderr.isatty()
        self.rate = RecentRate()
        self.last_line = -math.inf
        self.metrics = None
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
            cut_metrics(out / "metrics.jsonl", start_step)
            self.metrics = open(out / "metrics.jsonl", "a")  # noqa: SIM115 - open for the loop, closed by close()
        self.bar = tqdm(
            total=config.steps,
            initial=start_step,
            disable=not self.interactive,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def message(self, text: str) -> None:
        if self.show:
            tqdm.write(text)

    def start(self, model: SynergyModel, checks: list[ManifestCheck], process: Process, resumed_from) -> None:
        """The start-of-run summary: what is trained, on what, how, and where to."""
        c = self.config
        lines = [f"training {c.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)"]
        for split, check in zip(("train", "val"), checks):
            missing = ", ".join(f"{m} {n}" for m, n in check.missing.items() if n)
            lines.append(
                f"  {split}: {check.path}, {check.readable} of {check.rows} rows readable"
                + (f" (missing modalities: {missing})" if missing else "")
            )
        lines.append(
            f"  {c.steps} steps x batch {c.batch_size}"
            + (f" in {c.accumulation} micro-batches" if c.accumulation > 1 else "")
            + f" on {process.world} x {process.device}; output {c.out}"
            + (f"; resuming from step {resumed_from}" if resumed_from is not None else "")
        )
        self.message("\n".join(lines))

    def step(self, record: dict, seconds: float, samples: int) -> None:
        if not self.main:
            return
        self.rate.add(seconds, samples)
        record["samples_per_s"] = round(self.rate.per_second, 2)
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{self.rate.per_second:.0f}", refresh=False)
        now = time.perf_counter()
        if self.show and not self.interactive and (now - self.last_line >= LOG_EVERY_S or record["step"] == self.total):
            self.last_line = now
            print(
                f"step {record['step']}/{self.total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"{self.rate.per_second:.1f} samples/s",
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


# ------------------------------------------------------------------------------------------------- the evaluation


def evaluate_on_rank_zero(model: SynergyModel, tokenizer, val_data: str, process: Process, step: int) -> dict | None:
    """Rank 0 evaluates the unwrapped model (no DDP collectives inside) while the other ranks wait for it in
    :func:`on_rank_zero`'s all_reduce, not inside the next step's all_gather; a failure raises on every rank."""
    what = f"evaluation of {val_data} at step {step}"
    return on_rank_zero(lambda: evaluate(model, tokenizer, val_data), process, what)


def _zero_shot_line(result: dict) -> str:
    return ", ".join(f"{task} {value['top1']:.1f}%" for task, value in result["zero_shot"].items()) or "no rows"
