"""Training: loader on generated files, bad samples, a run whose loss falls, exact resume, GradCache accumulation
equivalence, DDP equivalence (2 real gloo processes), evaluation and CLI smoke tests. Tiny preset throughout."""

import contextlib
import copy
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner

from synergy.cli import main
from synergy.core.checkpoint import CheckpointError, load_checkpoint
from synergy.core.config import ConfigError
from synergy.core.model import create_model
from synergy.kernels.contrastive import trimodal_contrastive_loss
from synergy.train.config import TrainConfig, check_train_config, load_train_config
from synergy.train.data import Collate, DataError, EpochBatches, ManifestDataset, read_manifest
from synergy.train.datasets.synth import synthesize
from synergy.train.evaluate import evaluate
from synergy.train.loop import RecentRate, _inputs, _masks, build_tokenizer, ddp_device_ids, train, train_step
from synergy.train.seeds import stable_seed


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=1, train_per_class=3, val_per_class=1, heldout_per_class=1, missing_rate=0.2)
    return out


def _config(synth, out, **kw):
    base = dict(
        model="tiny",
        data=str(synth / "train.csv"),
        val_data=None,
        out=str(out),
        batch_size=8,
        steps=6,
        lr=2e-3,
        warmup_steps=2,
        workers=0,
        save_every=3,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def _dataset(model, rows, text_mode="mixed"):
    c = model.config
    return ManifestDataset(
        rows,
        image_size=c.image.image_size,
        mean=c.image.mean,
        std=c.image.std,
        sample_rate=c.audio.sample_rate,
        clip_seconds=c.audio.clip_seconds,
        text_mode=text_mode,
        templates=c.prompt_templates,
    )


def test_loader_on_generated_files(synth):
    model = create_model("tiny")
    rows = read_manifest(synth / "train.csv")
    tokenizer = build_tokenizer(model, rows)
    dataset = _dataset(model, rows)
    sampler = EpochBatches(len(dataset), 7, seed=0, start_step=0, total_steps=2)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=1, collate_fn=Collate(tokenizer, 30, dataset.clip_samples)
    )
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    assert b["pixel_values"].shape == (7, 3, 30, 30) and b["waveform"].shape == (7, 8000)
    assert b["input_ids"].shape[0] == 7 and b["input_ids"].shape[1] <= 13
    assert b["input_ids"][:, 0].eq(tokenizer.token_to_id("<s>")).all()
    for name in ("image", "audio"):  # a missing modality is a zero row with its mask off
        missing = ~b[f"{name}_mask"]
        key = "pixel_values" if name == "image" else "waveform"
        assert b[key][missing].abs().sum() == 0
    assert not any(b["bad"])
    # same (seed, step) -> same batch, in the same order, with the same augmentation
    again = next(
        iter(
            torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, num_workers=0, collate_fn=Collate(tokenizer, 30, dataset.clip_samples)
            )
        )
    )
    assert torch.equal(again["pixel_values"], b["pixel_values"]) and again["indices"] == b["indices"]


def test_missing_rows_in_manifest_are_masked(synth):
    rows = read_manifest(synth / "train.csv")
    assert any(r.image is None for r in rows) or any(r.audio is None for r in rows)
    assert not any(r.image is None and r.audio is None for r in rows)


