"""Profile: where OpenVINO spends a batch of the base audio tower, and what two engine settings change.

    python benchmarks/profile_openvino.py --out benchmarks/results/openvino-profile-base-audio-cpu.json
    python benchmarks/profile_openvino.py --preset tiny --batch 2 --seconds 1    # smoke run, under a minute

The question behind it (issue 25): why OpenVINO on the static int8 bundle is 2.2x torch bf16 at batch 1 and only 1.6x
at batch 8 (benchmarks/README.md). The base preset's AST geometry with random weights (bench_runtime.py's
``random_setup``) is exported as `synergy export` does (fp32, and static int8 calibrated on 8 other clips), and each
graph is compiled with the bf16 hint, the runtime's setting. For each: OpenVINO's per-node counters of one call at
--batch, summed by layer type and kernel (seconds), and clips/s over --seconds of calls. Variants of the static graph:
two streams (the batch split into two requests run at once, NUM_STREAMS=2) and OpenVINO's snippets (its fused
subgraphs, attention among them) disabled. Not interleaved: read it as a breakdown, the speed table is
bench_runtime.py's.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_runtime import environment, random_setup  # benchmarks/: on sys.path when run as a script
from provenance import write_result

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "openvino-profile-base-audio-cpu.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", help="the preset whose AST geometry is profiled")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=12.0, help="seconds of timed calls per configuration")
    p.add_argument("--out", type=Path, default=RESULT)
    return p.parse_args(argv)


def compile_graph(path: Path, threads: int, extra: dict):
    import openvino

    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True, **extra}
    if "NUM_STREAMS" not in extra:
        config["PERFORMANCE_HINT"] = "LATENCY"  # the runtime's setting (runtime/openvino_backend.py)
    return core.compile_model(core.read_model(path), "CPU", config)


def profile(path: Path, waves: np.ndarray, args, streams: int = 1, extra: dict | None = None) -> dict:
    """clips/s over --seconds of calls of --batch clips; with one stream, the per-node counters of the last call."""
    compiled = compile_graph(path, args.threads, {**(extra or {}), **({"NUM_STREAMS": streams} if streams > 1 else {})})
    requests = [compiled.create_infer_request() for _ in range(streams)]
    parts = np.array_split(np.arange(args.batch), streams)

    def call() -> None:
        for request, part in zip(requests, parts):
            feeds = {"waveform": waves[part], "waveform_lengths": np.full(len(part), waves.shape[1], np.int64)}
            request.start_async(feeds)
        for request in requests:
            request.wait()

    call()  # warm-up
    times, started = [], time.perf_counter()
    while len(times) < 2 or time.perf_counter() - started < args.seconds:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    result = {"clips_per_s": args.batch / float(np.median(times)), "calls": len(times)}
    if streams == 1:
        by_kind = collections.Counter()
        for node in requests[0].profiling_info:
            by_kind[f"{node.node_type} ({node.exec_type})"] += node.real_time.total_seconds()
        result["seconds_by_layer"] = {k: round(v, 4) for k, v in by_kind.most_common()}
        result["seconds_total"] = round(sum(by_kind.values()), 4)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from synergy.export.graphs import RUNTIME_OPSET, export_tower_graphs, save_graph
    from synergy.export.quantize import quantize_int8

    torch.set_num_threads(args.threads)
    model, waves, _, _, calibration = random_setup(args.preset, max(args.batch, 2))
    exported = export_tower_graphs(model, opset=RUNTIME_OPSET)["audio"]
    work = Path(tempfile.mkdtemp(prefix="profile-openvino-"))
    graphs = {"fp32": work / "fp32.onnx", "int8-static": work / "int8.onnx"}
    save_graph(exported.model, graphs["fp32"])
    clip = np.full(1, waves.shape[1], np.int64)
    feeds = [{"waveform": c[None], "waveform_lengths": clip} for c in calibration]
    save_graph(quantize_int8(exported.model, exported.fp32_nodes, "static", feeds), graphs["int8-static"])
    configs = {
        "fp32": (graphs["fp32"], 1, {}),
        "int8-static": (graphs["int8-static"], 1, {}),
        "int8-static, two streams": (graphs["int8-static"], 2, {}),
        "int8-static, snippets disabled": (graphs["int8-static"], 1, {"SNIPPETS_MODE": "DISABLE"}),
    }
    rows = {}
    for name, (path, streams, extra) in configs.items():
        rows[name] = profile(path, waves, args, streams, extra)
        print(f"  {name:<32} {rows[name]['clips_per_s']:6.2f} clips/s", flush=True)
        for kind, seconds in list(rows[name].get("seconds_by_layer", {}).items())[:6]:
            print(f"      {kind:<50} {seconds:7.3f} s")
    result = {
        "benchmark": "profile_openvino",
        "environment": environment("cpu", args.threads),
        "args": {k: str(v) for k, v in vars(args).items()},
        "geometry": f"{args.preset} preset AST, random weights, {waves.shape[1]} samples a clip",
        "rows": rows,
    }
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
