"""Video data: `synergy data synth --videos`, `synergy data from-videos` (labels from folders or a CSV, resumable, bad
videos reported), training from a `video_path` manifest (a random frame + a random audio crop per step; evaluation
pools the runtime's frames) and CLIP4VLA's text -> video / audio / video+audio retrieval with ties averaged."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from synergy.cli import main
from synergy.core.model import create_model
from synergy.runtime.search import l2_normalise
from synergy.runtime.video import load_video
from synergy.train.config import TrainConfig
from synergy.train.data import Collate, DataError, ManifestDataset, read_manifest
from synergy.train.datasets.from_videos import FromVideosError, from_videos
from synergy.train.datasets.synth_video import synthesize_videos
from synergy.train.evaluate import _recall_with_ties, embed_manifest, evaluate, ranks_with_ties
from synergy.train.loop import build_tokenizer, train


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """12 train + 12 val + 4 held-out synthetic clips: 32 px, 1.5 s at 4 fps, 16 kHz sound."""
    out = tmp_path_factory.mktemp("clips")
    synthesize_videos(out, seed=2, per_class={"train": 1, "val": 1, "heldout": 1}, size=32, seconds=1.5, fps=4)
    return out


def _dataset(model, rows):
    c = model.config
    return ManifestDataset(
        rows,
        image_size=c.image.image_size,
        mean=c.image.mean,
        std=c.image.std,
        sample_rate=c.audio.sample_rate,
        clip_seconds=c.audio.clip_seconds,
        text_mode="caption",
        templates=c.prompt_templates,
    )


def test_synth_videos_move_and_sound_by_class(clips):
    rows = list(csv.DictReader((clips / "train_videos.csv").read_text().splitlines()))
    assert len(rows) == 16 and all(r["video_path"].endswith(".mp4") and not r["img_path"] for r in rows)
    red = next(r for r in rows if r["label"] == "red circle")
    blue = next(r for r in rows if r["label"] == "blue square")
    decoded = {
        k: load_video(clips / r["video_path"], 16_000, positions=[0.0, 0.9]) for k, r in (("red", red), ("blue", blue))
    }
    frames = decoded["red"].frames
    assert decoded["red"].modalities == ("image", "audio") and not np.array_equal(frames[0], frames[-1])  # it moves
    assert frames[0][..., 0].mean() > frames[0][..., 2].mean()  # red shows red
    spectrum = {k: np.abs(np.fft.rfft(v.audio)) for k, v in decoded.items()}
    peak = {k: np.argmax(s) * 16_000 / (2 * (len(s) - 1)) for k, s in spectrum.items()}
    assert peak["red"] < 400 < 700 < peak["blue"]  # colour sets the pitch register (250 Hz vs 1 kHz bands)


def test_video_rows_train_on_a_random_frame_and_crop_and_evaluate_on_pooled_frames(clips):
    model = create_model("tiny")
    rows = read_manifest(clips / "train_videos.csv")
    assert rows[0].video is not None and rows[0].image is None and rows[0].audio is None
    dataset = _dataset(model, rows)
    first, again, other = dataset[(0, 11)], dataset[(0, 11)], dataset[(0, 12)]
    assert first["bad"] is None and first["image"].shape == (3, 30, 30) and first["audio"][0].shape == (1, 8000)
    np.testing.assert_array_equal(first["image"], again["image"])  # a pure function of the seed
    assert not np.array_equal(first["image"], other["image"])
    evaluation = dataset[0]
    assert evaluation["frames"].shape[0] == len(load_video(rows[0].video, 16_000).frames) == 1  # 1.5 s: 1 frame
    collate = Collate(build_tokenizer(model, rows), 30, dataset.clip_samples)
    batch = collate([dataset[i] for i in range(4)])
    assert batch["video_frames"].shape == (4, 3, 30, 30) and batch["frame_owner"].tolist() == [0, 1, 2, 3]
    assert batch["image_mask"].all() and batch["audio_mask"].all()
    # the audio windows of a video row are the runtime's windows of its soundtrack (0.5 s clips, 50% overlap)
    assert batch["waveform"].shape[0] == 4 * 5


def test_eval_pools_frames_as_the_runtime_does(clips, tmp_path):
    """A 4.5 s clip has 4 frames: its image embedding is the normalised mean of the 4 frame embeddings."""
    from synergy.runtime.image import preprocess_image
    from synergy.train.datasets.synth_video import render_video, write_video

    frames = render_video("star", "green", 32, 18, np.random.default_rng(0))
    write_video(tmp_path / "long.mp4", frames, 4, np.zeros(16_000 * 4, np.float32) + 0.01, 16_000)
    (tmp_path / "m.csv").write_text("img_path,wav_path,label,caption,video_path\n,,green star,a green star,long.mp4\n")
    model = create_model("tiny").eval()
    tokenizer = build_tokenizer(model, read_manifest(tmp_path / "m.csv"))
    data = embed_manifest(model, tokenizer, tmp_path / "m.csv")
    c = model.config.image
    decoded = load_video(tmp_path / "long.mp4", 16_000)
    pixels = np.stack([preprocess_image(__import__("PIL.Image").Image.fromarray(f), 30, c.mean, c.std)
                       for f in decoded.frames])  # fmt: skip
    assert len(decoded.frames) == 4
    with torch.no_grad():
        each = model.encode_image(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(data["image"][0].numpy(), l2_normalise(each.mean(0)), atol=1e-5)


def test_ranks_with_ties_against_a_reference():
    query = torch.eye(4)
    keys = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1.0]])
    # row 0: its key ties with key 1 (score 1) -> rank 1 + 1/2; rows 1 and 2: all four keys score 0 -> 1 + 3/2;
    # row 3: the unique best -> 1
    assert ranks_with_ties(query, keys).tolist() == [1.5, 2.5, 2.5, 1.0]
    metrics = _recall_with_ties(query, keys)
    assert metrics["R@1"] == 25.0 and metrics["R@5"] == 100.0 and metrics["MdR"] == 2.0 and metrics["n"] == 4
    rng = np.random.default_rng(0)
    q, k = rng.integers(0, 3, (9, 2)).astype(np.float32), rng.integers(0, 3, (9, 2)).astype(np.float32)
    sim = q @ k.T
    reference = [1 + (sim[i] > sim[i, i]).sum() + ((sim[i] == sim[i, i]).sum() - 1) / 2 for i in range(9)]
    assert ranks_with_ties(torch.from_numpy(q), torch.from_numpy(k)).tolist() == reference
    assert _recall_with_ties(torch.from_numpy(q), torch.from_numpy(k))["MdR"] == float(np.median(reference))


def test_from_videos_trains_and_evaluates(clips, tmp_path):
    """A VGGSound-like folder (DIR/<label>/<clip>.mp4 + a broken file) -> from-videos (folders as labels) ->
    synergy train on its manifest; a rerun resumes; a labels CSV works too; video_path training and eval run."""
    source = tmp_path / "vggsound"
    for path in sorted((clips / "videos" / "train").glob("*.mp4"))[:8]:
        label = path.stem.rsplit("_", 1)[0]
        (source / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, source / label / path.name)
    (source / "broken").mkdir()
    (source / "broken" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    runner = CliRunner()
    args = ["data", "from-videos", str(source), "--labels-from-folders", "--out", str(tmp_path / "data")]
    result = runner.invoke(main, args)
    assert result.exit_code == 1, result.output  # one bad video: reported, the others written
    assert "1 bad video(s) skipped" in result.output and "Traceback" not in result.output
    report = (tmp_path / "data" / "bad_videos.txt").read_text()
    assert "broken.mp4" in report and len(report.splitlines()) == 1
    manifest = list(csv.DictReader((tmp_path / "data" / "manifest.csv").read_text().splitlines()))
    assert len(manifest) == 8 and all(
        r["img_path"].endswith(".png") and r["wav_path"].endswith(".wav") for r in manifest
    )
    assert manifest[0]["caption"] == f"a video of a {manifest[0]['label']}."
    # resumable: a rerun decodes nothing again; a lost journal line is redone
    journal = tmp_path / "data" / "progress.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-1]) + "\n")
    again = runner.invoke(main, args)
    assert "8 done by an earlier run" in again.output and len(journal.read_text().splitlines()) == 9
    # a labels CSV (file,label,caption) and K frames per video
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("file,label,caption\n")
        for path in sorted(source.rglob("*.mp4"))[:3]:
            f.write(f"{path.relative_to(source).as_posix()},thing {path.stem[:3]},a caption\n")
    summary = from_videos(source, tmp_path / "csv", labels_csv=tmp_path / "labels.csv", frames=2, workers=1,
                          progress=False)  # fmt: skip
    assert summary.rows == 6 and summary.unlabelled == 6 and summary.bad == 0

    base = dict(model="tiny", out=str(tmp_path / "run"), batch_size=8, steps=3, warmup_steps=1, workers=0,
                save_every=100, seed=0)  # fmt: skip
    train(TrainConfig(data=str(tmp_path / "data" / "manifest.csv"), **base), progress=False)
    # training straight from the video_path manifest, with the intra-audio term on
    checkpoint = train(
        TrainConfig(
            data=str(clips / "train_videos.csv"), audio_intra_weight=0.5, **{**base, "out": str(tmp_path / "v")}
        ),
        progress=False,
    )
    records = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    from synergy.core.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(checkpoint)
    result = evaluate(model, tokenizer, clips / "val_videos.csv")
    assert set(result["video_retrieval"]) == {"text->video", "text->audio", "text->video+audio"}
    assert result["video_retrieval"]["text->video"]["n"] == 16 and result["bad_rows"] == []


def test_manifest_check_counts_video_rows_and_finds_missing_videos(clips, tmp_path):
    from synergy.train.manifest_check import check_manifest

    model = create_model("tiny")
    check = check_manifest(clips / "val_videos.csv", _dataset(model, read_manifest(clips / "val_videos.csv")))
    assert check.problems == () and check.missing["image"] == check.missing["audio"] == 0
    text = (clips / "val_videos.csv").read_text().replace("videos/val/", f"{clips}/videos/val/")
    (tmp_path / "m.csv").write_text(text.rstrip("\n") + "\n,,red circle,a red circle,nowhere.mp4\n")
    with pytest.raises(DataError, match=r"1 of 17 rows cannot be read[\s\S]*nowhere.mp4: no such file"):
        check_manifest(tmp_path / "m.csv", _dataset(model, read_manifest(tmp_path / "m.csv")))


def test_from_videos_writes_phone_videos_upright(tmp_path):
    """A portrait phone video (landscape pictures + a display matrix turning them a quarter clockwise) becomes a
    portrait PNG: from-videos, like training's ManifestDataset, decodes through runtime.video.load_video."""
    from PIL import Image

    from synergy.runtime.video import import_av

    av = import_av()
    picture = np.full((24, 40, 3), 128, np.uint8)
    picture[:8, :8] = (255, 0, 0)  # red block top-left as coded
    (tmp_path / "videos" / "portrait").mkdir(parents=True)
    with av.open(str(tmp_path / "videos" / "portrait" / "phone.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 40, 24, "yuv420p"
        if not hasattr(stream, "set_display_rotation"):
            pytest.skip(f"PyAV {av.__version__} cannot write a display matrix (set_display_rotation is newer)")
        stream.set_display_rotation(-90)  # PyAV counts counter-clockwise: -90 is a quarter turn clockwise
        for _ in range(4):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode(None))
    summary = from_videos(tmp_path / "videos", tmp_path / "data", labels_from_folders=True, workers=1, progress=False)
    assert summary.rows == 1 and summary.bad == 0
    row = next(csv.DictReader((tmp_path / "data" / "manifest.csv").read_text().splitlines()))
    written = np.asarray(Image.open(tmp_path / "data" / row["img_path"]).convert("RGB")).astype(int)
    assert written.shape == (40, 24, 3)  # portrait, as a phone shows it
    np.testing.assert_allclose(written[:8, -8:].mean((0, 1)), (255, 0, 0), atol=30)  # top-left turned to top-right
    assert np.abs(written - np.rot90(picture, -1)).mean() < 4


def test_from_videos_caption_template_takes_label_or_braces_and_refuses_others(clips, tmp_path):
    """One prompt filler: `{label}` and `{}` write the same captions; a template without a placeholder (or with an
    unknown field) is refused before any video is decoded."""
    source = tmp_path / "videos"
    for path in sorted((clips / "videos" / "train").glob("*.mp4"))[:2]:
        (source / path.stem.rsplit("_", 1)[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, source / path.stem.rsplit("_", 1)[0] / path.name)
    captions = {}
    for name, template in (("braces", "the sound of {}."), ("label", "the sound of {label}.")):
        from_videos(source, tmp_path / name, labels_from_folders=True, caption_template=template, workers=1,
                    progress=False)  # fmt: skip
        rows = csv.DictReader((tmp_path / name / "manifest.csv").read_text().splitlines())
        captions[name] = sorted((r["label"], r["caption"]) for r in rows)
    assert captions["braces"] == captions["label"] and len(captions["label"]) == 2
    assert all(caption == f"the sound of {label}." for label, caption in captions["label"])
    for bad in ("a video", "a {kind} of {}"):
        with pytest.raises(FromVideosError, match="--caption-template"):
            from_videos(source, tmp_path / "bad", labels_from_folders=True, caption_template=bad, workers=1,
                        progress=False)  # fmt: skip
        assert not (tmp_path / "bad").exists()
