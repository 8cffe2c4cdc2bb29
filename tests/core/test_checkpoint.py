"""Crash-safe checkpoints: a save killed at each instant (a real SIGKILL in a forked process, placed by wrapping the
file-system calls it makes) leaves the old or the new checkpoint and nothing else once recovered; a full disk (a real
kernel file-size limit) leaves the previous checkpoint intact with a clear message."""

import os
import resource
import shutil
import signal

import pytest
import torch

from synergy.core import atomic_folder
from synergy.core.checkpoint import CheckpointError, load_checkpoint, recover_checkpoint, save_checkpoint
from synergy.core.model import create_model
from synergy.core.tokenizer import train_tokenizer


def _tokenizer():
    return train_tokenizer(["a red circle", "the sound of a dog", "a blue square"], vocab_size=131, max_length=13)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _save_and_die(folder, staged, moment):
    """In a forked child (file operations only, no torch): copy ``staged`` into ``folder`` through atomic_folder and
    SIGKILL this process at ``moment``."""
    real_rename, real_rmtree, renames = os.rename, shutil.rmtree, []

    def rename(src, dst):
        real_rename(src, dst)
        renames.append(dst)
        if moment == f"after rename {len(renames)}":
            _kill_self()

    def rmtree(path, *args, **kwargs):
        if moment == "removing the old folder" and str(path).endswith(".ckpt.old") and os.path.isdir(path):
            (path / "config.json").unlink()  # half-removed: the old folder is no longer complete
            _kill_self()
        real_rmtree(path, *args, **kwargs)

    os.rename, shutil.rmtree = rename, rmtree
    with atomic_folder.atomic_folder(folder) as tmp:
        for i, path in enumerate(sorted(p for p in staged.rglob("*") if p.is_file())):
            target = tmp / path.relative_to(staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            if moment == "writing" and i == 1:
                _kill_self()
        if moment == "before the swap":
            _kill_self()


MOMENTS = ["writing", "before the swap", "after rename 1", "after rename 2", "removing the old folder"]


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_save_killed_at_any_instant_recovers(tmp_path, moment):
    model = create_model("tiny")
    tokenizer = _tokenizer()
    folder = tmp_path / "run" / "ckpt"
    save_checkpoint(folder, model, tokenizer, {"step": 3})
    old = _files(folder)
    with torch.no_grad():
        model.logit_scale.add_(1)
    save_checkpoint(tmp_path / "staged", model, tokenizer, {"step": 4})
    new = _files(tmp_path / "staged")

    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            _save_and_die(folder, tmp_path / "staged", moment)
        except BaseException:
            import traceback

            traceback.print_exc()
        os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the child was not killed: {status}"

    if moment == "after rename 1":  # the window: no checkpoint folder, the last complete one in .ckpt.old
        assert not folder.exists() and (folder.parent / ".ckpt.old").is_dir()
        with pytest.raises(CheckpointError, match="a save was interrupted.*--resume"):
            load_checkpoint(folder)
    recover_checkpoint(folder)
    expected = old if moment in ("writing", "before the swap", "after rename 1") else new
    assert _files(folder) == expected
    assert [p.name for p in folder.parent.iterdir()] == ["ckpt"]  # no temp folder, no .old
    loaded, _ = load_checkpoint(folder)
    torch.testing.assert_close(loaded.logit_scale, model.logit_scale.detach() - float(expected is old))


def test_the_next_save_recovers_first(tmp_path):
    """A save after a kill in the window (no folder, a complete .old) keeps working and leaves nothing stale."""
    model, tokenizer = create_model("tiny"), _tokenizer()
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, tokenizer, {"step": 1})
    os.rename(folder, tmp_path / ".ckpt.old")  # the state a kill between the two renames leaves
    (tmp_path / ".ckpt.x1.tmp").mkdir()  # and a dead writer's temp folder
    save_checkpoint(folder, model, tokenizer, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.load(folder / "train_state" / "state.pt", weights_only=True)["step"] == 2


@pytest.fixture
def file_size_limit():
    """A real kernel limit on the size of any file this process writes (EFBIG past it): a disk that fills up in the
    middle of the weights file. Restored afterwards; the soft limit can always be raised back to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action kills the process

    def limit(size):
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_leaves_the_previous_checkpoint(tmp_path, file_size_limit):
    model, tokenizer = create_model("tiny"), _tokenizer()
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, tokenizer, {"step": 3, "optimizer": {"x": torch.ones(5)}})
    before = _files(folder)
    with torch.no_grad():
        model.logit_scale.add_(1)
    weights = (folder / "model.safetensors").stat().st_size
    file_size_limit(weights // 2)  # config.json and tokenizer.json fit, the weights do not
    with pytest.raises(CheckpointError, match=r"out of space .*the previous checkpoint in .*ckpt is intact.*--resume"):
        save_checkpoint(folder, model, tokenizer, {"step": 4, "optimizer": {"x": torch.ones(5)}})
    file_size_limit(resource.RLIM_INFINITY)
    assert _files(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded, _ = load_checkpoint(folder)
    torch.testing.assert_close(loaded.logit_scale, model.logit_scale.detach() - 1)


# --- a pretrained folder's own config keys ---------------------------------------------------------------------------


def _bert_checkpoint(folder, bert_folder):
    from synergy.core.tokenizer import load_pretrained_tokenizer

    model = create_model("tiny", **{"text.pretrained": str(bert_folder)}).eval()
    tokenizer = load_pretrained_tokenizer(bert_folder, model.config.text.max_length, 0)
    save_checkpoint(folder, model, tokenizer)
    return model, tokenizer


def test_a_pretrained_folders_own_config_keys_round_trip(tmp_path, bert_folder):
    """all-MiniLM-L6-v2's config.json carries gradient_checkpointing and position_embedding_type, which BertConfig
    does not define: a checkpoint of a tower built from it was refused by load_checkpoint (so by eval and export).
    They travel apart from the checked keys and come back on the rebuilt tower."""
    import json

    model, tokenizer = _bert_checkpoint(tmp_path / "ckpt", bert_folder)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "gradient_checkpointing" not in saved["towers"]["text"]
    assert saved["tower_folder_keys"]["text"] == {
        "gradient_checkpointing": False,
        "position_embedding_type": "absolute",
    }

    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.text_tower.config.gradient_checkpointing is False
    assert loaded.text_tower.config.position_embedding_type == "absolute"
    assert loaded.config.text.pooling == "mean" and loaded.config.text.max_length == 29
    encodings = tokenizer.encode_batch(["a red circle", "the sound of a dog barking in the rain"])
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(ids, mask), model.encode_text(ids, mask))
    save_checkpoint(tmp_path / "again", loaded, tokenizer)  # and a loaded checkpoint saves the same config
    assert (tmp_path / "again" / "config.json").read_text() == (tmp_path / "ckpt" / "config.json").read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"hidden_size": 40}, r"tower_folder_keys.text repeats keys of the tower's own config: \['hidden_size'\]"),
        ({"evil": {"__class__": "x"}}, r"tower_folder_keys.text has values that are not plain JSON values: \['evil'\]"),
    ],
)
def test_edited_folder_keys_are_refused(tmp_path, bert_folder, edit, message):
    import json

    _bert_checkpoint(tmp_path / "ckpt", bert_folder)
    path = tmp_path / "ckpt" / "config.json"
    data = json.loads(path.read_text())
    data["tower_folder_keys"]["text"].update(edit)
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ckpt")


def test_a_checkpoint_from_before_folder_keys_still_loads(tmp_path):
    import json

    save_checkpoint(tmp_path / "ckpt", create_model("tiny"), _tokenizer())
    path = tmp_path / "ckpt" / "config.json"
    data = json.loads(path.read_text())
    del data["tower_folder_keys"], data["synergy"]["text"]["pooling"]
    path.write_text(json.dumps(data))
    assert load_checkpoint(tmp_path / "ckpt")[0].config.text.pooling == "cls"
