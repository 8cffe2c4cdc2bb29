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

How near the int8 MatMuls come to what this CPU does: ``int8_ops`` counts the tower's Linear layers' operations for
one batch (2 x in x out per row, by forward hooks on the torch model: the MatMuls the static graph quantizes, plus
the final projection), and ``reference_gemms`` times lone int8 MatMuls (QDQ graphs, the same engine and hint) at the
tower's largest layer shape (a batch's rows x 768 x 3072 for the base preset) and at --square cubed (4096): the rate
OpenVINO's int8 GEMM reaches here with nothing else in the way, an empirical ceiling (not a datasheet peak). Both
sides are the int8 kernels' own counters, medians over the timed calls. (The final projection, bf16 in the graph, is
among the counted Linear operations: a few millionths of them at the base size.)
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
    p.add_argument("--square", type=int, default=4096, help="the square reference int8 GEMM's size")
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
    times, int8_seconds, started = [], [], time.perf_counter()
    while len(times) < 2 or time.perf_counter() - started < args.seconds:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if streams == 1:  # the int8 MatMuls' counters of this call (the median over calls is reported)
            int8_seconds.append(sum(n.real_time.total_seconds() for n in requests[0].profiling_info
                                    if int8_matmul(f"{n.node_type} ({n.exec_type})")))  # fmt: skip
    result = {"clips_per_s": args.batch / float(np.median(times)), "calls": len(times)}
    if streams == 1:
        by_kind = collections.Counter()
        for node in requests[0].profiling_info:
            by_kind[f"{node.node_type} ({node.exec_type})"] += node.real_time.total_seconds()
        result["seconds_by_layer"] = {k: round(v, 4) for k, v in by_kind.most_common()}
        result["seconds_total"] = round(sum(by_kind.values()), 4)
        quantized = float(np.median(int8_seconds))
        if quantized:  # unrounded: at smoke size the quantized MatMuls take microseconds
            result["seconds_int8_matmuls"] = float(f"{quantized:.6g}")
    return result


def int8_matmul(kind: str) -> bool:
    """A counter's "type (kernel)" is an int8 MatMul: OpenVINO names the node FullyConnectedQuantizedLegacy or
    FullyConnected after the pattern it matched, and the kernel brgemm_..._i8 (or _I8) either way."""
    return kind.startswith("FullyConnected") and kind.lower().endswith("_i8)")


def linear_ops(model, clip: np.ndarray, batch: int) -> tuple[int, tuple[int, int, int]]:
    """Operations (2 per multiply-add) of the audio tower's Linear layers for ``batch`` clips, and the largest
    layer's (rows, in, out) at that batch."""
    import torch

    counted, shapes = [], []

    def hook(module, inputs, _output) -> None:
        rows = inputs[0].numel() // module.in_features
        counted.append(2 * rows * module.in_features * module.out_features)
        shapes.append((rows * batch, module.in_features, module.out_features))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model.encode_audio(torch.from_numpy(clip[None]))
    finally:
        for handle in handles:
            handle.remove()
    return batch * sum(counted), max(shapes, key=lambda s: s[0] * s[1] * s[2])


def int8_matmul_graph(rows: int, inner: int, cols: int, path: Path) -> None:
    """X [rows, inner] fp32 -> QuantizeLinear / DequantizeLinear (symmetric int8) -> MatMul with int8 per-column
    weights: the pattern the static graph's MatMuls have (``export/quantize.py``), which OpenVINO runs as one quantized
    FullyConnected."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = rng.integers(-127, 128, (inner, cols), dtype=np.int8)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
             numpy_helper.from_array(weights, "w"),
             numpy_helper.from_array(np.full(cols, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(cols, np.int8), "w_zero")]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, inner])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])
    graph = helper.make_graph(nodes, "int8_matmul", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def reference_gemm(path: Path, rows: int, inner: int, cols: int, args) -> dict:
    """Int8 tera-operations per second of one lone MatMul on OpenVINO, over --seconds / 4 of calls: by the int8
    kernel's own counter (``tops``, what the tower's MatMuls are compared with) and by the whole call (``tops_call``:
    quantizing the fp32 input and copying it in included)."""
    int8_matmul_graph(rows, inner, cols, path)
    compiled = compile_graph(path, args.threads, {})
    request = compiled.create_infer_request()
    x = np.random.default_rng(1).standard_normal((rows, inner)).astype(np.float32)
    request.infer({"x": x})  # warm-up
    calls, kernel_times, started = [], [], time.perf_counter()
    while len(calls) < 3 or time.perf_counter() - started < args.seconds / 4:
        t0 = time.perf_counter()
        request.infer({"x": x})
        calls.append(time.perf_counter() - t0)
        counters = [(f"{n.node_type} ({n.exec_type})", n.real_time.total_seconds()) for n in request.profiling_info]
        kernel_times.append(sum(t for kind, t in counters if int8_matmul(kind)))
    ops = 2 * rows * inner * cols
    kernel = float(np.median(kernel_times))
    return {
        "shape": [rows, inner, cols],
        "tops": round(ops / kernel / 1e12, 4) if kernel else None,
        "tops_call": round(ops / float(np.median(calls)) / 1e12, 4),
        "kernels": sorted({kind for kind, _ in counters if not kind.startswith(("Parameter", "Result"))}),
    }


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
    int8_ops, largest = linear_ops(model, waves[0], args.batch)
    gemms = [
        reference_gemm(work / f"gemm{i}.onnx", *shape, args) for i, shape in enumerate([largest, (args.square,) * 3])
    ]
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
        "int8_ops": int8_ops,
        "reference_gemms": gemms,
    }
    quantized = rows["int8-static"].get("seconds_int8_matmuls")
    if quantized:
        result["int8_matmuls_tops"] = round(int8_ops / quantized / 1e12, 4)
        print(
            f"  int8 MatMuls: {result['int8_matmuls_tops']} TOPS; lone GEMMs: "
            + ", ".join(f"{g['shape']} {g['tops']} TOPS ({g['tops_call']} by the call)" for g in gemms)
        )
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
