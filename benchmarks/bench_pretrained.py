"""Benchmark: what a real pretrained text tower (all-MiniLM-L6-v2, from its wheel) buys over one trained from scratch.

    make demo-pretrained                                  # the full run, CPU, about 25 min on 2 shared cores
    python benchmarks/bench_pretrained.py --quick         # CI-size smoke run, under a minute

On the demo's synthetic set (``synergy.train.datasets.synth``: 20 shape x colour classes, 16 seen in training, 4
held-out combinations), with the image and audio towers trained from scratch (the ``tiny`` preset) and three text
towers:

    scratch        the preset's own RoBERTa-shaped text tower, trained from scratch with a tokenizer fitted on the data
    minilm_locked  all-MiniLM-L6-v2, locked (LiT: ``lock=("text",)``; only its projection trains)
    minilm_last2   all-MiniLM-L6-v2, locked but its last 2 layers trained (``unlock_last_layers={"text": 2}``)

three measurements, each over 3 training seeds (mean and min-max; one run's held-out number can move 20 points):

1. side by side: zero-shot top-1 (audio, image, audio+image fused) among all 20 classes, on val (seen classes) and
   on the held-out combinations;
2. the same with label phrasings never seen in training (``UNSEEN_PHRASINGS``: fixed before any result was looked
   at; every word of them is absent from the synthetic set's labels, prompts and captions, which already use
   synonyms such as crimson, azure, disc, box and five-pointed star);
3. a learning curve: training rows per class (``FULL["rows_per_class"]``) against val zero-shot top-1, scratch vs
   minilm_locked: how much data a user's own set needs. Fewer rows train for fewer steps (``FULL["steps"]``).

Writes ``benchmarks/results/pretrained-cpu.json`` (``--quick``: ``runs/bench-pretrained/quick.json``) with the
device, versions, git commit, the exact setup, every run's numbers and the summaries; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

from bench_inputs import minilm_folder, read_csv, write_csv
from provenance import ROOT, git_commit, write_result

# chosen before any result, for every class; none of these words occurs in the synthetic set's text
# (COLOUR_SYNONYMS, SHAPE_SYNONYMS, CAPTION_TEMPLATES and PROMPT_TEMPLATES in train/datasets/synth.py)
UNSEEN_PHRASINGS = {
    "red circle": "ruby orb",
    "red square": "ruby tile",
    "red triangle": "ruby pyramid",
    "red star": "ruby pentagram",
    "red cross": "ruby crossed bars",
    "green circle": "jade orb",
    "green square": "jade tile",
    "green triangle": "jade pyramid",
    "green star": "jade pentagram",
    "green cross": "jade crossed bars",
    "blue circle": "sapphire orb",
    "blue square": "sapphire tile",
    "blue triangle": "sapphire pyramid",
    "blue star": "sapphire pentagram",
    "blue cross": "sapphire crossed bars",
    "yellow circle": "amber orb",
    "yellow square": "amber tile",
    "yellow triangle": "amber pyramid",
    "yellow star": "amber pentagram",
    "yellow cross": "amber crossed bars",
}

TEXT_TOWERS = {
    "scratch": {},
    "minilm_locked": {"lock": ("text",)},
    "minilm_last2": {"lock": ("text",), "unlock_last_layers": {"text": 2}},
}
CURVE_TOWERS = ("scratch", "minilm_locked")
QUERIES = ("audio", "image", "audio+image")

# the full run: sized (measured, then extrapolated) so that the whole script takes about 25 minutes on 2 shared cores
FULL = {
    "preset": "tiny",  # image 30 px ViT and 0.5 s AST, 2 layers x 36 each, trained from scratch in every run
    "seeds": (0, 1, 2),
    "rows_per_class": (4, 16, 64, 160),  # the side-by-side runs are the curve's last point
    # measured with OMP_NUM_THREADS=1 under load 3.5: ~0.1 s a step for scratch and locked (plus ~10 s filling the
    # locked tower's cache), ~0.5 s for minilm_last2 (its whole tower runs every step), ~4 s per evaluation
    "steps": {4: 100, 16: 200, 64: 300, 160: 400},
    "batch_size": 64,  # or the rows, where fewer (4 rows x 16 classes = 64)
    "val_per_class": 10,
    "heldout_per_class": 10,
    "lr": 2e-3,
}
QUICK = {
    "preset": "tiny",
    "seeds": (0,),
    "rows_per_class": (2, 4),
    "steps": {2: 2, 4: 3},
    "batch_size": 32,
    "val_per_class": 1,
    "heldout_per_class": 2,
    "lr": 2e-3,
}
DATA = {"seed": 0, "image_size": 32, "clip_seconds": 0.5, "missing_rate": 0.0}  # every train row has all modalities


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-size smoke run: 1 seed, toy sizes, seconds")
    parser.add_argument("--work", default="runs/bench-pretrained", help="folder for the data, MiniLM and the runs")
    parser.add_argument("--out", default=None, help="the JSON (default: benchmarks/results/pretrained-cpu.json)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    out = Path(args.out) if args.out else (Path(args.work) / "quick.json" if args.quick else RESULT)

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    measured_on = environment(args.threads)  # first: the commit is the one the runs start from
    work = Path(args.work) / ("quick" if args.quick else "full")
    data = prepare_data(work / "data", setup)
    minilm = minilm_folder(work / "minilm", "bench_pretrained")
    classes = json.loads((data / "classes.json").read_text())

    def run(tower: str, per_class: int, seed: int) -> dict:
        return train_and_evaluate(work, data, classes, minilm, setup, tower, per_class, seed)

    biggest = max(setup["rows_per_class"])
    side = {tower: [run(tower, biggest, seed) for seed in setup["seeds"]] for tower in TEXT_TOWERS}
    curve = {tower: {} for tower in CURVE_TOWERS}
    for per_class in setup["rows_per_class"]:
        for tower in CURVE_TOWERS:
            runs = side[tower] if per_class == biggest else [run(tower, per_class, s) for s in setup["seeds"]]
            curve[tower][str(per_class)] = {"runs": runs, "summary": summarise(runs)}
    result = {
        "benchmark": "bench_pretrained",
        "quick": args.quick,
        "environment": measured_on,
        "setup": setup_record(setup, classes),
        "unseen_phrasings": UNSEEN_PHRASINGS,
        "side_by_side": {tower: {"runs": runs, "summary": summarise(runs)} for tower, runs in side.items()},
        "learning_curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_result(out, result)
    print(tables(result))
    print(f"wrote {out} in {result['seconds']:.0f} s")


RESULT = ROOT / "benchmarks" / "results" / "pretrained-cpu.json"


# ----------------------------------------------------------------------------------------------------- the data


def prepare_data(folder: Path, setup: dict) -> Path:
    """The synthetic set (the most rows per class the run needs), a train manifest per curve point (the first k rows
    of each class), and val / held-out manifests whose labels are the unseen phrasings. Reused when present."""
    from synergy.train.datasets.synth import synthesize

    if not (folder / "classes.json").is_file():
        synthesize(
            folder,
            seed=DATA["seed"],
            train_per_class=max(setup["rows_per_class"]),
            val_per_class=setup["val_per_class"],
            heldout_per_class=setup["heldout_per_class"],
            image_size=DATA["image_size"],
            clip_seconds=DATA["clip_seconds"],
            missing_rate=DATA["missing_rate"],
            workers=1,
            overwrite=True,
        )
    header, rows = read_csv(folder / "train.csv")
    for per_class in setup["rows_per_class"]:
        kept, counts = [], dict.fromkeys((r["label"] for r in rows), 0)
        for r in rows:
            if counts[r["label"]] < per_class:
                counts[r["label"]] += 1
                kept.append(r)
        write_csv(folder / f"train-{per_class}.csv", header, kept)
    for split in ("val", "heldout"):
        header, rows = read_csv(folder / f"{split}.csv")
        write_csv(folder / f"{split}-unseen.csv", header, [{**r, "label": UNSEEN_PHRASINGS[r["label"]]} for r in rows])
    return folder


# ------------------------------------------------------------------------------------------------------ the runs


def train_and_evaluate(work, data, classes, minilm, setup, tower: str, per_class: int, seed: int) -> dict:
    """One training run -> its zero-shot top-1 (percent) per split and query, and its wall time. The run's folder is
    removed afterwards (only the numbers are kept)."""
    from synergy.core.checkpoint import load_checkpoint
    from synergy.train.config import TrainConfig
    from synergy.train.evaluate import evaluate
    from synergy.train.loop import train

    overrides = {"prompt_templates": classes["templates"]}
    if tower != "scratch":
        overrides["text.pretrained"] = str(minilm)
    rows = per_class * len(classes["train_classes"])
    steps = setup["steps"][per_class]
    config = TrainConfig(
        model=setup["preset"],
        model_overrides=overrides,
        data=str(data / f"train-{per_class}.csv"),
        out=str(work / "run"),
        text_mode="mixed",  # as the demo: prompts and captions (the captions carry the set's synonyms)
        batch_size=min(setup["batch_size"], rows),
        steps=steps,
        lr=setup["lr"],
        weight_decay=0.1,
        warmup_steps=max(1, steps // 10),
        workers=0,
        save_every=steps,
        seed=seed,
        **TEXT_TOWERS[tower],
    )
    started = time.perf_counter()
    model, tokenizer = load_checkpoint(train(config, progress=False, force=True))
    trained = time.perf_counter() - started
    labels = classes["train_classes"] + classes["heldout_classes"]
    unseen = [UNSEEN_PHRASINGS[label] for label in labels]
    record = {"tower": tower, "rows_per_class": per_class, "rows": rows, "seed": seed, "steps": steps}
    for split in ("val", "heldout"):
        record[split] = top1(evaluate(model, tokenizer, data / f"{split}.csv", labels))
        record[f"{split}_unseen"] = top1(evaluate(model, tokenizer, data / f"{split}-unseen.csv", unseen))
    record["train_seconds"] = round(trained, 1)
    record["seconds"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(work / "run")
    print(f"{tower:<14} {per_class:>4} rows/class seed {seed}: " + line(record), flush=True)
    return record


def top1(report: dict) -> dict:
    return {query: report["zero_shot"][query]["top1"] for query in QUERIES}


def line(record: dict) -> str:
    parts = [f"{split} " + "/".join(f"{record[split][q]:.0f}" for q in QUERIES) for split in SPLITS]
    return "  ".join(parts) + f"  ({record['seconds']:.0f} s)"


SPLITS = ("val", "heldout", "val_unseen", "heldout_unseen")


def summarise(runs: list[dict]) -> dict:
    """{split: {query: {mean, min, max}}} over the runs (seeds)."""
    return {
        split: {
            query: {
                "mean": round(statistics.fmean(r[split][query] for r in runs), 2),
                "min": min(r[split][query] for r in runs),
                "max": max(r[split][query] for r in runs),
            }
            for query in QUERIES
        }
        for split in SPLITS
    }


# ------------------------------------------------------------------------------------------------ the record


def environment(threads: int) -> dict:
    import tokenizers
    import torch
    import transformers

    return {
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), {threads} "
        "torch thread(s)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def setup_record(setup: dict, classes: dict) -> dict:
    from synergy.core.pretrained_folders import MINILM

    return {
        **setup,
        "data": {**DATA, "val_per_class": setup["val_per_class"], "heldout_per_class": setup["heldout_per_class"]},
        "classes": {"seen": classes["train_classes"], "heldout": classes["heldout_classes"]},
        "text_towers": {
            name: {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
            for name, settings in TEXT_TOWERS.items()
        },
        "minilm": {"distribution": MINILM.distribution, "sha256": MINILM.sha256},
        "text_mode": "mixed",
        "weight_decay": 0.1,
        "warmup": "steps // 10",
        "zero_shot": "top-1 among all 20 classes (seen + held-out), the data set's prompt templates ensembled",
    }


def cell(summary: dict) -> str:
    return f"{summary['mean']:.1f} ({summary['min']:.0f}-{summary['max']:.0f})"


def tables(result: dict) -> str:
    """Markdown: side by side, unseen phrasings, learning curve (mean and min-max over seeds)."""
    lines = ["zero-shot top-1 % (mean, min-max over seeds): audio / image / audio+image", ""]
    for title, splits in (("side by side", ("val", "heldout")), ("unseen phrasings", ("val_unseen", "heldout_unseen"))):
        lines += [
            f"### {title}",
            "",
            "| text tower | " + " | ".join(f"{s} {q}" for s in splits for q in QUERIES) + " |",
        ]
        lines.append("|---" * (1 + len(splits) * len(QUERIES)) + "|")
        for tower, entry in result["side_by_side"].items():
            cells = [cell(entry["summary"][s][q]) for s in splits for q in QUERIES]
            lines.append(f"| {tower} | " + " | ".join(cells) + " |")
        lines.append("")
    points = list(next(iter(result["learning_curve"].values())))
    lines += ["### learning curve: val zero-shot top-1 % (audio / image)", ""]
    lines += ["| rows per class | " + " | ".join(f"{t} {q}" for t in CURVE_TOWERS for q in ("audio", "image")) + " |"]
    lines.append("|---" * (1 + 2 * len(CURVE_TOWERS)) + "|")
    for point in points:
        cells = [
            cell(result["learning_curve"][t][point]["summary"]["val"][q])
            for t in CURVE_TOWERS
            for q in ("audio", "image")
        ]
        lines.append(f"| {point} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