def test_bad_samples_name_path_and_line(tmp_path, synth):
    rows = read_manifest(synth / "train.csv")
    good = next(r for r in rows if r.image and r.audio)
    (tmp_path / "empty.wav").write_bytes(b"")
    soundfile.write(tmp_path / "zero.wav", np.zeros((0,), np.float32), 16000)
    (tmp_path / "noise.wav").write_bytes(b"RIFF....not a wav at all")
    lines = ["img_path,wav_path,label,caption", f"{good.image},{good.audio},red circle,a red circle"]
    lines += [
        f"{good.image},{name},red circle,a red circle" for name in ("missing.wav", "empty.wav", "zero.wav", "noise.wav")
    ]
    lines += [f"nothing.png,{good.audio},red circle,x"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    model = create_model("tiny")
    dataset = _dataset(model, read_manifest(tmp_path / "m.csv"))
    samples = [dataset[i] for i in range(len(dataset))]
    assert samples[0]["bad"] is None
    messages = [s["bad"] for s in samples[1:]]
    assert "missing.wav: no such file; check the path (manifest line 3)" in messages[0]
    assert "manifest line 4" in messages[1] and "empty.wav" in messages[1]
    assert "0 frames" in messages[2] and "manifest line 5" in messages[2]
    assert "noise.wav" in messages[3] and "manifest line 6" in messages[3]
    assert "nothing.png: no such file; check the path (manifest line 7)" in messages[4]
    batch = Collate(build_tokenizer(model, dataset.rows), 30, dataset.clip_samples)(samples)
    assert batch["image_mask"].tolist() == [True] + [False] * 5 and len(batch["bad"]) == 5


def test_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="manifest not found; check the path"):
        read_manifest(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("image,audio\n")
    with pytest.raises(DataError, match="missing column"):
        read_manifest(tmp_path / "bad.csv")


def test_training_loss_falls_and_the_run_ends_with_its_evaluation(tmp_path, synth, capsys):
    val = synth / "val.csv"
    config = _config(synth, tmp_path / "run", steps=24, batch_size=16, lr=3e-3, save_every=100, val_data=str(val))
    checkpoint = train(config)  # progress on, and the captured output is no terminal
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    first, last = np.mean([r["loss"] for r in records[:4]]), np.mean([r["loss"] for r in records[-4:]])
    assert last < first - 0.3, (first, last)
    assert load_checkpoint(checkpoint)[0].config.embed_dim == 24
    # eval_every=0 promises an evaluation at the end: the report `synergy eval` writes, beside the checkpoint
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["val"]["zero_shot"] == records[-1]["val"] and report["val"]["rows"] == len(read_manifest(val))
    # the reported numbers are the saved model's: recomputed row by row from the checkpoint, they are equal (on the
    # training rows too, where top-5 has enough hits for a mislabelled or misaligned row to change a number)
    model, tokenizer = load_checkpoint(checkpoint)
    assert _check_zero_shot(report["val"]["zero_shot"], model, tokenizer, val) <= 5  # (row, k) pairs left to ties
    on_train_rows = evaluate(model, tokenizer, synth / "train.csv")["zero_shot"]
    assert _check_zero_shot(on_train_rows, model, tokenizer, synth / "train.csv") <= 5
    assert sum(value["top5"] for value in on_train_rows.values()) > 0
    captured = capsys.readouterr()
    assert "evaluation of the final model" in captured.out and "audio -> label" in captured.out
    assert "step 24: val zero-shot top-1 audio" in captured.out
    # off a terminal: plain progress lines (the first and the last step at least), no carriage-return bar
    assert "\r" not in captured.err + captured.out
    assert "step 24/24  loss" in captured.out and captured.out.count("/24  loss") <= 24
    assert "training tiny (" in captured.out and "steps x batch 16" in captured.out  # the start-of-run summary


@torch.no_grad()
def _embed_row_by_row(model, tokenizer, csv_path):
    """Apart from train.evaluate: one label's prompts and one manifest row at a time (no batching, no masks to line
    up). -> (label of each row, the sorted labels, their prompt-ensemble embeddings [K, D], each row's
    {"image"|"audio"|"text": [D]} for the modalities it has; audio: every window, their mean re-normalised)."""
    from synergy.runtime.text import tokenize

    normalize = torch.nn.functional.normalize
    model.eval()
    rows = read_manifest(csv_path)
    labels = sorted({row.label for row in rows})
    classes = []
    for label in labels:
        ids, mask = tokenize(tokenizer, [t.format(label) for t in model.config.prompt_templates])
        classes.append(normalize(model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).mean(0), dim=-1))
    dataset = ManifestDataset.for_model(rows, model.config, text_mode="caption")
    collate = Collate(tokenizer, model.config.image.image_size, dataset.clip_samples)
    embedded = []
    for i in range(len(rows)):
        batch, row = collate([dataset[i]]), {}
        if batch["image_mask"][0]:
            row["image"] = model.encode_image(batch["pixel_values"])[0]
        if batch["audio_mask"][0]:
            row["audio"] = normalize(model.encode_audio(batch["waveform"], batch["waveform_lengths"]).sum(0), dim=-1)
        if batch["text_mask"][0]:
            row["text"] = model.encode_text(batch["input_ids"], batch["attention_mask"])[0]
        embedded.append(row)
    return [row.label for row in rows], labels, torch.stack(classes), embedded


FLOAT_NOISE = 1e-5  # cosines batched vs one row at a time differ by ~1e-7; a closer pair is a tie either way


def _hit_range(scores: torch.Tensor, own: int, k: int) -> tuple[bool, bool]:
    """(certainly in the top k, possibly in the top k): keys within FLOAT_NOISE of the own key's score may rank
    either side of it (an untrained text tower gives labels exactly equal embeddings)."""
    better = (scores > scores[own] + FLOAT_NOISE).sum().item()
    tied = ((scores - scores[own]).abs() <= FLOAT_NOISE).sum().item() - 1
    return better + tied < k, better < k


def _percent_range(hits: list[tuple[bool, bool]]) -> tuple[float, float]:
    return (round(100 * sum(c for c, _ in hits) / len(hits), 2), round(100 * sum(p for _, p in hits) / len(hits), 2))


def _check_zero_shot(reported: dict, model, tokenizer, csv_path) -> int:
    """Each reported zero-shot top-1 / top-5 lies in the range recomputed row by row (:func:`_embed_row_by_row`), and
    ``n`` is the count of rows with the query. -> how many rows the recomputation could not decide (ties)."""
    row_labels, labels, classes, embedded = _embed_row_by_row(model, tokenizer, csv_path)
    undecided = 0
    for name in ("audio", "image", "audio+image"):
        hits = {1: [], 5: []}
        for label, row in zip(row_labels, embedded):
            if name == "audio+image" and "audio" in row and "image" in row:
                row = {**row, name: torch.nn.functional.normalize(row["audio"] + row["image"], dim=-1)}
            if name in row:
                for k in hits:
                    hits[k].append(_hit_range(classes @ row[name], labels.index(label), k))
        assert reported[name]["n"] == len(hits[1]), name
        for k, found in hits.items():
            low, high = _percent_range(found)
            assert low <= reported[name][f"top{k}"] <= high, (name, k, reported[name], low, high)
            undecided += sum(c != p for c, p in found)
    return undecided


