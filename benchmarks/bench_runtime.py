"""Benchmark: the torch-free runtime (onnxruntime) against PyTorch inference of the same checkpoint.

    python benchmarks/bench_runtime.py                                   # after `make demo`: small + base audio, CPU
    python benchmarks/bench_runtime.py --skip-base --batches 1 8 --budget 5   # quicker
    python benchmarks/bench_runtime.py --models base-audio --configs torch ort-opset18 ort --batches 8 --skip-cold
    python benchmarks/bench_runtime.py --models base-audio --batches 8 --rounds 3 --skip-cold \
        --out benchmarks/results/runtime-cpu-base-speed.json             # every engine and precision side by side
    python benchmarks/bench_runtime.py --models base-image base-text --batches 1 8 --rounds 3 --skip-cold \
        --out benchmarks/results/runtime-cpu-base-towers.json            # ViT-B/16 and RoBERTa-base geometries
    python benchmarks/bench_runtime.py --models tiny-audio --skip-cold --budget 1   # smoke run, seconds, no demo
    python benchmarks/bench_runtime.py --device cuda                     # GPU: torch eager vs ORT CUDA EP

Two parts, on the audio tower (what `synergy infer --audio` runs) unless a --models name says another:

cold start   `synergy infer --audio x.wav --labels labels.txt --bundle BUNDLE` against a torch program that loads the
             checkpoint and prints the same answer: wall time from process start to exit (the result printed), and
             peak RSS (the child's ru_maxrss). One warm-up run each (page cache), then the median of --cold-runs.
throughput   one tower call on a batch of items (clips, images or sentences), per configuration:
               torch         the PyTorch model, eager, no_grad (the export source)
               torch-bf16    the same under torch.autocast("cpu", torch.bfloat16): the one line a torch user adds
               ort           the graph `synergy export` writes (opset 23: attention is ONNX's Attention op, which
                             onnxruntime runs fused), on the runtime's onnxruntime session settings
               ort-opset18   the same tower exported at opset 18 (what TensorRT / Triton bundles get): attention as
                             MatMul + Softmax with its NaN guard, which onnxruntime does not fuse
               ort-fused     the opset-18 graph after onnxruntime.transformers' optimizer (its "vit" fusions;
                             "bert" for a text tower)
               ort-int8-dynamic  `synergy export --precision int8 --quantize dynamic` (export.quantize.quantize_int8:
                             per-channel int8 weights of the transformer layers' MatMuls, activations quantized at run
                             time; front end, attention, norms and head fp32) on onnxruntime
               ort-int8-static   `--quantize static`: the same MatMuls as QDQ with activation scales calibrated on
                             8 other synthetic clips (the export calibrates on its verification set), on onnxruntime
               openvino-f32  the fp32 graph on the runtime's OpenVINO backend (`--backend openvino`): compiled for
                             this CPU, precision hint f32, latency hint
               openvino-bf16 the same with the bf16 precision hint (`--backend openvino-bf16`): bfloat16 matmuls on
                             AVX-512 BF16 / AMX
               openvino-int8 the ort-int8-static (QDQ) graph on the OpenVINO backend (`--backend openvino` on a static
                             int8 bundle): OpenVINO runs the QDQ MatMuls as int8 (VNNI / AMX) kernels
               openvino-int8-bf16  the same with the bf16 hint: what is not int8 runs in bfloat16
             Configurations are interleaved: --rounds rounds of A B C (each configuration, each batch), so drift of
             the machine (other processes, thermal or boost clocks) falls on every configuration alike. Each round
             opens a fresh onnxruntime session (one at a time: a session's arena grows to its largest batch, GBs
             at batch 32 on the base tower), warms it up with one call, then times the calls that fit in
             --budget / --rounds seconds (at least --min-reps). Reported per (configuration, batch): p50 and p99
             over all calls, the median of each round, their spread ((max - min) / median), and the speed-up
             against torch eager *within each round* (its min, median and max over rounds), which is the number to
             quote: both sides of each ratio ran minutes apart at most (the same against torch-bf16 when it runs).
             Accuracy of each configuration against torch on an evaluation set: cosine of the embeddings (mean and
             min) and zero-shot top-1 agreement.
             Models: `small` = the demo checkpoint (its val clips, zero-shot over its classes with the prompt
             ensemble); `base-audio` = the `base` preset's AST geometry (12 x 768, 10.24 s clips, 852 tokens) with
             random weights; `base-image` = its ViT-B/16 geometry (12 x 768, 224 x 224 pixels, 197 tokens) and
             `base-text` its RoBERTa-base geometry (12 x 768, 50,265-token vocabulary; --text-tokens tokens a
             sentence, no padding), random weights; `tiny-audio` / `tiny-image` / `tiny-text` = the `tiny` preset,
             random weights (smoke runs of this script). Random weights have no classes, so their "zero-shot" labels
             are the torch embeddings of other synthetic items: agreement then says whether a configuration keeps
             the nearest prototype. A text tower's static int8 is the text scheme `--int8-text` writes
             (SmoothQuant, the MLPs' GELU-fed MatMuls float); an image tower's the plain one, as the export does.

JSON goes to benchmarks/results/runtime-<device>.json (device: CPU model, ISA flags such as AVX2 / AVX-512 / VNNI /
BF16 / AMX, thread settings, load average; versions, commit) and a table is printed. CI never runs this; the
benchmarks/README.md's table comes from its output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import git_commit, write_result  # benchmarks/provenance.py: this folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ["torch", "torch-bf16", "ort", "ort-opset18", "ort-fused", "ort-int8-dynamic", "ort-int8-static",
           "openvino-f32", "openvino-bf16", "openvino-int8", "openvino-int8-bf16"]  # fmt: skip
OPENVINO_HINTS = {"openvino-f32": "f32", "openvino-bf16": "bf16", "openvino-int8": "f32", "openvino-int8-bf16": "bf16"}
MODELS = ["small", "base-audio", "base-image", "base-text", "tiny-audio", "tiny-image", "tiny-text"]
# /proc/cpuinfo flags that decide which onnxruntime / oneDNN kernels run (int8 dot products, bf16, AMX tiles)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")  # fmt: skip
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="the demo's folder (checkpoint, bundle)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime intra-op threads")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    p.add_argument("--models", nargs="+", default=MODELS[:2], choices=MODELS)
    p.add_argument("--skip-base", action="store_true", help="no base-* model (the base towers are slow on CPU)")
    p.add_argument("--skip-cold", action="store_true", help="no cold-start part")
    p.add_argument("--cold-runs", type=int, default=3)
    p.add_argument("--budget", type=float, default=15.0, help="seconds of repetitions per (model, config, batch)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds: A B C, A B C, ... (the budget is shared)")
    p.add_argument("--min-reps", type=int, default=2, help="timed calls per round at least")
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument(
        "--base-clips",
        type=int,
        default=16,
        help="evaluation items (and as many prototypes) for the random-weight models",
    )
    p.add_argument("--text-tokens", type=int, default=32, help="tokens a sentence for base-text / tiny-text")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: results/runtime-<device>.json)")
    p.add_argument("--torch-infer", nargs=3, metavar=("CHECKPOINT", "AUDIO", "LABELS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------ cold start


def torch_infer(checkpoint: str, audio: str, labels: str) -> None:
    """The torch path of the cold-start comparison: what a user without the runtime would write."""
    import soundfile
    import soxr
    import torch

    from synergy.core.checkpoint import load_checkpoint
    from synergy.train.evaluate import label_embeddings

    model, tokenizer = load_checkpoint(checkpoint)
    model.eval()
    names = [line.strip() for line in Path(labels).read_text(encoding="utf-8").splitlines() if line.strip()]
    wave, rate = soundfile.read(audio, dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if rate != model.config.audio.sample_rate:
        wave = soxr.resample(wave, rate, model.config.audio.sample_rate)
    with torch.no_grad():
        classes = label_embeddings(model, tokenizer, names)  # [K, D]
        query = model.encode_audio(torch.from_numpy(np.ascontiguousarray(wave))[None])  # [1, D]
        scale = model.logit_scales().exp().mean()
        probs = (scale * query.float() @ classes.T).softmax(-1)[0]
    best = int(probs.argmax())
    print(f"{audio}\t{names[best]}\t{probs[best].item():.3f}")


# Peak RSS through a small launcher: Linux keeps a process's RSS high-water mark across exec, and subprocess starts
# children with vfork from this (large) process, so the child's ru_maxrss would start at the benchmark's own size.
# The launcher is a fresh interpreter (~10 MiB) that forks, execs the command and reports wait4's rusage.
LAUNCHER = """
import json, os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    json.dump({"seconds": time.perf_counter() - start, "maxrss_kib": usage.ru_maxrss,
               "exit": os.waitstatus_to_exitcode(status)}, f)
