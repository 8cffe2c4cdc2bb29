"""Hostile and careless checkpoints (issue 16): every damaged copy of a tiny checkpoint is a ``CheckpointError`` naming
the file and what is wrong, found before large allocations; models load in eval mode; pickles are refused with why."""

from __future__ import annotations

import json
import pickle
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from synergy.core.checkpoint import CheckpointError, load_checkpoint, load_train_state, save_checkpoint
from synergy.core.model import create_model
from synergy.core.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    tokenizer = train_tokenizer(["a red circle", "the sound of a dog"], vocab_size=131, max_length=13)
    save_checkpoint(folder, create_model("tiny"), tokenizer, {"step": 3})
    return folder


@pytest.fixture
def checkpoint(saved, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(saved, target)
    return target


def _config(folder, change):
    data = json.loads((folder / "config.json").read_text())
    change(data)
    (folder / "config.json").write_text(json.dumps(data))


def _wrong_shape(folder):
    state = load_file(folder / "model.safetensors")
    state["text_projection.weight"] = torch.zeros(5, 7)
    save_file(state, folder / "model.safetensors")


def _set(tower, key, value):
    return lambda folder: _config(folder, lambda d: d["towers"][tower].update({key: value}))


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def _pickle(folder):
    with open(folder / "train_state" / "state.pt", "wb") as f:
        torch.save({"step": 3, "evil": Payload()}, f)


CASES = [
    ("wrong tensor shape", _wrong_shape, r"model.safetensors does not match config.json.*text_projection.weight: file"),
    ("invalid UTF-8", lambda f: (f / "config.json").write_bytes(b'{"synergy": "\xff"}'), r"config.json: not UTF-8"),
    ("config a list", lambda f: (f / "config.json").write_text("[]"), r"config.json: expected an object"),
    ("towers a list", lambda f: _config(f, lambda d: d.update(towers=[])), r"'towers' must hold"),
    ("unknown tower key", _set("text", "evil_key", 1), r"towers.text has keys that .* do not have: \['evil_key'\]"),
    ("unknown model type", _set("audio", "model_type", "nope"), r"towers.audio.model_type is 'nope'"),
    ("hidden size a string", _set("text", "hidden_size", "abc"), r"towers.text cannot build a model"),
    ("huge vocab_size", _set("text", "vocab_size", 10**7), r"text_tower.embeddings.word_embeddings.weight: file"),
    ("synergy wrong type", lambda f: _config(f, lambda d: d["synergy"].update(embed_dim="x")), r"config.json"),
]


@pytest.mark.parametrize(("damage", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_checkpoint_is_a_checkpoint_error(checkpoint, damage, message):
    damage(checkpoint)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(checkpoint)
    assert str(checkpoint) in str(caught.value)
    assert time.monotonic() - started < 10  # vocab_size 10**7 took 29 s and 5.3 GB before the shapes were checked


def test_hostile_checkpoint_exits_2_from_the_cli(checkpoint, tmp_path):
    from click.testing import CliRunner

    from synergy import cli

    _wrong_shape(checkpoint)
    result = CliRunner().invoke(cli.main, ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert "does not match config.json" in result.output and "Traceback" not in result.output


def test_loaded_model_is_in_eval_mode(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    assert not any(module.training for module in model.modules())


def test_pickled_train_state_is_refused_with_the_reason(checkpoint, capsys):
    _pickle(checkpoint)
    with pytest.raises(CheckpointError) as caught:
        load_train_state(checkpoint)
    message = str(caught.value)
    assert "state.pt" in message and "will not unpickle" in message and "runs whatever code" in message
    assert "weights_only=False" not in message.replace("weights_only=True", "")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(pickle.UnpicklingError):  # the payload is really there: torch itself refuses it
        torch.load(checkpoint / "train_state" / "state.pt", weights_only=True)


def test_good_checkpoint_still_loads(checkpoint):
    model, tokenizer = load_checkpoint(checkpoint)
    assert load_train_state(checkpoint) == {"step": 3}
    ids = torch.tensor([tokenizer.encode("a red circle").ids])
    with torch.no_grad():
        first = model.encode_text(ids, torch.ones_like(ids))
        second = model.encode_text(ids, torch.ones_like(ids))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
