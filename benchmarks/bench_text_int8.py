"""Benchmark: a real pretrained text tower (all-MiniLM-L6-v2, from its wheel) in int8 and bf16, against PyTorch fp32.

    python benchmarks/bench_text_int8.py --out benchmarks/results/text-int8-minilm-cpu.json
    python benchmarks/bench_text_int8.py --sentences 24 --budget 2 --rounds 1     # smoke run, about a minute

What a user of a sentence-embedding tower asks before shipping it in int8: does it still embed as the fp32 model
does, and is it faster than torch? The tiny preset with MiniLM as its text tower (6 x 384, mean pooling, 256
tokens; the image and audio towers are not measured) is saved as a checkpoint and exported by `synergy export`'s
own code (``export_bundle``) at fp32, int8 dynamic, int8 static (whose text tower stays fp32) and int8 static with
``--int8-text`` (the text tower in int8, SmoothQuant) (the export's gate is measured and recorded
with its thresholds at 0: the random image and audio towers make its zero-shot agreement meaningless here). Real
English sentences (this repository's README and docs, sentence by sentence, 12-400
characters) are embedded by every configuration:

    torch           the model in PyTorch, eager fp32, no_grad (the reference)
    torch-bf16      the same under torch.autocast("cpu", torch.bfloat16)
    <bundle>@<backend>  the runtime (``Runtime.open(bundle, backend)``, ``embed_text``): every bundle on
                    onnxruntime, and the fp32 and static ones on OpenVINO (bf16 hint) where the openvino extra is
                    installed

Accuracy: cosine of each sentence's embedding to torch fp32 (min, mean), and retrieval agreement: for every
sentence, whether its nearest other sentence is the one torch fp32 finds. Speed: interleaved rounds (every
configuration once per round, so drift of the machine falls on all), each timing whole passes over the sentences
in batches of --batch for --budget / --rounds seconds; sentences per second from the median pass, and the speed-up
against torch and torch-bf16 within each round.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_inputs import minilm_folder  # benchmarks/: on sys.path when run as a script
from bench_runtime import cosine, environment
from provenance import write_result

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "text-int8-minilm-cpu.json"
BUNDLES = {
    "fp32": {},
    "int8-dynamic": {"int8_method": "dynamic"},
    "int8-static": {"int8_method": "static"},  # its text tower stays fp32 (export.bundle.tower_precision)
    "int8-static-text": {"int8_method": "static", "int8_text": True},  # --int8-text: the text tower int8 too
}
OPENVINO_BUNDLES = ("fp32", "int8-static", "int8-static-text")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="folder for MiniLM and the bundles (default: a temp dir)")
    p.add_argument("--threads", type=int, default=2, help="torch and runtime intra-op threads")
    p.add_argument("--sentences", type=int, default=240, help="sentences embedded (from README.md and docs/*.md)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timed passes per configuration")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULT)
    return p.parse_args(argv)


def sentences(count: int) -> list[str]:
    """Real English text of varied length: this repository's README and docs, split into sentences."""
    text = " ".join(path.read_text(encoding="utf-8") for path in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))])
    text = re.sub(r"`|\*|#|\|", " ", text)
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text)]
    found = list(dict.fromkeys(" ".join(s.split()) for s in found if 12 <= len(s.strip()) <= 400))
    if len(found) < count:
        sys.exit(f"bench_text_int8: only {len(found)} sentences in README.md and docs/; pass --sentences {len(found)}")
    return found[:: max(1, len(found) // count)][:count]


def checkpoint_with_minilm(work: Path) -> Path:
    """The tiny preset with all-MiniLM-L6-v2 as its text tower, saved as `synergy train` saves a checkpoint."""
    from synergy.core.checkpoint import save_checkpoint
    from synergy.core.model import create_model
    from synergy.core.tokenizer import load_pretrained_tokenizer

    folder = minilm_folder(work / "minilm", "bench_text_int8")
    model = create_model("tiny", **{"text.pretrained": str(folder)}).eval()
    tokenizer = load_pretrained_tokenizer(folder, model.config.text.max_length, model.text_tower.config.pad_token_id)
    return save_checkpoint(work / "checkpoint", model, tokenizer)


def torch_runner(model, tokenizer, bf16: bool):
    import torch

    def run(texts: list[str]) -> np.ndarray:
        encodings = tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings])
        mask = torch.tensor([e.attention_mask for e in encodings])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model.encode_text(ids, mask).float().numpy()

    return run


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from synergy.core.checkpoint import load_checkpoint
    from synergy.export import export_bundle
    from synergy.runtime import Runtime
    from synergy.runtime.bundle import load_manifest

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-text-int8-"))
    texts = sentences(args.sentences)
    checkpoint = checkpoint_with_minilm(work)
    model, tokenizer = load_checkpoint(checkpoint)
    model.eval()
    tokenizer.enable_padding(pad_id=model.text_tower.config.pad_token_id or 0)  # a batch padded to its longest
    gates = {}
    for name, options in BUNDLES.items():
        started = time.perf_counter()
        # the gate is measured and recorded, not enforced: the tiny preset's random image / audio towers make its
        # zero-shot agreement meaningless here, and the text tower's cosines are what this benchmark reports
        report = export_bundle(checkpoint, work / name, precision=name.split("-")[0], force=True, min_cosine=0.0,
                               min_agreement=0.0, **options)  # fmt: skip
        manifest = load_manifest(work / name)
        gates[name] = {"export_seconds": round(time.perf_counter() - started, 1), "report": report,
                       "verification": manifest.extra.get("verification")}  # fmt: skip
        print(f"exported {name} in {gates[name]['export_seconds']} s")

    configs = {"torch": torch_runner(model, tokenizer, False), "torch-bf16": torch_runner(model, tokenizer, True)}
    backends = ["onnxruntime"] + (["openvino-bf16"] if _has_openvino() else [])
    for backend in backends:
        for name in BUNDLES if backend == "onnxruntime" else OPENVINO_BUNDLES:
            runtime = Runtime.open(work / name, backend=backend, threads=args.threads, batch_size=args.batch)
            configs[f"{name}@{backend}"] = lambda batch, r=runtime: r.embed_text(batch)

    def embed_all(run) -> np.ndarray:
        return np.concatenate([run(texts[i : i + args.batch]) for i in range(0, len(texts), args.batch)])

    reference = embed_all(configs["torch"])
    similarity = reference @ reference.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(1)
    accuracy = {}
    for name, run in configs.items():
        out = embed_all(run)
        cos = cosine(out, reference)
        scores = out @ out.T
        np.fill_diagonal(scores, -np.inf)
        accuracy[name] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                          "nearest_agreement": float((scores.argmax(1) == nearest).mean())}  # fmt: skip

    passes = {name: [] for name in configs}  # per round: seconds of each whole pass
    for round_index in range(args.rounds):
        for name, run in configs.items():
            embed_all(run)  # warm-up
            times, started = [], time.perf_counter()
            while len(times) < 2 or time.perf_counter() - started < args.budget / args.rounds:
                t0 = time.perf_counter()
                embed_all(run)
                times.append(time.perf_counter() - t0)
            passes[name].append(times)
            print(f"  round {round_index + 1}/{args.rounds}  {name:<28} {len(texts) / statistics.median(times):8.1f} "
                  f"sentences/s ({len(times)} passes)", flush=True)  # fmt: skip

    rows = []
    for name in configs:
        medians = [statistics.median(t) for t in passes[name]]
        row = {"config": name, "sentences_per_s": len(texts) / statistics.median([t for r in passes[name] for t in r]),
               "round_medians_s": [round(m, 4) for m in medians], **accuracy[name]}  # fmt: skip
        for peer in ("torch", "torch-bf16"):
            ratios = [statistics.median(p) / m for p, m in zip(passes[peer], medians)]
            row[f"speedup_vs_{peer}"] = statistics.median(ratios)
            row[f"speedup_vs_{peer}_range"] = [min(ratios), max(ratios)]
        rows.append(row)
        print(f"  {name:<28} {row['sentences_per_s']:8.1f}/s  x{row['speedup_vs_torch']:.2f} torch  "
              f"x{row['speedup_vs_torch-bf16']:.2f} torch-bf16  cos min {row['cosine_min']:.5f}  "
              f"nearest {100 * row['nearest_agreement']:.1f}%")  # fmt: skip

    result = {
        "benchmark": "bench_text_int8",
        "environment": environment("cpu", args.threads),
        "args": {k: str(v) for k, v in vars(args).items()},
        "tower": "all-MiniLM-L6-v2 (6 x 384, mean pooling, 256 tokens) + the tiny preset's projection",
        "sentences": len(texts),
        "exports": gates,
        "rows": rows,
    }
    write_result(args.out, result)
    print(f"wrote {args.out}")


def _has_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


if __name__ == "__main__":
    main()