"""


def measure_child(command: list[str]) -> tuple[float, float, str]:
    """-> (wall seconds from fork to exit, peak RSS in MiB, stdout) of one process; raises if it fails."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        done = subprocess.run([sys.executable, "-c", LAUNCHER, report.name, *command], capture_output=True,
                              text=True, cwd=ROOT)  # fmt: skip
        result = json.loads(Path(report.name).read_text() or "{}")
    if done.returncode != 0 or result.get("exit") != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return result["seconds"], result["maxrss_kib"] / 1024, done.stdout


def cold_start(run: Path, labels: Path, audio: str, runs: int) -> dict:
    synergy = Path(sys.executable).with_name("synergy")
    infer = [str(synergy)] if synergy.is_file() else [sys.executable, "-m", "synergy.cli"]
    commands = {
        "synergy infer (onnxruntime)": [*infer, "infer", "--audio", audio, "--labels", str(labels),
                                        "--bundle", str(run / "bundle"), "--top-k", "1"],
        "torch (load_checkpoint)": [sys.executable, str(Path(__file__).resolve()), "--torch-infer",
                                    str(run / "checkpoint"), audio, str(labels)],
    }  # fmt: skip
    result = {}
    for name, command in commands.items():
        measure_child(command)  # warm the page cache: both paths then read their files from memory
        samples = [measure_child(command) for _ in range(runs)]
        result[name] = {
            "seconds": statistics.median(s[0] for s in samples),
            "peak_rss_mib": statistics.median(s[1] for s in samples),
            "runs": runs,
            "answer": samples[0][2].strip().splitlines()[-1] if samples[0][2].strip() else "",
        }
        print(f"  {name:<30} {result[name]['seconds']:7.2f} s  {result[name]['peak_rss_mib']:7.0f} MiB")
    runtime, reference = result["synergy infer (onnxruntime)"], result["torch (load_checkpoint)"]
    result["speedup"] = reference["seconds"] / runtime["seconds"]
    result["rss_ratio"] = runtime["peak_rss_mib"] / reference["peak_rss_mib"]
    return result


