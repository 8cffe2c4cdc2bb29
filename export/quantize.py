"""A float32 ONNX graph -> an int8 graph with onnxruntime's quantization tools; float32 inputs and outputs.

What is quantized: the MatMul nodes that multiply by a weight (an initializer) inside the transformer layers: the
attention projections (q, k, v, out) and the MLP, which hold nearly all of a tower's weights and FLOPs. Weights are
int8 per output channel (symmetric). What stays float32, because the accuracy gate needs it there:

- attention itself (ONNX's ``Attention`` op at opset 23; at 18 the activation x activation MatMuls ``q @ k.T``,
  ``p @ v`` and their Softmax) and every LayerNormalization (no op outside ``MatMul`` is quantized);
- nodes the caller names (``keep_fp32``): the audio front end, whose DFT convolution and mel matrix turn a
  waveform into a log-power spectrum that int8 would flatten;
- the head: the weight multiplications nearest the output (the final projection, ``Gemm`` or ``MatMul``) and the
  L2 normalisation after them;
- the patch / DFT convolutions and the embedding lookups (not ``MatMul``).

Two methods (``METHODS``): "dynamic" (``quantize_dynamic``: each activation is quantized at run time from its own
range; onnxruntime fuses each into ``DynamicQuantizeMatMul`` or, where q, k and v share one quantized input,
``MatMulIntegerToFloat``) and "static" (``quantize_static``, QDQ format: fixed per-tensor activation scales
calibrated on the export's verification set, :func:`calibration_feeds`, symmetric int8 activations x int8 weights;
the products stay float32, as in the dynamic method).
OpenVINO reads the QDQ pairs and runs those MatMuls as int8 kernels (AMX / VNNI); onnxruntime's CPU provider runs
them no faster than float32. Symmetric int8 activations, not onnxruntime's default asymmetric uint8, because that is
what OpenVINO's int8 kernels take as they are: on the base audio tower (batch 8, 2 cores of an Intel Xeon with AMX,
bf16 hint) the uint8 QDQ graph ran at 3.7 clips/s (3479f4a), below OpenVINO bf16 on the fp32 graph (6.2 at bf8ca15),
and the int8 one at 8.4 (bf8ca15) and 9.5 (d5409c5): benchmarks/results/runtime-cpu-base-speed.json and
benchmarks/README.md. Leaving the products float (onnxruntime's QDQ quantizer rounds them to int8 too unless told
not to): the base audio tower's min cosine to torch fp32 on OpenVINO went from 0.99863 (bf8ca15) to 0.99896 (d5409c5)
in that benchmark's runs. Accuracy: on the tiny preset trained 60 steps dynamic kept 100% zero-shot agreement on 152
decided queries and uint8 static 97.4%, below the gate's 99%. On all-MiniLM-L6-v2 over 240 real sentences dynamic
reaches min cosine 0.970-0.979 to fp32 and static with every MatMul int8 0.911 on OpenVINO
(benchmarks/results/text-int8-*.json), so a static bundle keeps its text tower fp32
(``export.bundle.tower_precision``). Which method an export uses by default is the engine's fastest
(``export.bundle.resolved_int8_method``): static where ``--backend auto`` will run the bundle on OpenVINO, dynamic
(:data:`DEFAULT_METHOD`: no calibration, the more accurate) where onnxruntime will.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path

import numpy as np
import onnx

METHODS = ("dynamic", "static")
DEFAULT_METHOD = "dynamic"  # onnxruntime's fastest int8; OpenVINO's is static (export.bundle.resolved_int8_method)
QUANTIZED_OPS = ("MatMul",)
WEIGHT_OPS = frozenset({"MatMul", "Gemm"})


def quantize_int8(
    model: onnx.ModelProto,
    keep_fp32: Collection[str] = (),
    method: str = DEFAULT_METHOD,
    calibration: Iterable[dict[str, np.ndarray]] = (),
) -> onnx.ModelProto:
    """Return an int8 copy of ``model``. ``keep_fp32``: names of nodes that must stay float32 (the audio front
    end). ``calibration``: input feeds for the "static" method's activation ranges (ignored by "dynamic").

    Raises ``ValueError`` for an unknown method, a static quantization without calibration feeds, or a graph with
    no weight MatMul to quantize."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if method not in METHODS:
        raise ValueError(f"unknown int8 method {method!r}; choose one of {', '.join(METHODS)}")
    nodes = weight_matmuls(model, keep_fp32)
    if not nodes:
        raise ValueError("the graph has no weight MatMul outside the front end and the head; nothing to quantize")
    options = {"MatMulConstBOnly": True, "WeightSymmetric": True}
    with tempfile.TemporaryDirectory(prefix="synergy-int8-") as folder, _quiet_quantizer():
        # a copy goes to a file: saving with external data (as the quantizer does with a proto it is handed)
        # rewrites the initializers in place, and the exporter caches its graphs for the next export
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        source, out = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        onnx.save_model(copy, source, save_as_external_data=True, location="fp32.onnx.data")
        if method == "dynamic":
            quantize_dynamic(
                source,
                out,
                op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_quantize=nodes,
                per_channel=True,
                weight_type=QuantType.QInt8,
                extra_options=options,
            )
        else:
            feeds = list(calibration)
            if not feeds:
                raise ValueError("static int8 quantization needs calibration feeds (rows of the evaluation set)")
            quantize_static(
                source,
                out,
                _FeedReader(feeds),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_quantize=nodes,
                per_channel=True,
                activation_type=QuantType.QInt8,  # symmetric int8: OpenVINO's AMX / VNNI int8 kernels (module doc)
                weight_type=QuantType.QInt8,
                # the MatMuls' outputs stay float: onnxruntime's QDQ quantizer would also round every output to int8
                # (one per-tensor scale), which cost accuracy (module doc)
                extra_options={
                    **options,
                    "ActivationSymmetric": True,
                    "OpTypesToExcludeOutputQuantization": ["MatMul"],
                },
            )
        return onnx.load_model(out)


