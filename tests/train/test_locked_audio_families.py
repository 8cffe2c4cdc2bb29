"""Locked audio towers of the new families (LiT with `lock=audio`): the real aisfx CNN trains 2 steps (2 epochs of
one batch) with its features cached, runs once per distinct clip, in eval mode, at 44.1 kHz, and keeps its weights
bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from synergy.core.aisfx import extract_aisfx_folder
from synergy.core.checkpoint import load_checkpoint
from synergy.train.config import TrainConfig
from synergy.train.data import read_manifest
from synergy.train.datasets.synth import synthesize

BATCH = 8


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=1, train_per_class=2, val_per_class=1, heldout_per_class=1, missing_rate=0.0)
    return out


def test_a_locked_aisfx_tower_trains_two_steps_and_runs_once_per_clip(tmp_path, synth, monkeypatch):
    import synergy.train.loop as loop

    folder = extract_aisfx_folder(tmp_path / "aisfx")
    calls, real = [], loop.lock_towers

    def lock_and_count(model, *args, **kwargs):
        def record(module, args, kwargs, output):
            calls.append((kwargs["input_values"].shape, module.training))

        model.audio_tower.register_forward_hook(record, with_kwargs=True)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(loop, "lock_towers", lock_and_count)
    # one batch of rows, so the 2 steps are 2 epochs: the second must come from the cache
    lines = (synth / "train.csv").read_text().splitlines()
    (synth / "one_batch.csv").write_text("\n".join(lines[: 1 + BATCH]) + "\n")
    config = TrainConfig(
        model="tiny", model_overrides={"audio.pretrained": str(folder)}, data=str(synth / "one_batch.csv"),
        out=str(tmp_path / "run"), text_mode="caption", batch_size=BATCH, steps=2, lr=5e-3, warmup_steps=1,
        workers=0, save_every=100, seed=3, lock=("audio",),
    )  # fmt: skip
    checkpoint = loop.train(config, progress=False)

    clips = {row.audio for row in read_manifest(synth / "one_batch.csv")}
    assert len(clips) == BATCH and len(calls) == BATCH  # 2 x 8 clips went through the model: one pass per clip
    assert all(shape == (1, 100, 96) and not training for shape, training in calls)  # alone, eval mode, 1 block

    trained, _ = load_checkpoint(checkpoint)
    assert trained.locked == {"audio": 0} and trained.config.audio.sample_rate == 44_100
    for name, weight in load_file(folder / "model.safetensors").items():
        assert torch.equal(trained.audio_tower.state_dict()[name], weight), name
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["towers"]["audio"]["model_type"] == "aisfx"