# ------------------------------------------------------------------------------------------------------ throughput


def ort_session(path: Path, device: str, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():  # ORT falls back silently
        raise SystemExit(f"onnxruntime has no CUDA execution provider here ({session.get_providers()}): "
                         "install onnxruntime-gpu, or benchmark with --device cpu")  # fmt: skip
    return session


def fuse_transformer(source: Path, target: Path, heads: int, width: int, model_type: str = "vit") -> dict:
    """onnxruntime.transformers' optimizer (model_type "vit": AST is a ViT over log-mel patches; "bert" for text)
    -> fused op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(source), model_type=model_type, num_heads=heads, hidden_size=width, opt_level=0)
    optimized.save_model_to_file(str(target))
    return {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}


def openvino_runner(path: Path, exported, threads: int, precision: str):
    """-> run(batch) -> [B, D] on the runtime's OpenVINO backend (the bytes of ``path``, as the runtime reads them)."""
    from synergy.runtime.manifest import TowerSpec
    from synergy.runtime.openvino_backend import OpenVINOTower

    spec = TowerSpec(path.name, exported.inputs, exported.outputs)
    tower = OpenVINOTower(path, spec, path.read_bytes(), {}, threads, precision)
    names = [t.name for t in exported.inputs]
    return lambda batch: tower.run(tower_feeds(exported.modality, batch, names))


def tower_feeds(modality: str, batch: np.ndarray, names) -> dict[str, np.ndarray]:
    """A tower graph's inputs for a batch of benchmark rows, those in ``names``: audio ``waveform`` [B, T] with
    ``waveform_lengths`` [B] int64 (every row a full clip), image ``pixel_values`` [B, 3, S, S], text ``input_ids``
    [B, L] with an all-ones ``attention_mask`` (every row a full sentence)."""
    if modality == "audio":
        feeds = {"waveform": batch, "waveform_lengths": np.full(len(batch), batch.shape[1], np.int64)}
    elif modality == "image":
        feeds = {"pixel_values": batch}
    else:
        feeds = {"input_ids": batch, "attention_mask": np.ones_like(batch)}
    return {name: feeds[name] for name in names}


def ort_feeds(session, modality: str, batch: np.ndarray) -> dict[str, np.ndarray]:
    return tower_feeds(modality, batch, [i.name for i in session.get_inputs()])


def latency(fn, budget: float, min_reps: int, max_reps: int) -> list[float]:
    fn()  # warm-up: allocations, lazy kernels
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - started < budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def in_batches(fn, waves: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fn(waves[i : i + batch]) for i in range(0, len(waves), batch)])