def test_a_manifest_with_wrong_paths_stops_before_step_one(tmp_path, synth):
    """Every path wrong (the CSV moved away from its files): a count and the rule for paths, no step, no checkpoint."""
    (tmp_path / "moved.csv").write_text((synth / "train.csv").read_text())
    rows = len(read_manifest(synth / "train.csv"))
    config = _config(synth, tmp_path / "run", data=str(tmp_path / "moved.csv"))
    with pytest.raises(
        DataError, match=rf"(?s)moved.csv: {rows} of {rows} rows cannot be read \(100%.*relative to the CSV"
    ):
        train(config, progress=False)
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_batch_without_any_pair_is_never_a_silent_zero_loss(tmp_path, synth):
    """Rows that each hold one modality (image only, audio only, text only): the loss has nothing to compare."""
    rows = read_manifest(synth / "train.csv")
    image, audio = next(r.image for r in rows if r.image), next(r.audio for r in rows if r.audio)
    lines = ["img_path,wav_path,label,caption"] + [f"{image},,,", f",{audio},,", ",,red circle,a red circle"] * 4
    (tmp_path / "single.csv").write_text("\n".join(lines) + "\n")
    config = _config(synth, tmp_path / "run", data=str(tmp_path / "single.csv"))
    with pytest.raises(DataError, match="step 1: no row of the batch has two usable modalities"):
        train(config, progress=False)


def test_on_bad_sample_error_stops_with_the_message(tmp_path, synth):
    lines = (synth / "train.csv").read_text().splitlines()
    lines[1] = "images/nope.png," + lines[1].split(",", 1)[1]
    (synth / "broken.csv").write_text("\n".join(lines) + "\n")
    try:
        config = _config(
            synth,
            tmp_path / "run",
            data=str(synth / "broken.csv"),
            on_bad_sample="error",
            steps=8,
            batch_size=len(lines) - 1,
        )
        with pytest.raises(DataError, match=r"nope.png: no such file; check the path \(manifest line 2\)"):
            train(config, progress=False)
    finally:
        (synth / "broken.csv").unlink()