CALIBRATION_ITEMS = 32  # per tower: the activation ranges settle within a few dozen items; each costs a forward


def calibration_feeds(evaluation, items: int = CALIBRATION_ITEMS) -> dict[str, list[dict]]:
    """modality -> input feeds for the "static" method's activation ranges, drawn from the export's verification
    set (the built-in items and the ``--data`` rows): ``items`` pictures and sounds spread evenly over it, one per
    feed (a range does not depend on the batch). No text: a static bundle keeps its text tower fp32
    (``export.bundle.tower_precision`` says why)."""

    def spread(count: int) -> np.ndarray:
        return np.unique(np.linspace(0, count - 1, min(items, count)).round().astype(int))

    images = [{"pixel_values": evaluation.images[i : i + 1]} for i in spread(len(evaluation.images))]
    sounds = [
        {"waveform": evaluation.waveforms[i : i + 1], "waveform_lengths": evaluation.waveform_lengths[i : i + 1]}
        for i in spread(len(evaluation.waveforms))
    ]
    return {"image": images, "audio": sounds}


def weight_matmuls(model: onnx.ModelProto, keep_fp32: Collection[str] = ()) -> list[str]:
    """Names of the ``MatMul`` nodes to quantize: those whose second input is a weight (an initializer), minus
    ``keep_fp32`` and minus the head (the weight multiplications found first walking back from the outputs)."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    weights.update(n.output[0] for n in graph.node if n.op_type == "Constant")
    multiplies = {n.name for n in graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in weights}
    head = _head(graph, multiplies)
    keep = set(keep_fp32)
    return [
        n.name
        for n in graph.node
        if n.op_type in QUANTIZED_OPS and n.name in multiplies and n.name not in head and n.name not in keep
    ]


def _head(graph, multiplies: set[str]) -> set[str]:
    """The weight multiplications nearest the graph outputs: walk back from each output and stop at the first
    one on every path (the final projection), so the embedding's last linear map stays float32."""
    producer = {out: node for node in graph.node for out in node.output}
    head, seen, stack = set(), set(), [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.name in multiplies:
            head.add(node.name)
            continue
        stack.extend(name for name in node.input if name)
    return head


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizer logs "please consider pre-processing" on the root logger for every graph: its symbolic shape
    inference and graph optimisation, which onnxruntime applies at load anyway."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _FeedReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of feeds: ``get_next()`` -> feeds or None."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)
