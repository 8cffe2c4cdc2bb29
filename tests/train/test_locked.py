"""Locked towers (LiT): a locked tower is frozen, runs in eval mode, and is run once per distinct input over a whole
run (counted with a forward hook, not assumed); only the projections (and unlocked layers) train; the checkpoint
records the lock; resume (with accumulation) ends on the uninterrupted run's weights."""

import json
import os
import signal

import pytest
import torch

from synergy.core.checkpoint import load_checkpoint
from synergy.core.config import ConfigError, load_config
from synergy.core.model import SynergyModel
from synergy.core.tokenizer import load_pretrained_tokenizer
from synergy.train.config import TrainConfig, load_train_config
from synergy.train.data import read_manifest
from synergy.train.datasets.synth import synthesize

ROWS, BATCH = 32, 8


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=1, train_per_class=2, val_per_class=1, heldout_per_class=1, missing_rate=0.0)
    assert len(read_manifest(out / "train.csv")) == ROWS
    return out


@pytest.fixture(scope="module")
def bert(tmp_path_factory, bert_folder_writer):
    return bert_folder_writer(tmp_path_factory.mktemp("bert") / "folder", pooling="mean")


def _config(synth, bert, out, **kw):
    base = dict(
        model="tiny",
        model_overrides={"text.pretrained": str(bert)},
        data=str(synth / "train.csv"),
        out=str(out),
        text_mode="caption",  # one text per row: N rows are N distinct inputs
        batch_size=BATCH,
        steps=2 * ROWS // BATCH,  # two epochs
        lr=5e-3,
        warmup_steps=1,
        workers=0,
        save_every=100,
        seed=3,
        lock=("text",),
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def text_tower_calls(monkeypatch):
    """(rows, training mode) of each forward call of the text tower of the model each ``train`` builds (a hook
    added as the loop locks it)."""
    import synergy.train.loop as loop

    calls, real = [], loop.lock_towers

    def record(module, args, kwargs, output):
        calls.append((kwargs["input_ids"].shape[0], module.training))

    def lock_and_count(model, *args, **kwargs):
        model.text_tower.register_forward_hook(record, with_kwargs=True)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(loop, "lock_towers", lock_and_count)
    return calls


def _initial_model(config):
    torch.manual_seed(config.seed)  # as the loop builds it
    return SynergyModel(load_config(config.model, **config.model_overrides))


def test_a_locked_tower_runs_once_per_item_over_two_epochs_and_keeps_its_weights(
    tmp_path, synth, bert, text_tower_calls
):
    from synergy.train.loop import train

    config = _config(synth, bert, tmp_path / "run")
    checkpoint = train(config, progress=False)
    tokenizer = load_pretrained_tokenizer(bert, 29, 0)
    distinct = {tuple(tokenizer.encode(row.caption).ids) for row in read_manifest(synth / "train.csv")}
    assert len(distinct) == ROWS
    # 2 x ROWS texts went through the model; the tower saw each once, alone, in eval mode
    assert sum(rows for rows, _ in text_tower_calls) == ROWS and len(text_tower_calls) == ROWS
    assert not any(training for _, training in text_tower_calls)

    trained, _ = load_checkpoint(checkpoint)
    initial = _initial_model(config)
    for (name, before), after in zip(initial.text_tower.state_dict().items(), trained.text_tower.state_dict().values()):
        assert torch.equal(before, after), name  # bit-identical: the folder's weights
    assert not torch.equal(initial.text_projection.weight, trained.text_projection.weight)
    assert not torch.equal(initial.image_projection.weight, trained.image_projection.weight)
    assert json.loads((checkpoint / "config.json").read_text())["locked"] == {"text": 0}
    assert trained.locked == {"text": 0}


def test_unlocked_last_layers_train_and_the_rest_stays(tmp_path, synth, bert, text_tower_calls):
    from synergy.train.loop import train

    config = _config(synth, bert, tmp_path / "run", steps=2, unlock_last_layers={"text": 1})
    trained, _ = load_checkpoint(train(config, progress=False))
    initial = _initial_model(config)
    before, after = initial.text_tower.state_dict(), trained.text_tower.state_dict()
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert changed and all(name.startswith("encoder.layer.1.") for name in changed), changed
    # not cached (its features change as its last layer trains): a batch per step, in training mode
    assert text_tower_calls == [(BATCH, True), (BATCH, True)]
    assert trained.locked == {"text": 1}


def test_resume_with_a_lock_and_accumulation_gives_the_same_weights(tmp_path, synth, bert, monkeypatch):
    """A SIGINT in step 3 of 8 (two epochs; micro-batches of 4): the resumed run starts with an empty cache and
    still ends on the uninterrupted run's weights, bit for bit."""
    import synergy.train.loop as loop

    straight = loop.train(_config(synth, bert, tmp_path / "a", accumulation=2), progress=False)
    real_step, calls = loop.train_step, []

    def step_then_interrupt(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(loop, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_config(synth, bert, tmp_path / "b", accumulation=2), progress=False)
    monkeypatch.setattr(loop, "train_step", real_step)
    with pytest.raises(ConfigError, match=r"trained with lock \{'text': 0\}.*asks for none"):
        loop.train(_config(synth, bert, tmp_path / "b", accumulation=2, lock=()), resume=True, progress=False)
    resumed = loop.train(_config(synth, bert, tmp_path / "b", accumulation=2), resume=True, progress=False)
    a, _ = load_checkpoint(straight)
    b, _ = load_checkpoint(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)


def test_lock_settings_from_the_command_line_and_their_checks(tmp_path):
    data = ["data=x.csv"]
    config = load_train_config(None, [*data, "lock=text,image", 'unlock_last_layers={"text": 2}'])
    assert config.lock == ("text", "image") and config.unlock_last_layers == {"text": 2}
    for overrides, message in [
        (["lock=txt"], r"lock=\['txt'\]: name each of image, text, audio at most once"),
        (["lock=text", 'unlock_last_layers={"audio": 1}'], "unlock_last_layers.audio: only a locked tower"),
        (["lock=text", 'unlock_last_layers={"text": -1}'], "expected a number of layers"),
        (["lock=audio", "audio_intra_weight=0.5"], "audio_intra_weight trains the audio tower"),
        (["unlock_last_layers=2"], "expected a JSON object"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_train_config(None, [*data, *overrides])


def test_a_locked_run_under_torchrun_keeps_the_tower_and_trains_the_rest(tmp_path, synth, bert):
    """`synergy train --set lock=text` on 2 gloo processes with accumulation: DDP wraps a model whose locked tower
    has no trainable parameter and whose features come from the per-process caches."""
    import subprocess
    import sys

    out = tmp_path / "run"
    sets = [f"data={synth / 'train.csv'}", f"out={out}", "model=tiny", f"model.text.pretrained={bert}", "lock=text"]
    sets += ["steps=4", "batch_size=8", "accumulation=2", "workers=0", "warmup_steps=1", "seed=3", "text_mode=caption"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "synergy.cli", "train", *(part for item in sets for part in ("--set", item))]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trained, _ = load_checkpoint(out / "checkpoint")
    initial = _initial_model(_config(synth, bert, out, seed=3))
    for (name, before), after in zip(initial.text_tower.state_dict().items(), trained.text_tower.state_dict().values()):
        assert torch.equal(before, after), name
    assert not torch.equal(initial.text_projection.weight, trained.text_projection.weight)
    assert trained.locked == {"text": 0}


def test_cached_features_equal_the_towers_own_and_repeat_inputs_are_not_recomputed():
    from synergy.core.model import create_model
    from synergy.train.locked_features import lock_towers

    model = create_model("tiny").eval()
    pixels = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = model.image_features(pixels)
    assert lock_towers(model, ("image", "audio"), {}, resumed=False) == {"image": 0, "audio": 0}
    model.train()
    assert not model.image_tower.training and not model.audio_tower.training and model.text_tower.training
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    cached = model.image_features(torch.cat([pixels, pixels[:1]]))  # the 4th row repeats the 1st
    torch.testing.assert_close(cached[:3], direct, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached[3], cached[0]) and model.image_features.forward_calls == 3


def test_a_locked_image_tower_sees_evaluations_input_and_runs_once_per_row_over_two_epochs(tmp_path, synth):
    """No random crops for a locked image tower (they would make every epoch's input new and the cache useless):
    two epochs over ROWS rows cost ROWS single-row passes of the tower, counted with a forward hook."""
    import synergy.train.loop as loop
    from synergy.train.data import ManifestDataset

    calls, real = [], loop.lock_towers

    def lock_and_count(model, *args, **kwargs):
        model.image_tower.register_forward_hook(
            lambda m, args, kw, out: calls.append(kw["pixel_values"].shape[0]), with_kwargs=True
        )
        return real(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "lock_towers", lock_and_count)
        config = TrainConfig(
            model="tiny", data=str(synth / "train.csv"), out=str(tmp_path / "run"), text_mode="caption",
            batch_size=BATCH, steps=2 * ROWS // BATCH, warmup_steps=1, workers=0, save_every=100, seed=3,
            lock=("image",),
        )  # fmt: skip
        loop.train(config, progress=False)
    assert calls == [1] * ROWS

    model = _initial_model(config)
    rows = read_manifest(synth / "train.csv")
    fixed = ManifestDataset.for_model(rows, model.config, unaugmented=("image",))
    cropped = ManifestDataset.for_model(rows, model.config)
    evaluation = fixed[0]["image"]  # no augmentation seed: evaluation's preprocessing
    assert (fixed[(0, 11)]["image"] == evaluation).all() and (fixed[(0, 12)]["image"] == evaluation).all()
    assert not (cropped[(0, 11)]["image"] == evaluation).all()
