"""The `synergy` command line as a user meets it, in real processes: one exit-code contract (0 ok, 1 some inputs
failed, 2 usage / checkpoint / bundle error), usage errors found before torch is imported, removed spellings refused
with the new one named, `synergy presets` and `synergy data synth` output. The full train -> eval -> export -> infer
path runs in tests/test_readme.py (the README's own commands); `synergy infer` in tests/cli/test_infer.py."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from synergy.suggest import close_matches, did_you_mean

SYNERGY = str(Path(sys.executable).with_name("synergy"))
# runs the real click entry point, then says whether torch was imported on the way
PROBE = textwrap.dedent(
    """
    import sys
    from synergy.cli import main
    try:
        main(sys.argv[1:], prog_name="synergy")
        code = 0
    except SystemExit as exit:
        code = exit.code
    print("TORCH_LOADED", "torch" in sys.modules, file=sys.stderr)
    sys.exit(code)
    """
)


def synergy(*args: str, cwd: Path, probe: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", PROBE, *args] if probe else [SYNERGY, *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def fake_checkpoint(tmp_path) -> Path:
    """A folder that passes the command line's checks (the files exist); loading it would fail, so a test that uses
    it shows the error came before the checkpoint was read."""
    folder = tmp_path / "run" / "checkpoint"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    return folder


def test_suggestions_are_close_names_only():
    keys = ["steps", "seed", "lr", "save_every", "eval_every", "batch_size", "val_data", "data"]
    assert close_matches("stpes", keys) == ["steps"]
    assert did_you_mean("stpes", keys) == " (did you mean 'steps'?)"
    assert did_you_mean("tinny", ["tiny", "small", "base", "large"]) == " (did you mean 'tiny'?)"
    assert did_you_mean("BATCH_SIZE", keys) == " (did you mean 'batch_size'?)"
    assert did_you_mean("eval_evry", keys).startswith(" (did you mean 'eval_every'")
    assert did_you_mean("warmup", keys) == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--checkpoint", "{ckpt}", "--data", "data/val.csv"], "--data data/val.csv: no such file"),
        (["eval", "--checkpoint", "{ckpt}", "--data", "{tmp}/vall.csv"], "did you mean 'val.csv'?"),
        (["eval", "--checkpoint", "{ckpt}", "--data", "{tmp}/val.csv", "--labels", "missing.txt"], "no such labels"),
        (["eval", "--checkpoint", "{tmp}/run", "--data", "{tmp}/val.csv"], "did you mean {tmp}/run/checkpoint?"),
        (["eval", "--checkpoint", "{tmp}/nope", "--data", "{tmp}/val.csv"], "--checkpoint {tmp}/nope: no such folder"),
        (["eval", "--data", "{tmp}/val.csv"], "no checkpoint: pass --checkpoint DIR"),
        (["eval", "--checkpoint", "{ckpt}", "--data", "{tmp}/val.csv", "--out", "{tmp}"], "is a folder"),
        # the export's own output check (synergy.export.bundle.check_output), run before torch loads
        (["export", "--checkpoint", "{ckpt}", "--out", "{tmp}/bundle"], "already exists; pass --force"),
        (["export", "--checkpoint", "{ckpt}", "--out", "{tmp}", "--force"], "overlaps the checkpoint folder"),
        (["export", "--checkpoint", "{ckpt}", "--out", "{tmp}/photos", "--force"], "not a Synergy bundle; refusing"),
        (["export", "--checkpoint", "{ckpt}", "--out", "{tmp}/b", "--data", "{tmp}/x.csv"], "x.csv: no such file"),
        (["data", "synth", "--out", "{tmp}"], "pass overwrite=True (CLI: --overwrite)"),
        (["infer", "--labels", "{tmp}/val.csv", "--bundle", "{tmp}"], "no inputs"),
        (["infer", "--labels", "missing.txt", "--audio", "x.wav", "--bundle", "{tmp}"], "no such labels file"),
        (
            ["eval", "--checkpoint", "{ckpt}", "--dat", "x.csv"],
            "No such option '--dat'. (Did you mean one of: '--data'",
        ),
    ],
)
def test_usage_errors_exit_2_before_torch_loads(tmp_path, fake_checkpoint, args, message):
    (tmp_path / "val.csv").write_text("img_path,wav_path,label,caption\n,,dog,\n")
    (tmp_path / "bundle").mkdir()  # an earlier bundle
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    (tmp_path / "photos").mkdir()  # a folder that is not a bundle
    (tmp_path / "photos" / "cat.png").write_bytes(b"")
    fill = {"ckpt": str(fake_checkpoint), "tmp": str(tmp_path)}
    done = synergy(*[a.format(**fill) for a in args], cwd=tmp_path, probe=True)
    assert done.returncode == 2, done.stderr
    assert message.format(**fill) in done.stderr
    assert "TORCH_LOADED False" in done.stderr  # the error came in well under a second, not after torch's 4-7 s
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr
    assert "data synth" not in done.stderr or args[:2] == ["data", "synth"]  # a typo is not a reason to make data


INFER = ["infer", "--labels", "{tmp}/val.csv", "--audio", "x.wav"]
SERVE = ["serve", "--port", "0"]
EMBED = ["embed", "x.wav", "--out", "{tmp}/corpus.parquet"]
EVAL = ["eval", "--data", "{tmp}/val.csv"]
EXPORT = ["export", "--out", "{tmp}/bundle"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([*INFER, "--model", "{tmp}/old"], "--model was removed; use --bundle {tmp}/old"),
        ([*SERVE, "--model", "{tmp}/old"], "--model was removed; use --bundle {tmp}/old"),
        ([*EMBED, "--model", "{tmp}/old", "--bundle", "{tmp}/new"], "--model was removed; use --bundle {tmp}/old"),
        ([*EVAL, "{ckpt}"], "the positional CHECKPOINT ({ckpt}) was removed; use --checkpoint {ckpt}"),
        ([*EXPORT, "{ckpt}"], "the positional CHECKPOINT ({ckpt}) was removed; use --checkpoint {ckpt}"),
        ([*EVAL, "{ckpt}", "--checkpoint", "{ckpt}"], "the positional CHECKPOINT ({ckpt}) was removed"),
        (
            [*EXPORT, "--checkpoint", "{ckpt}", "--eval-data", "{tmp}/val.csv"],
            "--eval-data was removed; use --data {tmp}/val.csv",
        ),
    ],
)
def test_removed_spellings_are_refused_naming_the_new_one(tmp_path, fake_checkpoint, args, message):
    """Each old spelling is a usage error (exit 2) whose one line names the spelling to use instead; nothing ran
    (the export's own output check, which the new spelling reaches, never speaks; torch never loads)."""
    (tmp_path / "val.csv").write_text("img_path,wav_path,label,caption\n,,dog,\n")
    (tmp_path / "bundle").mkdir()
    fill = {"ckpt": str(fake_checkpoint), "tmp": str(tmp_path)}
    done = synergy(*[a.format(**fill) for a in args], cwd=tmp_path, probe=True)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {message.format(**fill)}"), done.stderr
    assert "already exists" not in done.stderr and "no such folder" not in done.stderr
    assert "Traceback" not in done.stderr and "TORCH_LOADED False" in done.stderr


def test_a_broken_checkpoint_is_exit_2_with_its_reason(tmp_path, fake_checkpoint):
    (tmp_path / "val.csv").write_text("img_path,wav_path,label,caption\n,,dog,\n")
    done = synergy("eval", "--checkpoint", str(fake_checkpoint), "--data", "val.csv", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "zero-shot candidates: 1 labels (the union of the labels in 1 CSV(s))" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: ") and "Traceback" not in done.stderr


def test_presets_show_towers_sizes_and_true_parameter_counts(tmp_path):
    import torch

    from synergy.core.model import create_model

    done = synergy("presets", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    blocks = {}
    for line in done.stdout.splitlines():
        if line and not line.startswith((" ", "(")):
            name = line.split()[0]
            blocks[name] = [line]
        elif line.startswith(" "):
            blocks[name].append(line)
    assert list(blocks) == ["tiny", "small", "base", "large"]  # smallest first
    for name in ("tiny", "small"):
        torch.manual_seed(0)
        model = create_model(name)
        total = sum(p.numel() for p in model.parameters())
        shown = blocks[name][0].split()[1:3]  # e.g. ["65.5", "K"]
        scale = {"K": 1e3, "M": 1e6, "B": 1e9}[shown[1]]
        assert abs(float(shown[0]) * scale - total) <= 0.05 * scale, (name, shown, total)
        towers = {line.split()[0]: line for line in blocks[name][1:]}
        assert list(towers) == ["image", "text", "audio"]
        config = model.config
        assert f"{config.image.image_size} px, patch {config.image.patch_size}" in towers["image"]
        assert f"{config.audio.layers} layers x {config.audio.width}" in towers["audio"]
    assert "12 layers x 768" in blocks["base"][1] and "10.24 s at 16 kHz" in blocks["base"][3]


def test_data_synth_summary_labels_and_refusal(tmp_path):
    args = ("data", "synth", "--out", "data", "--train-per-class", "1", "--val-per-class", "1")
    first = synergy(*args, "--heldout-per-class", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == "wrote the synthetic tri-modal set to data"
    assert "SynthSummary(" not in first.stdout and "PosixPath" not in first.stdout
    assert "labels.txt" in first.stdout and "20 labels" in first.stdout
    labels = (tmp_path / "data" / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert len(labels) == 20 and "red triangle" in labels  # held-out classes too: one file for every split
    csv_before = (tmp_path / "data" / "train.csv").read_bytes()

    again = synergy(*args, "--seed", "5", cwd=tmp_path)
    assert again.returncode == 2
    assert "holds an earlier synth output" in again.stderr and "--overwrite" in again.stderr
    assert (tmp_path / "data" / "train.csv").read_bytes() == csv_before

    replaced = synergy(*args, "--seed", "5", "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert (tmp_path / "data" / "train.csv").read_bytes() != csv_before
    assert json.loads((tmp_path / "data" / "classes.json").read_text())["seed"] == 5


def test_mistyped_config_keys_and_presets_get_a_suggestion(tmp_path):
    from synergy.core.config import ConfigError, load_config
    from synergy.train.config import load_train_config

    with pytest.raises(ConfigError, match=r"--set stpes: unknown key \(did you mean 'steps'\?\)"):
        load_train_config(None, ["stpes=10", "data=x.csv"])
    with pytest.raises(ConfigError, match=r"unknown preset 'tinny' \(did you mean 'tiny'\?\)"):
        load_config("tinny")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['layrs'\] \(did you mean 'layers'\?\)"):
        load_config("tiny", **{"audio.layrs": 3})


def test_version_names_the_distribution(tmp_path):
    done = synergy("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"synergy, version {importlib.metadata.version('synergy-clip')}"
