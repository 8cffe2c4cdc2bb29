"""Missing-modality reconstruction on the tiny preset: frozen encoders (no gradient, eval mode, not in the optimiser,
weights unchanged), bad rows reported, exact resume after an interrupted run, the metrics' definitions, and the
`synergy mmr train | eval | reconstruct` commands end to end."""

import csv
import json

import pytest
import soundfile
import torch
from click.testing import CliRunner
from PIL import Image

from synergy.cli import main
from synergy.core.checkpoint import save_checkpoint
from synergy.core.model import create_model
from synergy.train.data import read_manifest
from synergy.train.datasets.synth import synthesize_tiny
from synergy.train.loop import build_tokenizer
from synergy.train.mmr import train as mmr
from synergy.train.mmr.metrics import cut_at_eos, psnr, text_metrics

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
def seen():
    """What the training run of ``trained`` worked with, taken from inside it: the frozen model it loaded and a copy
    of its weights before training, the optimiser, the heads and a copy of their initial weights."""
    return {}


@pytest.fixture(scope="module")
def trained(tiny, seen):
    """`synergy mmr train` through the CLI: the run folder and what it printed (and ``seen`` filled)."""
    real_load_frozen, real_make_optimizer = mmr.load_frozen, mmr.make_optimizer

    def load_frozen(checkpoint):
        model, tokenizer = real_load_frozen(checkpoint)
        seen["model"], seen["model_before"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model, tokenizer

    def make_optimizer(heads, config):
        seen["heads"], seen["heads_before"] = heads, {k: v.clone() for k, v in heads.state_dict().items()}
        seen["optimizer"] = real_make_optimizer(heads, config)
        return seen["optimizer"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mmr, "load_frozen", load_frozen)
        patch.setattr(mmr, "make_optimizer", make_optimizer)
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


def test_encoders_stay_frozen(tiny, trained, seen):
    """The run's own frozen model, after training: weights bit for bit those it loaded, eval mode, no gradient, not
    in the optimiser; while every head did train (so the comparison has a run that changed something behind it)."""
    run_dir, _ = trained
    model, before = seen["model"], seen["model_before"]
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"training changed frozen weights: {changed[:5]}"
    assert not any(module.training for module in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    in_optimiser = {id(p) for group in seen["optimizer"].param_groups for p in group["params"]}
    assert in_optimiser == {id(p) for p in seen["heads"].parameters()}
    assert not in_optimiser & {id(p) for p in model.parameters()}
    trained_heads = mmr.load_mmr(run_dir).heads.state_dict()
    assert trained_heads.keys() == seen["heads_before"].keys()
    for target in seen["heads"]:  # each head moved away from its initial weights
        names = [k for k in trained_heads if k.startswith(f"{target}.")]
        assert any(not torch.equal(trained_heads[k], seen["heads_before"][k]) for k in names), target
    recorded = json.loads((run_dir / "checkpoint" / "config.json").read_text())["checkpoint_sha256"]
    assert mmr.file_sha256(tiny / "checkpoint" / "model.safetensors") == recorded  # the file untouched too


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


def test_validation_counts_a_perfect_text_reconstruction_as_an_exact_match():
    """Validation hands the text metrics the pad and end-of-sequence ids in their places: a head that predicts the
    truth exactly scores 1.0 in both (with the two ids swapped, the padding after </s> never matched: 0.0)."""
    pad, eos, vocab = 1, 2, 11
    ids = torch.tensor([[0, 7, 8, eos, pad, pad], [0, 9, eos, pad, pad, pad], [0, 5, 6, 7, 8, eos]])
    encoded = {
        "masks": {m: torch.ones(3, dtype=torch.bool) for m in ("image", "text", "audio")},
        "features": {"image": torch.nn.functional.one_hot(ids, vocab).float().flatten(1), "audio": torch.zeros(3, 1)},
        "ids": ids,
        "token_mask": (ids != pad).long(),
    }

    class Copy(torch.nn.Module):  # text <- (image, audio): the "image" features are the truth's one-hot logits
        def forward(self, image, audio):
            return image.view(len(image), ids.shape[1], vocab)

    pad_eos = (pad, eos)  # the order mmr.special_ids gives them in, and validate takes them in
    result = mmr.validate(torch.nn.ModuleDict({"text": Copy()}), encoded, 1.0, pad_eos)
    assert result["text"]["token_accuracy"] == 1.0
    assert result["text"]["exact_match"] == 1.0


def test_eval_decodes_each_nearest_neighbour_row_once(trained, monkeypatch):
    """The nearest neighbours of every split and target are decoded in one pass, each training row once and without
    the towers (only its targets are used), and each (split, target) gets its own rows' targets back."""
    from synergy.train.mmr import evaluate as mmr_eval

    run = mmr.load_mmr(trained[0])
    train_rows = mmr_eval.training_rows(run)
    calls = []
    real_encode_rows = mmr_eval.encode_rows

    def encode_rows(model, tokenizer, rows, **kwargs):
        calls.append((len(rows), kwargs.get("features", True)))
        return real_encode_rows(model, tokenizer, rows, **kwargs)

    monkeypatch.setattr(mmr_eval, "encode_rows", encode_rows)
    nearest = {
        ("a", "image"): torch.tensor([5, 2, 5]),
        ("a", "text"): torch.tensor([7, 2]),
        ("b", "audio"): torch.tensor([7]),
    }
    found = mmr_eval.neighbour_targets(run, nearest, train_rows)
    assert calls == [(3, False)]  # rows 2, 5 and 7, once each
    for (split, target), rows in nearest.items():
        alone = real_encode_rows(run.model, run.tokenizer, [train_rows[i] for i in rows.tolist()], report=print)
        # pixels and ids exactly; a log-mel to float rounding: the front end's sums depend on the batch it runs in
        tolerance = {"atol": 1e-5, "rtol": 1e-5} if target == "audio" else {"atol": 0, "rtol": 0}
        alone = mmr.truth(alone, target, torch.arange(len(rows)))
        torch.testing.assert_close(found[split, target], alone, **tolerance, msg=f"{split} {target}")


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


def _training_losses(run_dir, heads: torch.nn.ModuleDict) -> dict[str, float]:
    """Each head's reconstruction loss over the rows of the training split it learned from (eval mode)."""
    from synergy.train.mmr import evaluate as mmr_eval

    run = mmr.load_mmr(run_dir)
    encoded = mmr.encode_rows(run.model, run.tokenizer, mmr_eval.training_rows(run), report=lambda text: None)
    pad_eos = mmr.special_ids(run.model, run.tokenizer)
    return {target: values["loss"] for target, values in mmr.validate(heads, encoded, run.audio_range, pad_eos).items()}


def test_training_lowers_each_heads_loss_on_its_training_rows(trained, seen):
    """The heads learned something: on the training rows, every head's loss after the run is below the loss of the
    same head with its initial weights by a margin (not merely "some tensor changed"). Measured after these two
    epochs: image 0.647 -> 0.619 (its loss falls slowest), audio 0.819 -> 0.688, text 5.08 -> 3.87."""
    run_dir, _ = trained
    initial = mmr.load_mmr(run_dir).heads
    initial.load_state_dict(seen["heads_before"])
    before = _training_losses(run_dir, initial)
    after = _training_losses(run_dir, mmr.load_mmr(run_dir).heads)
    assert set(before) == set(after) == {"image", "audio", "text"}
    margin = {"image": 0.98, "audio": 0.92, "text": 0.85}
    for target in before:
        assert after[target] < margin[target] * before[target], (target, before[target], after[target])


def test_eval_metrics_are_in_range_and_match_a_recomputation(tiny, trained, tmp_path):
    """`synergy mmr eval`'s JSON: every number in its range, the counts those of the split, and the reconstruction's
    main metrics equal to the same quantities computed here by hand from the heads' outputs."""
    run_dir, _ = trained
    out = tmp_path / "metrics.json"
    val_csv = tiny / "data" / "val.csv"
    result = CliRunner().invoke(main, ["mmr", "eval", str(run_dir), "--data", str(val_csv), "--out", str(out)])
    assert result.exit_code == 0, result.output
    targets = json.loads(out.read_text())["splits"]["val"]["targets"]
    assert set(targets) == {"image", "audio", "text"}
    ranges = {"psnr_db": (0, 100), "ssim": (-1, 1), "mse": (0, 1e3), "token_accuracy": (0, 100)}
    ranges.update({"exact_match": (0, 100), "zero_shot_top1": (0, 100), "R@1": (0, 100)})
    for entry in targets.values():
        for name in ("reconstruction", "mean_of_training", "nearest_neighbour", "truth"):
            for metric, value in entry[name].items():
                low, high = ranges[metric]
                assert value is not None and low <= value <= high, (name, metric, value)

    run = mmr.load_mmr(run_dir)
    encoded = mmr.encode_rows(run.model, run.tokenizer, read_manifest(val_csv), report=lambda text: None)
    with torch.no_grad():
        for target, entry in targets.items():
            index = mmr.usable(encoded, target)
            assert entry["n"] == len(index) == int(mmr.usable_mask(encoded, target).sum())
            prediction = run.heads[target](*mmr.head_inputs(encoded, target, index))
            true = mmr.truth(encoded, target, index)
            if target == "image":  # PSNR at peak 1.0, each image's own MSE, averaged over images
                mse = (prediction - true).pow(2).flatten(1).mean(1)
                expected = {"psnr_db": (10 * torch.log10(1 / mse)).mean().item()}
            elif target == "audio":  # MSE of the z-scored log-mel
                expected = {"mse": (prediction - true).pow(2).mean().item()}
            else:  # % of the truth's real tokens (no padding, no <s>) predicted at their position
                real = encoded["token_mask"][index].bool()
                real[:, 0] = False
                hits = ((prediction.argmax(-1) == true) & real).sum(1) / real.sum(1)
                expected = {"token_accuracy": 100 * hits.mean().item()}
            for metric, value in expected.items():
                assert entry["reconstruction"][metric] == pytest.approx(value, abs=2e-3, rel=1e-3), (target, metric)
            assert entry["truth"]["R@1"] >= entry["reconstruction"]["R@1"] or entry["truth"]["R@1"] == 100.0


def test_a_batch_without_a_usable_row_is_skipped_and_counted(tiny):
    """A sparse-modality manifest with one target: of three training rows only one has audio, so with batches of two
    one batch in every epoch has no row the text head can use. Training skips that step (it crashed with "'float'
    object has no attribute 'backward'") and says how many it skipped."""
    with open(tiny / "data" / "train.csv", newline="", encoding="utf-8") as f:
        full = [row for row in csv.DictReader(f) if row["img_path"] and row["wav_path"] and row["caption"]][:3]
    full[1]["wav_path"] = full[2]["wav_path"] = ""  # no audio: no text <- image + audio
    sparse = tiny / "data" / "sparse.csv"
    with open(sparse, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(full[0]))
        writer.writeheader()
        writer.writerows(full)
    out = tiny / "sparse-run"
    args = ["mmr", "train", "--checkpoint", str(tiny / "checkpoint"), "--data", str(sparse), "--target", "text"]
    args += ["--val-data", str(tiny / "data" / "val.csv"), "--out", str(out), *FAST, "--set", "batch_size=2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["skipped_steps"]) for r in records] == [(1, 2, 1), (2, 4, 1)]
    assert "1 step(s) without a usable row skipped" in result.output
    assert set(records[-1]["val"]) == {"text"} and records[-1]["train_loss"]["text"] > 0