def small_setup(run: Path):
    """The demo checkpoint, its val clips, its classes' label embeddings, and 8 train clips (static int8's
    calibration)."""
    import torch

    from synergy.core.checkpoint import load_checkpoint
    from synergy.runtime.audio import load_audio
    from synergy.train.data import read_manifest
    from synergy.train.evaluate import label_embeddings

    model, tokenizer = load_checkpoint(run / "checkpoint")
    model.eval()
    data = run / "data"
    classes = json.loads((data / "classes.json").read_text())
    labels = classes["train_classes"] + classes["heldout_classes"]
    rate = model.config.audio.sample_rate
    clip = round(model.config.audio.clip_seconds * rate)

    def clips(split: str, limit: int | None = None) -> np.ndarray:
        waves = [load_audio(str(row.audio), rate) for row in read_manifest(data / f"{split}.csv") if row.audio]
        return np.stack([np.pad(w[:clip], (0, max(0, clip - len(w)))) for w in waves[:limit]]).astype(np.float32)

    with torch.no_grad():
        prototypes = label_embeddings(model, tokenizer, labels).numpy()
    note = f"{len(labels)} classes of the demo set, prompt ensemble"
    return model, clips("val"), prototypes, note, clips("train", 8)


def random_audio_model(preset: str):
    """A preset's AST geometry with random weights (seed 0) and the tiny preset's image/text towers, in eval mode:
    only audio is measured (here and by bench_serve.py --geometry base-audio)."""
    return random_model(preset, "audio")


def random_model(preset: str, modality: str):
    """A preset's ``modality`` tower with random weights (seed 0), the tiny preset's other towers, in eval mode."""
    import torch

    from synergy.core.config import config_from_dict, load_config
    from synergy.core.model import create_model

    base, tiny = load_config(preset).to_dict(), load_config("tiny").to_dict()
    config = {**base, **{m: tiny[m] for m in ("image", "text", "audio") if m != modality}}
    torch.manual_seed(0)
    return create_model(config_from_dict(config)).eval()


def encode_rows(model, modality: str, rows):
    """torch's embeddings of a batch of benchmark rows, fed as :func:`tower_feeds` feeds the graphs: full clips,
    images, or full sentences (an all-ones attention mask)."""
    if modality == "image":
        return model.encode_image(rows)
    if modality == "text":
        return model.encode_text(rows, rows.new_ones(rows.shape))
    return model.encode_audio(rows)


