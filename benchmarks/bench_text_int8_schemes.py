"""Benchmark: which int8 scheme keeps a pretrained text tower (all-MiniLM-L6-v2) at cosine >= 0.995, and how fast.

    python benchmarks/bench_text_int8_schemes.py --out benchmarks/results/text-int8-schemes-minilm-cpu.json
    python benchmarks/bench_text_int8_schemes.py --sentences 24 --reps 1     # smoke run, about two minutes

The export ships two int8 methods (export/quantize.py): dynamic (onnxruntime) and static QDQ (OpenVINO). On MiniLM
neither reaches the issue's cosine 0.995 on real sentences (bench_text_int8.py), so a static bundle keeps its text
tower fp32 and a dynamic one is refused by the gate unless `--fp32-towers text`. This script measures the schemes
the literature offers against that, on the same graph and the same sentences, so the choice rests on numbers (the
fourth is what `synergy export --int8-text` writes: export/quantize.py ``TEXT_SCHEME``):

    dynamic                 the export's dynamic method (per-tensor uint8 activations at run time), onnxruntime
    static                  the export's static method (per-tensor symmetric int8, calibrated), OpenVINO bf16
    static+smooth           SmoothQuant (Xiao et al. 2023) before static: each MatMul input channel divided by
                            s = max|x|^a / max|w|^(1-a) (a Mul node), the weight's rows multiplied by it
    static+smooth, ffn-out fp32   the same with the MLP's second MatMuls (fed by GELU) left float (--int8-text)
    weight-only             int8 weights (per output channel) dequantized in the graph, float activations:
                            onnxruntime and OpenVINO
    per-token+smooth (sim)  activations quantized per token (symmetric int8) after SmoothQuant, simulated in float
                            (no engine here runs per-token dynamic int8 fused): accuracy only

Calibration (activation ranges, SmoothQuant's maxima) uses the export gate's 24 built-in sentences
(export/verify.py); accuracy is measured on --sentences other sentences (this repository's README and docs), as
cosine to the fp32 graph on onnxruntime (min, mean). Speed: sentences per second of whole passes in batches of 32,
best of --reps, on the engine named, 2 threads; not interleaved (bench_text_int8.py is the interleaved comparison
with torch), so read the speeds as a rough ranking.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_text_int8 import checkpoint_with_minilm, sentences  # benchmarks/: on sys.path when run as a script
from provenance import write_result

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "text-int8-schemes-minilm-cpu.json"
BATCH = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="folder for MiniLM and its fp32 bundle (default: temp)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sentences", type=int, default=240)
    p.add_argument("--reps", type=int, default=3, help="timed passes per scheme (best kept)")
    p.add_argument("--out", type=Path, default=RESULT)
    return p.parse_args(argv)


class Graphs:
    """The fp32 text graph and what the schemes need from it: its weight MatMuls and the calibration feeds."""

    def __init__(self, model, calibration_feeds):
        from synergy.export.quantize import weight_matmuls

        self.model, self.calibration = model, calibration_feeds
        self.nodes = weight_matmuls(model)

    def copy(self):
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        return model, {n.name: n for n in model.graph.node}, {t.name: t for t in model.graph.initializer}

    def smoothed(self):
        """SmoothQuant on every weight MatMul's input, as the export's text scheme does it
        (``export.quantize.smooth_activations``, alpha ``TEXT_SCHEME.smooth_alpha``)."""
        from synergy.export.quantize import TEXT_SCHEME, smooth_activations

        return smooth_activations(self.model, self.nodes, self.calibration, TEXT_SCHEME.smooth_alpha)

    def weight_only(self):
        """int8 weights per output channel, DequantizeLinear in the graph, float activations."""
        from onnx import helper, numpy_helper

        model, nodes, weights = self.copy()
        for name in self.nodes:
            tensor = weights[nodes[name].input[1]]
            array = numpy_helper.to_array(tensor)
            scale = (np.abs(array).max(0) / 127).astype(np.float32)
            scale[scale == 0] = 1
            quantized = f"{tensor.name}_int8"
            tensor.CopyFrom(
                numpy_helper.from_array(np.clip(np.round(array / scale), -127, 127).astype(np.int8), quantized)
            )
            zero = np.zeros_like(scale, np.int8)
            model.graph.initializer.append(numpy_helper.from_array(scale, f"{quantized}_scale"))
            model.graph.initializer.append(numpy_helper.from_array(zero, f"{quantized}_zero"))
            dequantize = helper.make_node("DequantizeLinear", [quantized, f"{quantized}_scale", f"{quantized}_zero"],
                                          [f"{quantized}_float"], axis=1, name=f"{name}_dequantize")  # fmt: skip
            model.graph.node.insert(list(model.graph.node).index(nodes[name]), dequantize)
            nodes[name].input[1] = f"{quantized}_float"
        return model

    def per_token_simulated(self, base):
        """``base`` with every weight MatMul's input rounded per token (symmetric int8) and its weight per output
        channel, in float: the accuracy of per-token dynamic int8, which no engine here runs fused."""
        from onnx import helper, numpy_helper

        model = base
        nodes = {n.name: n for n in model.graph.node}
        weights = {t.name: t for t in model.graph.initializer}
        model.graph.initializer.extend([numpy_helper.from_array(np.array(127, np.float32), "int8_levels"),
                                        numpy_helper.from_array(np.array(1e-8, np.float32), "int8_floor"),
                                        numpy_helper.from_array(np.array([-1], np.int64), "last_axis")])  # fmt: skip
        for name in self.nodes:
            node, x = nodes[name], nodes[name].input[0]
            tensor = weights[node.input[1]]
            array = numpy_helper.to_array(tensor)
            scale = np.abs(array).max(0, keepdims=True) / 127
            tensor.CopyFrom(numpy_helper.from_array((np.round(array / scale) * scale).astype(np.float32), tensor.name))

            def step(op, inputs, out, name=name, **attributes):
                return helper.make_node(op, inputs, [f"{name}_{out}"], **attributes)

            new = [step("Abs", [x], "abs"),
                   step("ReduceMax", [f"{name}_abs", "last_axis"], "max", keepdims=1),
                   step("Div", [f"{name}_max", "int8_levels"], "step"),
                   step("Max", [f"{name}_step", "int8_floor"], "scale"),  # an all-zero token keeps a finite scale
                   step("Div", [x, f"{name}_scale"], "scaled"),
                   step("Round", [f"{name}_scaled"], "rounded"),
                   step("Mul", [f"{name}_rounded", f"{name}_scale"], "int8_valued")]  # fmt: skip
            at = list(model.graph.node).index(node)
            for offset, added in enumerate(new):
                model.graph.node.insert(at + offset, added)
            node.input[0] = f"{name}_int8_valued"
        return model


def ort_session(model, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_runner(model, threads: int):
    session = ort_session(model, threads)
    return lambda feeds: session.run(None, feeds)[0]


def openvino_runner(model, threads: int, work: Path):
    import onnx
    import openvino

    path = work / "scheme.onnx"
    onnx.save_model(model, path)
    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    request = core.compile_model(core.read_model(path), "CPU", config).create_infer_request()
    return lambda feeds: request.infer(feeds)[0].copy()


def main(argv=None) -> None:
    args = parse_args(argv)
    import onnx
    import torch
    from bench_runtime import environment
    from tokenizers import Tokenizer

    from synergy.export import export_bundle
    from synergy.export.quantize import TEXT_SCHEME, StaticScheme, quantize_int8
    from synergy.export.verify import BUILTIN_SENTENCES

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-text-int8-schemes-"))
    checkpoint = checkpoint_with_minilm(work)
    export_bundle(checkpoint, work / "fp32", force=True, min_cosine=0.0, min_agreement=0.0, openvino_check=False)
    model = onnx.load(work / "fp32" / "text.onnx")
    tokenizer = Tokenizer.from_file(str(work / "fp32" / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0)

    def feeds_of(texts: list[str]) -> dict[str, np.ndarray]:
        encodings = tokenizer.encode_batch(texts)
        return {"input_ids": np.array([e.ids for e in encodings], np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], np.int64)}  # fmt: skip

    texts = sentences(args.sentences)
    batches = [feeds_of(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
    calibration = [feeds_of([sentence]) for sentence in BUILTIN_SENTENCES]
    graphs = Graphs(model, calibration)

    def embed(run) -> np.ndarray:
        out = np.concatenate([run(feeds) for feeds in batches])
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    reference = embed(ort_runner(model, args.threads))

    def static(graph, scheme=None):
        return quantize_int8(graph, (), "static", calibration, scheme or StaticScheme())

    schemes = {  # name -> (graph, engine)
        "fp32": (model, "openvino-bf16"),
        "dynamic": (quantize_int8(model, (), "dynamic"), "onnxruntime"),
        "static": (static(model), "openvino-bf16"),
        "static+smooth": (static(graphs.smoothed()), "openvino-bf16"),
        "static+smooth, ffn-out fp32": (static(model, scheme=TEXT_SCHEME), "openvino-bf16"),  # --int8-text's
        "weight-only": (graphs.weight_only(), "openvino-bf16"),
        "weight-only@onnxruntime": (graphs.weight_only(), "onnxruntime"),
        "per-token+smooth (sim)": (graphs.per_token_simulated(graphs.smoothed()), "onnxruntime (float simulation)"),
    }
    rows = []
    for name, (graph, engine) in schemes.items():
        run = (
            openvino_runner(graph, args.threads, work) if engine == "openvino-bf16" else ort_runner(graph, args.threads)
        )
        cosines = (embed(run) * reference).sum(1)
        passes = []
        for _ in range(args.reps):
            started = time.perf_counter()
            embed(run)
            passes.append(time.perf_counter() - started)
        row = {"scheme": name, "engine": engine, "cosine_min": float(cosines.min()),
               "cosine_mean": float(cosines.mean()), "meets_0.995": bool(cosines.min() >= 0.995),
               "sentences_per_s": None if "sim" in name else len(texts) / min(passes)}  # fmt: skip
        rows.append(row)
        speed = "-" if row["sentences_per_s"] is None else f"{row['sentences_per_s']:.0f}/s"
        print(f"  {name:<30} {engine:<32} min {row['cosine_min']:.5f} mean {row['cosine_mean']:.5f}  {speed}",
              flush=True)  # fmt: skip
    result = {
        "benchmark": "bench_text_int8_schemes",
        "environment": environment("cpu", args.threads),
        "args": {k: str(v) for k, v in vars(args).items()},
        "tower": "all-MiniLM-L6-v2 (6 x 384, mean pooling) + the tiny preset's projection, fp32 text.onnx",
        "calibration": f"the {len(BUILTIN_SENTENCES)} built-in sentences of export/verify.py",
        "sentences": len(texts),
        "smoothquant_alpha": TEXT_SCHEME.smooth_alpha,
        "rows": rows,
    }
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
