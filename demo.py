"""`make demo`: synthesize data -> train the `small` preset on CPU -> evaluate -> export -> classify with the
torch-free runtime. Re-running resumes an interrupted run and reuses finished steps."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEMO_STEPS = 1400  # val zero-shot >= 80% for image and audio; about 8.5 min on 2 cores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/demo", help="Folder for data, checkpoint, metrics and bundle.")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from synergy.export import export_bundle
    from synergy.train.config import TrainConfig
    from synergy.train.data import read_manifest
    from synergy.train.datasets.synth import synthesize
    from synergy.train.evaluate import evaluate, format_report, write_report
    from synergy.train.loop import train

    start = time.perf_counter()
    run = Path(args.run)
    data = run / "data"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not (data / "classes.json").is_file():
        print(f"[1/5] synthesizing the tri-modal data set into {data}")
        print(synthesize(data, seed=args.seed))
    else:
        print(f"[1/5] reusing the data set in {data}")
    classes = json.loads((data / "classes.json").read_text())

    config = TrainConfig(
        model="small",
        model_overrides={"prompt_templates": classes["templates"]},  # zero-shot prompts come with the data set
        data=str(data / "train.csv"),
        val_data=None,  # evaluated below, val and held-out together against all labels, not by the trainer
        out=str(run),
        text_mode="mixed",
        batch_size=64,
        steps=args.steps,
        lr=1e-3,
        weight_decay=0.1,
        warmup_steps=50,
        workers=1,
        save_every=100,
        seed=args.seed,
    )
    resume = (run / "checkpoint" / "train_state").is_dir()
    print(
        f"[2/5] training the `small` preset for {config.steps} steps x {config.batch_size} on CPU"
        + (" (resuming)" if resume else "")
    )
    try:
        checkpoint = train(config, resume=resume)
    except KeyboardInterrupt:  # the trainer saved the finished steps: say how to continue, no traceback
        sys.exit(f"\ninterrupted; the finished steps are in {run / 'checkpoint'}: run `make demo` again to resume")

    print("[3/5] evaluating: zero-shot among all classes (seen + held-out combinations), retrieval")
    from synergy.core.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(checkpoint)
    labels = classes["train_classes"] + classes["heldout_classes"]
    results = {split: evaluate(model, tokenizer, data / f"{split}.csv", labels) for split in ("val", "heldout")}
    write_report(results, run / "eval.json")
    print(format_report(results))

    print(f"[4/5] exporting to {run / 'bundle'} (ONNX, verified against PyTorch)")
    print(export_bundle(checkpoint, run / "bundle", fmt="onnx", precision="fp32", force=True))

    print("[5/5] zero-shot with the torch-free runtime (what `synergy infer` uses)")
    from synergy.runtime import Runtime

    runtime = Runtime.open(run / "bundle")
    rows = [(row.audio, row.label) for row in read_manifest(data / "val.csv") if row.audio]  # captions hold commas
    predictions = runtime.classify(labels, audio=[str(wav) for wav, _ in rows], top_k=1)
    for (wav, label), prediction in list(zip(rows, predictions))[:3]:
        best = prediction.top[0]
        print(f"  {wav.relative_to(data)}: {best.label!r} (p={best.probability:.2f}); truth {label!r}")
    correct = sum(p.ok and p.top[0].label == label for (_, label), p in zip(rows, predictions))
    print(f"  runtime audio -> label top-1 on val: {100 * correct / len(rows):.1f}% of {len(rows)} clips")
    labels_file = run / "labels.txt"  # one label per line: what `synergy infer --labels` reads
    labels_file.write_text("\n".join(labels) + "\n", encoding="utf-8")
    synergy = Path(sys.executable).with_name("synergy")  # the venv's entry point, runnable without activating it
    print(
        f"\ndemo finished in {time.perf_counter() - start:.0f} s; results in {run}/eval.json\n"
        f"try: {synergy if synergy.is_file() else 'synergy'} infer --audio '{data}/audio/val/*.wav' "
        f"--labels {labels_file} --bundle {run / 'bundle'} --top-k 3"
    )


if __name__ == "__main__":
    main()
