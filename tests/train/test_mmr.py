"""Missing-modality reconstruction on the tiny preset: frozen encoders (no gradient, eval mode, not in the optimiser,
weights unchanged), bad rows reported, exact resume after an interrupted run, the metrics' definitions, and the
`synergy mmr train | eval | reconstruct` commands end to end."""

import json

import pytest
import soundfile
import torch
from click.testing import CliRunner
from PIL import Image

from synergy.cli import main
from synergy.core.checkpoint import save_checkpoint
from synergy.core.model import create_model
from synergy.core.reconstruction import reconstruction_loss
from synergy.train import mmr
from synergy.train.data import read_manifest
from synergy.train.loop import build_tokenizer
from synergy.train.mmr_metrics import cut_at_eos, psnr, text_metrics
from synergy.train.synth import synthesize_tiny

FAST = ["--set", "epochs=2", "--set", "batch_size=8", "--set", "warmup_steps=2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny heads on tiny batches: a second intra-op thread only spins (10x the CPU time of one on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny synthetic data (one training row points at a missing file) and an untrained tiny checkpoint."""
    root = tmp_path_factory.mktemp("mmr")
    synthesize_tiny(root / "data", seed=1, train_per_class=2, val_per_class=1, heldout_per_class=1)
    train_csv = root / "data" / "train.csv"
    with open(train_csv, "a", encoding="utf-8") as f:
        f.write("images/train/gone.png,audio/train/gone.wav,red circle,a red circle\n")
    torch.manual_seed(0)
    model = create_model("tiny")
    save_checkpoint(root / "checkpoint", model, build_tokenizer(model, read_manifest(train_csv)))
    return root


@pytest.fixture(scope="module")
def trained(tiny):
    """`synergy mmr train` through the CLI: the run folder and what it printed."""
    result = CliRunner().invoke(
        main,
        [
            "mmr",
            "train",
            "--checkpoint",
            str(tiny / "checkpoint"),
            "--data",
            str(tiny / "data" / "train.csv"),
            "--out",
            str(tiny / "run"),
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    return tiny / "run", result.output


def test_training_reports_bad_rows_and_writes_epochs(trained):
    run, output = trained
    assert "skipping bad sample:" in output and "gone.png" in output and "manifest line 34" in output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(records[-1]["val"]) == {"image", "audio", "text"}
    assert (run / "checkpoint" / "heads.safetensors").is_file()


def test_encoders_stay_frozen(tiny, trained):
    run_dir, _ = trained
    loaded = mmr.load_mmr(run_dir)
    recorded = json.loads((run_dir / "checkpoint" / "config.json").read_text())["checkpoint_sha256"]
    assert mmr.file_sha256(tiny / "checkpoint" / "model.safetensors") == recorded  # weights untouched by training
    model, tokenizer = mmr.load_frozen(tiny / "checkpoint")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    config = mmr.mmr_config({"checkpoint": str(tiny / "checkpoint"), "data": str(tiny / "data" / "val.csv")})
    optimiser = mmr.make_optimizer(loaded.heads, config)
    in_optimiser = {id(p) for group in optimiser.param_groups for p in group["params"]}
    assert in_optimiser == {id(p) for p in loaded.heads.parameters()}
    assert not in_optimiser & {id(p) for p in model.parameters()}
    # a training step through the real path: features from the frozen towers, loss, backward
    encoded = mmr.encode_rows(model, tokenizer, read_manifest(tiny / "data" / "val.csv"))
    loaded.heads.train()
    for target, head in loaded.heads.items():
        index = mmr.usable(encoded, target)
        mask = encoded["token_mask"][index] if target == "text" else None
        prediction = head(*mmr.head_inputs(encoded, target, index))
        reconstruction_loss(target, prediction, mmr.truth(encoded, target, index), mask, 2.0).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in loaded.heads.parameters())
    assert not model.training


def test_resume_after_an_interruption_is_exact(tiny, monkeypatch):
    config = mmr.mmr_config(
        {
            "checkpoint": str(tiny / "checkpoint"),
            "data": str(tiny / "data" / "train.csv"),
            "out": str(tiny / "whole"),
            "epochs": 2,
            "batch_size": 8,
            "warmup_steps": 2,
            "targets": ["text"],
        }
    )
    quiet = lambda text: None
    whole = mmr.train_mmr(config, report=quiet)
    interrupted = mmr.mmr_config({**json.loads(json.dumps(config.__dict__)), "out": str(tiny / "parts")})
    real_save = mmr.save_mmr

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(mmr, "save_mmr", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        mmr.train_mmr(interrupted, report=quiet)
    monkeypatch.setattr(mmr, "save_mmr", real_save)
    with pytest.raises(mmr.CheckpointError, match="--resume"):
        mmr.train_mmr(interrupted, report=quiet)  # neither resume nor force: the checkpoint is kept
    parts = mmr.train_mmr(interrupted, resume=True, report=quiet)
    a, b = mmr.load_mmr(whole).heads.state_dict(), mmr.load_mmr(parts).heads.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tiny / "parts" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_text_metrics_count_real_tokens_only():
    truth = torch.tensor([[1, 7, 8, 2, 0, 0], [1, 9, 2, 0, 0, 0]])
    mask = (truth != 0).long()
    predicted = torch.tensor([[1, 7, 5, 2, 6, 6], [1, 9, 2, 4, 4, 4]])  # garbage after </s> does not count
    values = text_metrics(predicted, truth, mask, eos_id=2, pad_id=0)
    assert values["token_accuracy"].tolist() == pytest.approx([2 / 3, 1.0])  # <s> and padding not counted
    assert values["exact_match"].tolist() == [0.0, 1.0]
    cut, cut_mask = cut_at_eos(torch.tensor([[1, 2, 5, 2]]), eos_id=2, pad_id=0)
    assert cut.tolist() == [[1, 2, 0, 0]] and cut_mask.tolist() == [[1, 1, 0, 0]]
    assert psnr(torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.1)).tolist() == pytest.approx([20.0, 20.0])


def test_cli_eval_reconstruct_and_grid(tiny, trained, tmp_path):
    run, _ = trained
    runner = CliRunner()
    data = tiny / "data"
    metrics = tmp_path / "metrics.json"
    result = runner.invoke(
        main,
        [
            "mmr",
            "eval",
            str(run),
            "--data",
            str(data / "val.csv"),
            "--data",
            str(data / "heldout.csv"),
            "--out",
            str(metrics),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(metrics.read_text())
    assert report["labels"] == 20 and set(report["splits"]) == {"val", "heldout"}
    for target, entry in report["splits"]["val"]["targets"].items():
        assert set(entry) >= {"n", "reconstruction", "mean_of_training", "nearest_neighbour", "truth"}
        for name in ("reconstruction", "mean_of_training", "nearest_neighbour"):
            assert {"zero_shot_top1", "R@1"} <= set(entry[name])
        main_metrics = {"image": {"psnr_db", "ssim"}, "audio": {"ssim", "mse"}, "text": {"token_accuracy"}}[target]
        assert main_metrics <= set(entry["reconstruction"])
    assert "mean_of_training" in result.output

    picture = next((data / "images" / "val").glob("*.png"))
    sound = next((data / "audio" / "val").glob("*.wav"))
    out_png, out_wav, out_txt = tmp_path / "y.png", tmp_path / "y.wav", tmp_path / "y.txt"
    for args in (
        ["--audio", str(sound), "--text", "a red circle", "--out", str(out_png)],
        ["--image", str(picture), "--text", "a red circle", "--out", str(out_wav)],
        ["--image", str(picture), "--audio", str(sound), "--out", str(out_txt)],
        ["--grid", "3", "--data", str(data / "val.csv"), "--out", str(tmp_path / "grid.png")],
    ):
        result = runner.invoke(main, ["mmr", "reconstruct", str(run), *args])
        assert result.exit_code == 0, result.output
    assert Image.open(out_png).size == (30, 30)
    wave, rate = soundfile.read(out_wav)
    assert rate == 16000 and 0.4 * rate < len(wave) <= 0.5 * rate and abs(wave).max() > 0.5
    assert out_txt.is_file()  # an untrained head may well decode to nothing
    assert Image.open(tmp_path / "grid.png").size[1] > 3 * 96

    one = runner.invoke(main, ["mmr", "reconstruct", str(run), "--text", "a red circle"])
    assert one.exit_code == 2 and "exactly two" in one.output
    missing = runner.invoke(
        main,
        ["mmr", "train", "--checkpoint", str(tmp_path), "--data", str(data / "val.csv"), "--out", str(tmp_path / "x")],
    )
    assert missing.exit_code == 2 and "not a checkpoint" in missing.output