def random_tower_setup(preset: str, modality: str, items: int, text_tokens: int):
    """``random_setup`` for an image or text tower: synthetic items (images: smooth random patterns at the tower's
    size, in the normalised range; sentences: random token ids), prototypes = torch embeddings of other items, and
    8 more for static int8's calibration."""
    import torch

    model = random_model(preset, modality)
    rng = np.random.default_rng(0)
    if modality == "image":
        size = model.config.image.image_size

        def make(n: int) -> np.ndarray:  # a coarse random grid blown up to the image size, plus noise
            grid = rng.standard_normal((n, 3, 7, 7))
            up = np.kron(grid, np.ones((1, 1, -(-size // 7), -(-size // 7))))[:, :, :size, :size]
            return (up + 0.3 * rng.standard_normal(up.shape)).astype(np.float32)
    else:
        length = min(text_tokens, model.config.text.max_length)
        vocab = model.text_tower.config.vocab_size

        def make(n: int) -> np.ndarray:
            return rng.integers(4, vocab, (n, length), dtype=np.int64)

    def embed(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return encode_rows(model, modality, torch.from_numpy(x)).numpy()

    rows, references, calibration = make(items), make(items), make(8)
    prototypes = in_batches(embed, references, 8)
    return model, rows, prototypes, f"{items} prototypes: torch embeddings of other synthetic items", calibration


def random_setup(preset: str, clips: int):
    """A preset's AST geometry with random weights (tiny image/text towers: only audio is measured)."""
    import torch

    model = random_audio_model(preset)
    audio = model.config.audio
    samples = round(audio.clip_seconds * audio.sample_rate)
    rng = np.random.default_rng(0)
    t = np.arange(samples) / audio.sample_rate

    def synthetic_clip() -> np.ndarray:  # a few tones with vibrato, in noise: log-mel patterns vary clip to clip
        wave = 0.02 * rng.standard_normal(samples)
        for _ in range(3):
            f0, depth, rate = rng.uniform(100, 4000), rng.uniform(0, 50), rng.uniform(0.5, 5)
            wave += rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * (f0 * t + depth / rate * np.sin(2 * np.pi * rate * t)))
        return wave.astype(np.float32)

    waves = np.stack([synthetic_clip() for _ in range(clips)])
    references = np.stack([synthetic_clip() for _ in range(clips)])
    calibration = np.stack([synthetic_clip() for _ in range(8)])  # static int8's activation ranges
    with torch.no_grad():
        prototypes = in_batches(lambda w: model.encode_audio(torch.from_numpy(w)).numpy(), references, 8)
    return model, waves, prototypes, f"{clips} prototypes: torch embeddings of other synthetic clips", calibration


def throughput(name: str, args, workdir: Path) -> dict:
    import torch

    from synergy.export.graphs import PORTABLE_OPSET, RUNTIME_OPSET, export_tower_graphs, save_graph

    torch.set_num_threads(args.threads)
    print(f"\n[{name}] preparing")
    preset, _, modality = name.partition("-")
    modality = modality or "audio"  # "small": the demo checkpoint's audio tower
    if name == "small":
        model, waves, prototypes, label_note, calibration_clips = small_setup(args.run)
    elif modality == "audio":
        model, waves, prototypes, label_note, calibration_clips = random_setup(preset, args.base_clips)
    else:
        setup = random_tower_setup(preset, modality, args.base_clips, args.text_tokens)
        model, waves, prototypes, label_note, calibration_clips = setup
    # the exporter `synergy export` uses, at its default opset; in memory the graph still knows which nodes are the
    # log-mel front end
    exported = export_tower_graphs(model, opset=RUNTIME_OPSET)[modality]
    graph = workdir / f"{name}.onnx"
    save_graph(exported.model, graph)
    tower = getattr(model.config, modality)
    device = args.device
    model = model.to(device)

    def encode(batch: np.ndarray):
        return encode_rows(model, modality, torch.from_numpy(batch).to(device))

    def torch_run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = encode(batch)
        return out.float().cpu().numpy()

    def torch_bf16_run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            out = encode(batch)
        return out.float().cpu().numpy()

    def prepare(config: str) -> tuple[Path | None, dict]:
        """Write the configuration's graph once -> (its path, or None for torch; notes)."""
        if config.startswith("torch"):
            return None, {}
        notes, path = {"opset": RUNTIME_OPSET}, graph
        if config in ("ort-opset18", "ort-fused"):
            notes["opset"] = PORTABLE_OPSET
            path = workdir / f"{name}-opset18.onnx"
            if not path.exists():
                save_graph(export_tower_graphs(model, opset=PORTABLE_OPSET)[modality].model, path)
        if config == "ort-fused":
            fused = workdir / f"{name}-fused.onnx"
            kind = "bert" if modality == "text" else "vit"
            notes["fused_ops"] = fuse_transformer(path, fused, tower.heads, tower.width, kind)
            path = fused
        if "int8" in config:
            from synergy.export.quantize import TEXT_SCHEME, StaticScheme, quantize_int8, quantized_matmuls

            method = "dynamic" if config == "ort-int8-dynamic" else "static"
            path = workdir / f"{name}-int8-{method}.onnx"
            scheme = TEXT_SCHEME if modality == "text" else StaticScheme()  # as export/bundle.py's tower_scheme
            if not path.exists():  # one static graph for both engines
                names = [t.name for t in exported.inputs]
                calibration = [tower_feeds(modality, c[None], names) for c in calibration_clips]
                save_graph(quantize_int8(exported.model, exported.fp32_nodes, method, calibration, scheme), path)
            notes["int8_method"] = method
            if method == "static":
                notes["int8_scheme"] = scheme.describe()
            notes["int8_matmuls"] = len(quantized_matmuls(exported.model, exported.fp32_nodes, method, scheme))
        return path, notes

    def open_runner(config: str, path: Path | None):
        """-> run(batch) -> [B, D]. A fresh session per round; the caller drops it before opening the next."""
        if path is None:
            return torch_bf16_run if config == "torch-bf16" else torch_run
        if config.startswith("openvino"):
            return openvino_runner(path, exported, args.threads, OPENVINO_HINTS[config])
        session = ort_session(path, device, args.threads)
        return lambda batch: session.run(None, ort_feeds(session, modality, batch))[0]

    reference = in_batches(torch_run, waves, 8)
    reference_top = (reference @ prototypes.T).argmax(1)
    graphs, notes, accuracy = {}, {}, {}
    for config in args.configs:
        t0 = time.perf_counter()
        graphs[config], notes[config] = prepare(config)
        notes[config]["prepare_seconds"] = round(time.perf_counter() - t0, 1)
        run = open_runner(config, graphs[config])
        out = reference if config == "torch" else in_batches(run, waves, 8)
        del run  # frees the session and its arena
        cos = cosine(out, reference)
        accuracy[config] = {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "zero_shot_agreement": float(((out @ prototypes.T).argmax(1) == reference_top).mean()),
            "eval_clips": len(waves),
        }

    # interleaved rounds: A B C, A B C, ...; times[config][batch] = one list of call times per round
    times = {c: {b: [] for b in args.batches} for c in args.configs}
    budget = args.budget / max(1, args.rounds)
    max_reps = max(args.min_reps, args.max_reps // max(1, args.rounds))
    for round_index in range(args.rounds):
        for config in args.configs:
            run = open_runner(config, graphs[config])
            for batch in args.batches:
                feed = np.ascontiguousarray(np.resize(waves, (batch, *waves.shape[1:])))  # repeats items past the set
                calls = latency(lambda run=run, feed=feed: run(feed), budget, args.min_reps, max_reps)
                times[config][batch].append(calls)
                print(f"  round {round_index + 1}/{args.rounds}  {config:<18} batch {batch:>3}: "
                      f"median {1e3 * statistics.median(calls):9.1f} ms  ({len(calls)} calls)", flush=True)  # fmt: skip
            del run

    rows = []
    for config in args.configs:
        for batch in args.batches:
            every = [t for calls in times[config][batch] for t in calls]
            per_round = [statistics.median(calls) for calls in times[config][batch]]
            ratios, ratios_bf16 = (
                [statistics.median(t) / m for t, m in zip(times[peer][batch], per_round)] if peer in times else []
                for peer in ("torch", "torch-bf16")
            )  # the peer's time / this configuration's time, round by round
            p50 = float(np.percentile(every, 50))
            row = {"model": name, "config": config, "batch": batch, "p50_ms": 1e3 * p50,
                   "p99_ms": 1e3 * float(np.percentile(every, 99)), "items_per_s": batch / p50, "reps": len(every),
                   "round_medians_ms": [round(1e3 * m, 2) for m in per_round],
                   "round_spread": (max(per_round) - min(per_round)) / statistics.median(per_round),
                   "speedup_vs_torch": statistics.median(ratios) if ratios else None,
                   "speedup_vs_torch_min": min(ratios) if ratios else None,
                   "speedup_vs_torch_max": max(ratios) if ratios else None,
                   "speedup_vs_torch_bf16": statistics.median(ratios_bf16) if ratios_bf16 else None,
                   "speedup_vs_torch_bf16_min": min(ratios_bf16) if ratios_bf16 else None,
                   "speedup_vs_torch_bf16_max": max(ratios_bf16) if ratios_bf16 else None,
                   **accuracy[config], **notes[config]}  # fmt: skip
            rows.append(row)
    print(f"\n  {'config':<18} {'batch':>5} {'p50 ms':>10} {'items/s':>9} {'spread':>7} {'vs torch (min-max)':>20}"
          f" {'vs torch-bf16 (min-max)':>24} {'cos min':>8} {'agree':>6}")  # fmt: skip

    def speed(row, key):
        if row[key] is None:
            return "-"
        return f"{row[key]:.2f}x ({row[key + '_min']:.2f}-{row[key + '_max']:.2f})"

    for row in rows:
        print(f"  {row['config']:<18} {row['batch']:>5} {row['p50_ms']:>10.1f} {row['items_per_s']:>9.1f} "
              f"{100 * row['round_spread']:>6.1f}% {speed(row, 'speedup_vs_torch'):>20} "
              f"{speed(row, 'speedup_vs_torch_bf16'):>24} {row['cosine_min']:>8.5f} "
              f"{100 * row['zero_shot_agreement']:>5.1f}%")  # fmt: skip
    shape = {"clip_seconds": tower.clip_seconds} if modality == "audio" else {"item_shape": list(waves.shape[1:])}
    return {"rows": rows, "labels": label_note, "modality": modality, **shape, "rounds": args.rounds,
            "order": "interleaved: each round runs every configuration, in --configs order",
            "geometry": {"layers": tower.layers, "width": tower.width, "heads": tower.heads}}  # fmt: skip


# -------------------------------------------------------------------------------------------------------- report


def environment(device: str, threads: int) -> dict:
    import onnxruntime
    import torch

    torch.set_num_threads(threads)  # before reading the settings back: what every torch measurement then uses
    env = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "commit": git_commit(), "cpu": cpu_description()}  # fmt: skip
    try:
        import openvino

        env["openvino"] = openvino.__version__
    except ImportError:
        env["openvino"] = None
    env["threads"] = {
        "requested (--threads)": threads,  # torch.set_num_threads and onnxruntime intra_op_num_threads
        "onnxruntime_inter_op": 1,
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        **{name: os.environ.get(name) for name in THREAD_VARIABLES},
    }
    env["load_average_at_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if device == "cuda":
        env["device"] = {"name": torch.cuda.get_device_name(0)}
    else:
        env["device"] = {"name": env["cpu"]["model"], "cpu": True}
    return env


def cpu_description() -> dict:
    """CPU model and the ISA flags that pick kernels (AVX2, AVX-512, VNNI, BF16, AMX), from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "isa": None}
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":")[0].strip() == key), None)
    flags = set((field("flags") or "").split())
    return {"model": field("model name") or platform.machine(), "isa": [f for f in ISA_FLAGS if f in flags],
            "isa_absent": [f for f in ISA_FLAGS if f not in flags]}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.torch_infer:
        torch_infer(*args.torch_infer)
        return 0
    models = [m for m in args.models if not (args.skip_base and m.startswith("base-"))]
    if args.rounds < 1 or args.min_reps < 1:
        print("--rounds and --min-reps must be >= 1", file=sys.stderr)
        return 2
    needs_demo = "small" in models or not args.skip_cold
    if needs_demo and not (args.run / "bundle" / "manifest.json").is_file():
        print(f"{args.run}/bundle not found: run `make demo` first (or pass --run), or use --models base-audio "
              "--skip-cold", file=sys.stderr)  # fmt: skip
        return 2
    report = {"environment": environment(args.device, args.threads), "args": {k: str(v) for k, v in vars(args).items()}}
    cpu = report["environment"]["cpu"]
    print(f"{cpu['model']}; ISA: {' '.join(cpu['isa'] or []) or 'unknown'}; threads: {args.threads}; "
          f"load average {report['environment']['load_average_at_start']}")  # fmt: skip
    out = args.out or RESULTS / f"runtime-{'cpu' if args.device == 'cpu' else 'cuda'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(report: dict) -> None:
        write_result(out, report, allow_nan=False)

    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        workdir = Path(tmp)
        if not args.skip_cold:
            print("[cold start] small preset: process start -> result printed, peak RSS")
            from synergy.train.data import read_manifest

            audio = str(next(row.audio for row in read_manifest(args.run / "data" / "val.csv") if row.audio))
            report["cold_start"] = cold_start(args.run, args.run / "labels.txt", audio, args.cold_runs)
            write(report)
        report["throughput"] = {}
        for name in models:  # written after each model: a long run that dies keeps what it measured
            report["throughput"][name] = throughput(name, args, workdir)
            write(report)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