def test_ctrl_c_saves_and_the_resume_gives_the_same_weights(tmp_path, synth, monkeypatch, capsys):
    """A real SIGINT in the middle of step 5 (no save due until step 6): the trainer finishes step 5, saves it and
    stops; --resume continues with the same data and randomness and ends on the uninterrupted run's weights."""
    straight = train(_config(synth, tmp_path / "a", save_every=100), progress=False)

    import synergy.train.loop as loop

    real_step, calls = loop.train_step, []

    def step_then_interrupt(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt in this thread, as Ctrl-C does
        return loss

    monkeypatch.setattr(loop, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(_config(synth, tmp_path / "b", save_every=100))
    assert "interrupted at step 5" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "checkpoint" / "train_state" / "state.pt", weights_only=True)["step"] == 5
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train(_config(synth, tmp_path / "b", save_every=100), resume=True, progress=False)
    a, _ = load_checkpoint(straight)
    b, _ = load_checkpoint(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.requires_cuda
def test_training_on_cuda_evaluates_during_and_after_the_run(tmp_path, synth):
    """bf16 autocast, GradCache with the CUDA generator, evaluation of a model on the GPU (eval_every and at the end)
    and a checkpoint saved from device tensors."""
    config = _config(synth, tmp_path / "run", steps=4, eval_every=2, accumulation=2, val_data=str(synth / "val.csv"))
    checkpoint = train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val" in r] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["val"]["zero_shot"] == records[-1]["val"]
    load_checkpoint(checkpoint)


def test_an_existing_checkpoint_is_not_replaced_without_resume_or_force(tmp_path, synth):
    train(_config(synth, tmp_path / "run", steps=2), progress=False)
    before = (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a checkpoint; continue it with --resume, replace it"):
        train(_config(synth, tmp_path / "run", steps=1, seed=4), progress=False)
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes() == before
    train(_config(synth, tmp_path / "run", steps=1, seed=4), progress=False, force=True)
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes() != before
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # the replaced run's metrics went with it
    with pytest.raises(ConfigError, match="no training data: set `data`"):
        train(_config(synth, tmp_path / "other", data=None), progress=False)


def _batch(synth, b=8):
    model = create_model("tiny")
    rows = read_manifest(synth / "train.csv")
    tokenizer = build_tokenizer(model, rows)
    dataset = _dataset(model, rows)
    samples = [dataset[(i, i)] for i in range(b)]
    return Collate(tokenizer, 30, dataset.clip_samples)(samples)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_full_batch(synth):
    torch.manual_seed(0)
    batch = _batch(synth)
    full = create_model("tiny")
    accumulated = copy.deepcopy(full)
    loss_full = train_step(full, batch, 1, 0, 1, contextlib.nullcontext)
    loss_acc = train_step(accumulated, batch, 3, 0, 1, contextlib.nullcontext)  # uneven micro-batches: 3, 3, 2
    torch.testing.assert_close(loss_full, loss_acc)
    a, b = _grads(full), _grads(accumulated)
    assert a.keys() == b.keys() and "logit_scale" in a
    for name in a:  # the same sums in another order: fp32 rounding, relative to each tensor's scale
        # k_proj biases get a zero gradient in exact arithmetic (softmax ignores a per-query shift): their values
        # are rounding noise, hence the absolute floor, as in the DDP check below
        torch.testing.assert_close(a[name], b[name], atol=1e-5 * a[name].abs().max().item() + 1e-6, rtol=1e-4, msg=name)


def _with_dropout(model, p=0.1):
    """A pretrained RoBERTa keeps hidden (and attention) dropout 0.1; the tiny preset has none."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    return model


def _micro_batch_reference(model, batch, accumulation):
    """The gradient GradCache must equal: the same micro-batch forwards (so the same dropout draws), all kept in
    one graph, one loss over the whole batch, one backward."""
    device = next(model.parameters()).device
    inputs, masks = _inputs(batch, device), _masks(batch, device)
    chunks = [torch.tensor_split(x, accumulation) for x in inputs]
    outs = [model(*(c[i] for c in chunks)) for i in range(accumulation)]
    features = [torch.cat([o[m] for o in outs]) for m in range(3)]
    loss = trimodal_contrastive_loss(*features, outs[0][3], masks=masks)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.requires_cuda)])
def test_gradient_accumulation_with_dropout_replays_the_random_state(synth, device):
    """CPU: the CPU generator; CUDA: dropout draws from the device's generator, replayed the same way."""
    torch.manual_seed(0)
    batch = _batch(synth)
    reference = _with_dropout(create_model("tiny")).to(device).train()
    accumulated, other_seed = copy.deepcopy(reference), copy.deepcopy(reference)
    torch.manual_seed(11)
    loss_reference = _micro_batch_reference(reference, batch, 3)
    torch.manual_seed(11)
    loss_accumulated = train_step(accumulated, batch, 3, 0, 1, contextlib.nullcontext)
    after = torch.rand(1, device=device)
    torch.manual_seed(11)
    _micro_batch_reference(copy.deepcopy(reference), batch, 3)
    assert torch.equal(after, torch.rand(1, device=device))  # the generator ends where one pass per micro-batch would
    torch.manual_seed(12)
    _micro_batch_reference(other_seed, batch, 3)
    a, b, c = _grads(reference), _grads(accumulated), _grads(other_seed)
    # the test can fail: other dropout draws give another gradient
    assert any(not torch.allclose(a[n], c[n], atol=1e-5, rtol=1e-3) for n in a)
    torch.testing.assert_close(loss_accumulated, loss_reference)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5 * a[name].abs().max().item() + 1e-6, rtol=1e-4, msg=name)


DDP_WORKER = """
import contextlib, sys, torch
from synergy.core.model import create_model
from synergy.train.loop import start_process, train_step

torch.set_num_threads(1)
process = start_process()  # torchrun's environment -> gloo process group
rank, world = process.rank, process.world
inputs = torch.load(sys.argv[1], weights_only=False)
model = create_model("tiny")
model.load_state_dict(inputs["state"])
ddp = torch.nn.parallel.DistributedDataParallel(model)
batch, b = inputs["batch"], len(inputs["batch"]["labels"]) // world
local = {k: v[rank * b : (rank + 1) * b] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}
results = {}
for accumulation in inputs.get("accumulations", (1, 3)):  # 3 micro-batches of this rank's 4 rows: 2, 1, 1
    model.zero_grad(set_to_none=True)
    torch.manual_seed(100 + rank)  # this rank's SpecAugment draws (intra-audio term): the test replays them
    loss = train_step(ddp, local, accumulation, rank, world, contextlib.nullcontext, inputs.get("intra", 0.0))
    torch.distributed.all_reduce(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    results[accumulation] = {"loss": loss, "grads": grads}
if rank == 0:
    torch.save(results, sys.argv[2])
# both ranks tear gloo down together: a rank that destroys its group while its peer is still busy (saving) can
# abort in gloo's destructor ("terminate called without an active exception", seen once in CI)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def _run_ddp_worker(tmp_path, inputs: dict) -> dict:
    """DDP_WORKER on 2 gloo processes under torchrun -> {accumulation: {"loss", "grads"}} (rank 0's)."""
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(tmp_path / "worker.py"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)


def test_ddp_two_processes_match_one_process(tmp_path, synth):
    """Two real processes under torchrun (gloo), without and with gradient accumulation, give the loss and gradients
    of one process on the whole batch."""
    torch.manual_seed(0)
    batch = _batch(synth)
    batch["image_mask"][1] = False  # masks must travel with the gathered features
    single = create_model("tiny")
    state = copy.deepcopy(single.state_dict())
    loss = train_step(single, batch, 1, 0, 1, contextlib.nullcontext)
    results = _run_ddp_worker(tmp_path, {"state": state, "batch": batch})
    expected = _grads(single)
    for accumulation, result in results.items():
        torch.testing.assert_close(result["loss"], loss, atol=1e-6, rtol=1e-5)
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():  # AST's zero-initialised tokens get gradients ~1e6: tolerance per tensor
            atol = 1e-5 * grad.abs().max().item() + 1e-6
            torch.testing.assert_close(
                result["grads"][name], grad, atol=atol, rtol=1e-4, msg=f"accumulation {accumulation}: {name}"
            )


def test_ddp_intra_audio_term_is_each_process_share_with_its_own_negatives(tmp_path, synth):
    """audio_intra_weight > 0 on two gloo processes: the step runs, and its loss and gradients are those the step
    documents: the tri-modal loss of the global batch (global negatives) + weight x the mean over processes of each
    process's NT-Xent over its own rows (local negatives) with its own SpecAugment draws, with and without GradCache.
    That is not one process's intra term over the whole batch (other negatives, other masks): the test shows both."""
    from synergy.core.spec_augment import audio_intra_loss
    from synergy.train.loop import audio_copies

    torch.manual_seed(0)
    batch, weight, world = _batch(synth), 0.7, 2
    assert batch["audio_mask"][:4].sum() >= 2 and batch["audio_mask"][4:].sum() >= 2  # an intra term on each process
    single = create_model("tiny")
    state = copy.deepcopy(single.state_dict())
    results = _run_ddp_worker(tmp_path, {"state": state, "batch": batch, "intra": weight, "accumulations": (1, 2)})
    inputs, masks = _inputs(batch, "cpu"), _masks(batch, "cpu")
    half = len(batch["labels"]) // world
    for accumulation, result in results.items():
        reference = create_model("tiny")
        reference.load_state_dict(state)
        *features, scales = reference(*inputs)
        expected = trimodal_contrastive_loss(*features, scales, masks=masks)
        for rank in range(world):
            rows = slice(rank * half, (rank + 1) * half)
            micro = [torch.tensor_split(x[rows], accumulation) for x in inputs]
            torch.manual_seed(100 + rank)  # as the worker seeds rank `rank`; micro-batch i draws after its forward
            copies = torch.cat([audio_copies(reference, [m[i] for m in micro]) for i in range(accumulation)])
            expected = expected + weight * audio_intra_loss(features[2][rows], copies, masks[2][rows]) / world
        expected.backward()
        torch.testing.assert_close(result["loss"], expected.detach(), atol=1e-6, rtol=1e-5)
        grads = _grads(reference)
        assert result["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            atol = 1e-5 * grad.abs().max().item() + 1e-6
            torch.testing.assert_close(
                result["grads"][name], grad, atol=atol, rtol=1e-4, msg=f"accumulation {accumulation}: {name}"
            )
    one_process = create_model("tiny")
    one_process.load_state_dict(state)
    torch.manual_seed(100)
    loss = train_step(one_process, batch, 1, 0, 1, contextlib.nullcontext, weight)
    assert abs(loss.item() - results[1]["loss"].item()) > 1e-3  # by design: per-process negatives and masks


def test_ddp_training_run_speaks_once_and_evaluates_between_barriers(tmp_path, synth):
    """`synergy train` under torchrun (2 gloo processes, accumulation 2): rank 0 evaluates every step while the
    other waits in a barrier, and the summary, the evaluation lines and the final line are printed once."""
    sets = [f"data={synth / 'train.csv'}", f"val_data={synth / 'val.csv'}", f"out={tmp_path / 'run'}", "model=tiny"]
    sets += ["steps=3", "eval_every=1", "batch_size=8", "accumulation=2", "workers=0", "warmup_steps=1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "synergy.cli", "train", *(part for item in sets for part in ("--set", item))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert output.count("training tiny (") == 1 and output.count("checkpoint: ") == 1
    assert output.count("val zero-shot top-1") == 3 and "on 2 x cpu" in output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val" in r] == [1, 2, 3]
    assert (tmp_path / "run" / "eval.json").is_file()


DDP_TRAIN_WORKER = """
import json, os, signal, sys, torch
import synergy.train.loop as loop
from synergy.train.config import TrainConfig

torch.set_num_threads(1)
config, fault, rank = TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], int(os.environ["RANK"])
if fault == "evaluation" and rank == 0:  # rank 0's evaluation raises, as a broken val file or an OOM would

    def evaluate(*args, **kwargs):
        raise RuntimeError("the evaluation broke")

    loop.evaluate = evaluate
if fault == "interrupt" and rank == 1:  # Ctrl-C reaches rank 1 alone, in the middle of its step 2
    real_step, calls = loop.train_step, []

    def step_then_interrupt(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    loop.train_step = step_then_interrupt
steps, real_update = [], loop.update


def counted_update(*args, **kwargs):
    record = real_update(*args, **kwargs)
    steps.append(record["step"])
    return record


loop.update = counted_update
try:
    loop.train(config, progress=False)
    outcome = "finished"
except KeyboardInterrupt:
    outcome = "KeyboardInterrupt"
except Exception as error:
    outcome = f"{type(error).__name__}: {error}"
with open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w") as f:
    json.dump({"outcome": outcome, "steps": steps}, f)
sys.stdout.flush()
os._exit(0)  # no teardown: a rank left waiting in a collective must show as a timeout, not be released by one
"""


def _run_ddp_training(tmp_path, config: TrainConfig, fault: str, timeout: float = 240) -> dict:
    """train(config) in 2 processes joined by a gloo group (no torchrun: its agent would kill a waiting rank for us)
    with ``fault`` injected -> {rank: {"outcome", "steps"}}. A rank still running after ``timeout`` s is killed and
    reported as hung."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "worker.py").write_text(DDP_TRAIN_WORKER)
    reports = tmp_path / "reports"
    reports.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(port)
    arguments = [json.dumps(dataclasses.asdict(config)), fault, str(reports)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), *arguments],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outcomes = {}
    for rank, process in enumerate(processes):
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            output = process.communicate()[0]
            outcomes[rank] = {"outcome": f"hung past {timeout} s", "steps": None, "output": output[-2000:]}
            continue
        path = reports / f"rank{rank}.json"
        result = json.loads(path.read_text()) if path.is_file() else {"outcome": f"exit {process.returncode}"}
        outcomes[rank] = {**result, "output": output[-2000:]}
    return outcomes


def test_ddp_a_failed_final_evaluation_keeps_the_trained_steps_and_stops_every_rank(tmp_path, synth):
    """Rank 0's final evaluation raises: the final step is saved first (nothing trained is lost), and the failure
    reaches the other rank through a collective at once, instead of leaving it in a barrier for the process group's
    60-minute timeout."""
    config = _config(synth, tmp_path / "run", steps=3, save_every=100, val_data=str(synth / "val.csv"))
    outcomes = _run_ddp_training(tmp_path, config, "evaluation")
    assert outcomes[0]["outcome"] == "RuntimeError: the evaluation broke", outcomes
    assert outcomes[1]["outcome"].startswith("RankZeroFailed: rank 0's evaluation of"), outcomes
    assert outcomes[0]["steps"] == outcomes[1]["steps"] == [1, 2, 3]
    state = torch.load(tmp_path / "run" / "checkpoint" / "train_state" / "state.pt", weights_only=True)
    assert state["step"] == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_ddp_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, synth):
    """Under torchrun each process gets its own SIGINT, at its own moment: here only rank 1, during step 2. The stop
    flag travels in the step's all_reduce, so both ranks finish step 2, save it once and stop, in the same
    collectives; per-process flags had rank 1 wait in the save's barrier while rank 0 ran step 3's collectives."""
    config = _config(synth, tmp_path / "run", steps=6, save_every=100)
    outcomes = _run_ddp_training(tmp_path, config, "interrupt")
    assert [outcomes[r]["outcome"] for r in range(2)] == ["KeyboardInterrupt"] * 2, outcomes
    assert outcomes[0]["steps"] == outcomes[1]["steps"] == [1, 2], outcomes
    state = torch.load(tmp_path / "run" / "checkpoint" / "train_state" / "state.pt", weights_only=True)
    assert state["step"] == 2


def test_ctrl_c_under_torchrun_stops_every_rank_once_at_the_same_step(tmp_path, synth):
    """Ctrl-C in a terminal signals torchrun's whole process group: each worker gets SIGINT from the terminal, and
    torchrun's agent sends each one SIGINT again (then SIGKILL after 30 s). That echo is the same press, not a
    second one: both ranks finish the step they agreed on, rank 0 saves it once, and the run says where it stopped."""
    import time

    sets = [f"data={synth / 'train.csv'}", f"out={tmp_path / 'run'}", "model=tiny", "steps=400", "save_every=1000"]
    sets += ["batch_size=8", "workers=0", "warmup_steps=1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "synergy.cli", "train", *(part for item in sets for part in ("--set", item))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = tmp_path / "run" / "metrics.jsonl"
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"training did not start:\n{process.communicate(timeout=30)[0][-3000:]}")
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    step = torch.load(tmp_path / "run" / "checkpoint" / "train_state" / "state.pt", weights_only=True)["step"]
    assert 2 <= step < 400, output[-3000:]
    assert output.count("interrupted at step") == 1 and f"interrupted at step {step};" in output, output[-3000:]
    assert "Traceback" not in output.split("interrupted at step")[0], output[-3000:]  # no rank died mid-step
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, step + 1))


def test_one_ctrl_c_delivered_twice_is_one_request_and_a_later_one_interrupts():
    """torchrun's echo of the terminal's SIGINT comes right after it: the same press (the step still finishes and
    saves). A press after StopOnInterrupt.SAME_PRESS_S is a second one and interrupts at once. Real signals."""
    import time

    from synergy.train.loop import StopOnInterrupt

    with StopOnInterrupt() as stop:
        stop.SAME_PRESS_S = 0.5
        assert not stop.requested
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the terminal's
            os.kill(os.getpid(), signal.SIGINT)  # torchrun's agent's, a moment later
        except KeyboardInterrupt:
            pytest.fail("the echo of one Ctrl-C interrupted the step, as a second press would")
        assert stop.requested
        time.sleep(0.6)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second press
            time.sleep(1)  # the handler runs in this thread at the next bytecode; never reached


def test_ddp_a_bad_sample_on_one_rank_stops_every_rank(tmp_path, synth):
    """on_bad_sample=error with the broken row in one process's half of the batch: that rank raises its message and
    the other, told through the step's first all_reduce, raises too, instead of waiting there for a peer that left."""
    lines = (synth / "train.csv").read_text().splitlines()  # one batch of every row: 1 bad in 48 passes the start
    lines[3] = "images/nope.png," + lines[3].split(",", 1)[1]
    manifest = synth / "broken_on_one_rank.csv"  # beside the files: its paths are relative to its folder
    manifest.write_text("\n".join(lines) + "\n")
    try:
        config = _config(synth, tmp_path / "run", data=str(manifest), on_bad_sample="error", batch_size=len(lines) - 1)
        outcomes = _run_ddp_training(tmp_path, config, "none")
    finally:
        manifest.unlink()
    messages = sorted(outcomes[rank]["outcome"] for rank in range(2))
    assert messages[0].startswith("DataError: bad sample: ") and "nope.png: no such file" in messages[0], outcomes
    expected = "DataError: step 1: another process stopped on a bad sample (on_bad_sample=error); its error names it"
    assert messages[1] == expected, outcomes
    assert outcomes[0]["steps"] == outcomes[1]["steps"] == []


def test_ddp_a_batch_that_does_not_split_over_processes_and_micro_batches_is_refused(tmp_path, synth):
    """batch 8 on 2 processes in 8 micro-batches: 4 rows per process cannot fill 8 micro-batches (4 would be empty).
    Every rank refuses at start-up, naming the three numbers and a batch size that works."""
    config = _config(synth, tmp_path / "run", batch_size=8, accumulation=8)
    outcomes = _run_ddp_training(tmp_path, config, "none")
    for rank in range(2):
        assert outcomes[rank]["outcome"].startswith(
            "ConfigError: batch_size 8 must be a positive multiple of processes 2 x accumulation 8 = 16"
        ), outcomes
        assert outcomes[rank]["steps"] == []
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_batch_size_must_split_into_micro_batches_on_every_process():
    config = TrainConfig(model="tiny", data="t.csv", batch_size=12, accumulation=3)
    check_train_config(config)  # one process: 4 rows per micro-batch
    check_train_config(config, world=2)  # two: 2 rows per micro-batch
    with pytest.raises(ConfigError, match=re.escape("processes 4 x accumulation 3 = 12")):
        check_train_config(dataclasses.replace(config, batch_size=6), world=4)  # 1.5 rows per process
    with pytest.raises(ConfigError, match=re.escape("processes 3 x accumulation 3 = 9 (") + ".*use batch_size=9"):
        check_train_config(dataclasses.replace(config, batch_size=12), world=3)


def test_evaluate_reports_all_directions(tmp_path, synth):
    model = create_model("tiny")
    tokenizer = build_tokenizer(model, read_manifest(synth / "train.csv"))
    result = evaluate(model, tokenizer, synth / "val.csv")
    assert set(result["zero_shot"]) == {"audio", "image", "audio+image"}
    assert {"image->text", "text->image", "text->audio", "audio->text", "audio->image", "image->audio"} <= set(
        result["retrieval"]
    )
    assert "image+(audio missing)->text" in result["retrieval"]
    # the numbers: each retrieval direction recomputed row by row (R@k: fewer than k other rows' keys strictly
    # closer), and the zero-shot table; ties within float noise may fall either way
    _, _, _, embedded = _embed_row_by_row(model, tokenizer, synth / "val.csv")
    for query, key in (("image", "text"), ("audio", "image"), ("text", "audio")):
        both = [row for row in embedded if query in row and key in row]
        similarity = torch.stack([row[query] for row in both]) @ torch.stack([row[key] for row in both]).T
        for k in (1, 5, 10):
            low, high = _percent_range([_hit_range(similarity[i], i, k) for i in range(len(both))])
            assert low <= result["retrieval"][f"{query}->{key}"][f"R@{k}"] <= high, (query, key, k)
            assert high - low < 20  # most rows decided: the check has teeth
    _check_zero_shot(result["zero_shot"], model, tokenizer, synth / "val.csv")


def test_train_config_overrides(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"steps": 5, "model": "tiny", "data": "t.csv", "val_data": "v.csv"}))
    config = load_train_config(tmp_path / "c.json", ["lr=0.01", "model.audio.layers=1", "val_data=none"])
    assert (config.steps, config.lr, config.model_overrides, config.val_data) == (5, 0.01, {"audio.layers": 1}, None)
    assert load_train_config(None, ["data=t.csv", "val_data="]).val_data is None  # empty clears an optional field
    assert load_train_config(None, ["data=t.csv", "audio_speed_perturb=0.1"]).audio_speed_perturb == 0.1
    with pytest.raises(ValueError, match="unknown key"):
        load_train_config(None, ["data=t.csv", "learning_rate=1"])
    with pytest.raises(ValueError, match="on_bad_sample"):
        load_train_config(None, ["data=t.csv", "on_bad_sample=maybe"])
    with pytest.raises(ConfigError, match="no training data: set `data` in the config file or pass --set data="):
        load_train_config(None, ["model=tiny"])  # a bare `synergy train` is refused


@pytest.mark.parametrize(
    ("json_values", "overrides", "message"),
    [
        ({}, ["model.embed_dim=abc"], "embed_dim: expected int, got str 'abc'"),
        ({}, ["model.prompt_templates=a {}."], "prompt_templates: expected a list of str, got str"),
        ({}, ["model.audio.clip_seconds=x"], "audio: clip_seconds: expected float, got str 'x'"),
        ({}, ["steps=ten"], "steps=ten: expected int, got 'ten'"),
        ({}, ["save_every=0"], "save_every=0: must be at least 1"),
        ({}, ["audio_speed_perturb=0.5"], "audio_speed_perturb=0.5: must be in [0, 0.5)"),
        ({"steps": "10"}, [], "steps: expected int, got str '10'"),
        ({"lr": [0.1]}, [], "lr: expected float, got list"),
        ({"val_data": 3}, [], "val_data: expected str or null, got int 3"),
        ({"model_overrides": {"text": 2}}, [], "text: expected an object of TextTowerConfig fields"),
    ],
)
def test_train_config_types_are_checked_at_the_boundary(tmp_path, json_values, overrides, message):
    (tmp_path / "c.json").write_text(json.dumps({"model": "tiny", "data": "t.csv", **json_values}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(tmp_path / "c.json", overrides)


def test_model_overrides_take_json_lists():
    config = load_train_config(None, ["data=t.csv", "model=tiny", 'model.prompt_templates=["a {}.", "the {}."]'])
    assert create_model(config.model, **config.model_overrides).config.prompt_templates == ("a {}.", "the {}.")


def test_stable_seed_is_pinned():
    """Seeds must not change across Python versions or processes: these values are the contract of exact resume."""
    assert [stable_seed(0, 0, 0), stable_seed(3, 17, 5), stable_seed(-1), stable_seed(2**40, 7)] == [
        112113195,
        1327291301,
        771585245,
        1208904561,
    ]
    assert len({stable_seed(3, step, slot) for step in range(50) for slot in range(20)}) == 1000


def test_samples_per_second_is_a_recent_window():
    rate = RecentRate(window=4)
    for _ in range(10):
        rate.add(1.0, 8)  # slow steps (or an evaluation) long ago
    for _ in range(4):
        rate.add(0.5, 8)
    assert rate.per_second == 16.0


def test_ddp_device_ids_keep_gpu_zero():
    assert ddp_device_ids(torch.device("cuda", 0)) == [0]
    assert ddp_device_ids(torch.device("cuda", 3)) == [3]
    assert ddp_device_ids(torch.device("cpu")) is None


def test_cli_smoke(tmp_path, synth):
    runner = CliRunner()
    result = runner.invoke(main, ["presets"])
    assert result.exit_code == 0 and "tiny" in result.output
    out = tmp_path / "run"
    result = runner.invoke(
        main,
        [
            "train",
            "--set",
            "model=tiny",
            "--set",
            f"data={synth / 'train.csv'}",
            "--set",
            "val_data=none",
            "--set",
            f"out={out}",
            "--set",
            "steps=2",
            "--set",
            "batch_size=4",
            "--set",
            "workers=0",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        [
            "eval",
            "--checkpoint",
            str(out / "checkpoint"),
            "--data",
            str(synth / "val.csv"),
            "--out",
            str(tmp_path / "m.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "audio -> label" in result.output and json.loads((tmp_path / "m.json").read_text())["val"]["rows"] > 0
    result = runner.invoke(main, ["eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(synth / "val.csv")])
    assert result.exit_code == 2 and "no such folder; pass the checkpoint folder" in result.output  # a usage error
    result = runner.invoke(main, ["train", "--set", "bogus=1"])
    assert result.exit_code == 2 and "unknown key" in result.output  # a usage error


def test_cli_train_guards(tmp_path, synth, monkeypatch):
    """A bare train is refused; an existing checkpoint needs --resume or --force; Ctrl-C saves and says how to go on."""
    runner = CliRunner()
    result = runner.invoke(main, ["train"])
    assert result.exit_code == 2 and "no training data: set `data`" in result.output
    assert not (tmp_path / "runs").exists()
    run = ["train", "--set", "model=tiny", "--set", f"data={synth / 'train.csv'}", "--set", f"out={tmp_path / 'run'}"]
    run += ["--set", "batch_size=4", "--set", "workers=0", "--set", "steps=1"]
    assert runner.invoke(main, run).exit_code == 0
    result = runner.invoke(main, run)
    assert result.exit_code == 2 and "already holds a checkpoint; continue it with --resume" in result.output
    result = runner.invoke(main, [*run, "--resume", "--force"])
    assert result.exit_code == 2 and "choose one" in result.output

    import synergy.train.loop as loop

    real_step = loop.train_step

    def interrupt(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(loop, "train_step", interrupt)
    result = runner.invoke(main, [*run, "--force", "--set", "steps=3", "--set", "save_every=100"])
    assert result.exit_code == 130, result.output
    # Ctrl-C during step 1: the step is finished and saved, replacing the old run's checkpoint
    assert f"interrupted at step 1; {tmp_path / 'run' / 'checkpoint'} holds step 1" in result.output
    assert torch.load(tmp_path / "run" / "checkpoint" / "train_state" / "state.pt", weights_only=True)["step"] == 1
    assert f"continue with: synergy train --set model=tiny --set data={synth / 'train.csv'}" in result.output
    assert "--set save_every=100 --resume\n" in result.output
