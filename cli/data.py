"""`synergy data synth`, `synergy data spoken`, `synergy data debian` and `synergy data from-videos`: the commands that
write data sets."""

from __future__ import annotations

import sys

import click

from .options import EXIT_SOME_FAILED, UsageProblem


@click.group("data")
def data_group():
    """Data sets."""


@data_group.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write PNG/WAV/CSV files into.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--train-per-class", default=160, show_default=True, type=int)
@click.option("--val-per-class", default=20, show_default=True, type=int)
@click.option("--heldout-per-class", default=20, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out, replacing an earlier synth output.")
@click.option(
    "--videos",
    "videos_per_class",
    default=0,
    type=int,
    help="Also write N MP4 clips per class (moving shape + its sound) and {split}_videos.csv (video_path rows).",
)
def synth_command(out, seed, train_per_class, val_per_class, heldout_per_class, overwrite, videos_per_class):
    """Write the synthetic tri-modal data set (deterministic by --seed): PNG + WAV files, train/val/heldout CSVs,
    labels.txt and classes.json; with --videos N, also N short videos per class and split."""
    from synergy.train.datasets.synth import synthesize

    try:
        summary = synthesize(
            out,
            seed=seed,
            train_per_class=train_per_class,
            val_per_class=val_per_class,
            heldout_per_class=heldout_per_class,
            overwrite=overwrite,
        )
    except (FileExistsError, ValueError) as error:
        raise UsageProblem(str(error)) from error
    click.echo(summary)
    if videos_per_class:
        from synergy.train.datasets.synth_video import synthesize_videos

        counts = {"train": videos_per_class, "val": max(1, videos_per_class // 4), "heldout": 1}
        written = synthesize_videos(out, seed=seed, per_class=counts)
        click.echo(f"  videos       {', '.join(p.name for p in written.values())} (MP4, H.264 + AAC)")


@data_group.command("spoken")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write PNG/WAV/CSV files into.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--train-per-word", default=8, show_default=True, type=int, help="Clips per word and training speaker.")
@click.option("--val-per-word", default=2, show_default=True, type=int, help="Clips per word and training speaker.")
@click.option("--unseen-per-word", default=4, show_default=True, type=int, help="Clips per word and held-out speaker.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out.")
def spoken_command(out, seed, train_per_word, val_per_word, unseen_per_word, overwrite):
    """Write spoken words (espeak-ng voices and speeds, 22.05 kHz WAV) paired with pictures of the words: train.csv,
    val.csv (voices heard in training) and unseen.csv (speakers never heard). Needs espeak-ng on PATH."""
    from synergy.train.datasets.spoken import SpokenError, synthesize_spoken

    try:
        summary = synthesize_spoken(out, seed=seed, train_per_word=train_per_word, val_per_word=val_per_word,
                                    unseen_per_word=unseen_per_word, overwrite=overwrite)  # fmt: skip
    except (FileExistsError, ValueError, SpokenError) as error:
        raise UsageProblem(str(error)) from error
    click.echo(summary)


@data_group.command("debian")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the files.")
@click.option("--seed", default=0, show_default=True, type=int, help="Which items are kept and which are held out.")
@click.option("--max-per-category", default=24, show_default=True, type=int, help="Pictures (and sounds) per category.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out.")
def debian_command(out, seed, max_per_category, overwrite):
    """Write a real tri-modal set from three Debian packages (openclipart-png pictures, sonic-pi-samples and
    sound-theme-freedesktop sounds): train.csv, val.csv (items never seen in training) and heldout.csv (categories
    never seen in training), labels.txt, the packages' licences. Needs: apt-get install openclipart-png
    sonic-pi-samples sound-theme-freedesktop."""
    from synergy.train.datasets.debian import DebianError, build_debian

    try:
        summary = build_debian(out, seed=seed, max_per_category=max_per_category, overwrite=overwrite)
    except (FileExistsError, ValueError, DebianError) as error:
        raise UsageProblem(str(error)) from error
    click.echo(summary)


@data_group.command("from-videos")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False, exists=True), help="CSV: file,label[,caption] "
              "or VGGSound's vggsound.csv.")  # fmt: skip
@click.option("--labels-from-folders", is_flag=True, help="The label is each video's folder under FOLDER.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for manifest.csv, PNGs, WAVs.")
@click.option("--frames", default=1, show_default=True, type=int, help="Frames per video (1: the middle frame).")
@click.option("--caption-template", default="a video of a {}.", show_default=True, help="Caption when none given.")
@click.option("--sample-rate", default=16_000, show_default=True, type=int, help="Soundtrack WAV rate (Hz).")
@click.option("--workers", default=2, show_default=True, type=int, help="Processes decoding videos.")
def from_videos_command(folder, labels_csv, labels_from_folders, out, frames, caption_template, sample_rate, workers):
    """Turn a folder of videos into a manifest (img_path, wav_path, label, caption): the middle frame (or --frames K)
    as PNG and the soundtrack as WAV. Resumable (rerun to continue); bad videos are listed and skipped (exit 1)."""
    from synergy.train.datasets.from_videos import FromVideosError, from_videos

    try:
        summary = from_videos(
            folder,
            out,
            labels_csv=labels_csv,
            labels_from_folders=labels_from_folders,
            frames=frames,
            caption_template=caption_template,
            sample_rate=sample_rate,
            workers=workers,
            progress=sys.stderr.isatty(),
        )
    except (FromVideosError, ImportError) as error:
        raise UsageProblem(str(error)) from error
    click.echo(summary)
    if summary.bad:
        sys.exit(EXIT_SOME_FAILED)
