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
(``export.bundle.tower_precision``) unless asked (``--int8-text``), and then quantizes it in :data:`TEXT_SCHEME`:
SmoothQuant before calibrating (:func:`smooth_activations`) and the MLPs' GELU-fed MatMuls left float. Which
method an export uses by default is the engine's fastest (``export.bundle.resolved_int8_method``): static where
``--backend auto`` will run the bundle on OpenVINO, dynamic (:data:`DEFAULT_METHOD`: no calibration, the more
accurate) where onnxruntime will.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import tempfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

METHODS = ("dynamic", "static")
DEFAULT_METHOD = "dynamic"  # onnxruntime's fastest int8; OpenVINO's is static (export.bundle.resolved_int8_method)
QUANTIZED_OPS = ("MatMul",)
WEIGHT_OPS = frozenset({"MatMul", "Gemm"})


@dataclass(frozen=True)
class StaticScheme:
    """What the static method does beyond per-tensor activation ranges. ``smooth_alpha``: SmoothQuant (Xiao et al.
    2023, :func:`smooth_activations`) with this migration strength before calibrating, None for none.
    ``float_after``: op types whose outputs feed MatMuls that stay float (``"Gelu"``: the MLPs' second MatMuls)."""

    smooth_alpha: float | None = None
    float_after: frozenset[str] = frozenset()

    def describe(self) -> str:
        """For the manifest and the report: "SmoothQuant (alpha 0.6); MatMuls fed by Gelu stay float"."""
        parts = [f"SmoothQuant (alpha {self.smooth_alpha})"] if self.smooth_alpha is not None else []
        parts += [f"MatMuls fed by {', '.join(sorted(self.float_after))} stay float"] if self.float_after else []
        return "; ".join(parts) or "per-tensor ranges only"


# What a GELU is made of where it is not one op: below opset 20 the exporter writes x * 0.5 * (1 + Erf(x / sqrt 2));
# tanh-approximated GELU (gelu_new) has Tanh, CLIP's quick_gelu x * Sigmoid(1.702 x). _fed_by walks back from a
# MatMul's input through these elementwise ops to find one.
ACTIVATION_PARTS = {"Gelu": frozenset({"Gelu", "Erf", "Tanh", "Sigmoid"})}
_ELEMENTWISE = frozenset({"Mul", "Add", "Div", "Sub", "Pow", "Cast"})


# The text tower's static scheme. all-MiniLM-L6-v2 over 240 real sentences, calibrated on the gate's 24 built-in
# sentences (benchmarks/results/text-int8-schemes-minilm-cpu.json): plain static min cosine 0.911 to fp32,
# SmoothQuant alone 0.944 (its activations have outlier channels, and the GELU outputs feeding the MLPs' second
# MatMuls have a long tail one per-tensor scale cannot hold), both together 0.99672 (mean 0.99908) at 308 sentences/s
# on OpenVINO, the fp32 graph's bf16 302. Alpha: the best of 0.4-0.8 there (0.5 and 0.7 within 0.002).
TEXT_SCHEME = StaticScheme(smooth_alpha=0.6, float_after=frozenset({"Gelu"}))


def quantize_int8(
    model: onnx.ModelProto,
    keep_fp32: Collection[str] = (),
    method: str = DEFAULT_METHOD,
    calibration: Iterable[dict[str, np.ndarray]] = (),
    scheme: StaticScheme = StaticScheme(),
) -> onnx.ModelProto:
    """Return an int8 copy of ``model``. ``keep_fp32``: names of nodes that must stay float32 (the audio front
    end). ``calibration``: input feeds for the "static" method's activation ranges (ignored by "dynamic").
    ``scheme``: what the static method does beyond per-tensor ranges (:data:`TEXT_SCHEME` for text towers).

    Raises ``ValueError`` for an unknown method, a static quantization without calibration feeds, or a graph with
    no weight MatMul to quantize."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if method not in METHODS:
        raise ValueError(f"unknown int8 method {method!r}; choose one of {', '.join(METHODS)}")
    nodes = quantized_matmuls(model, keep_fp32, method, scheme)
    if not nodes:
        raise ValueError("the graph has no weight MatMul outside the front end and the head; nothing to quantize")
    feeds = list(calibration)
    if method == "static" and not feeds:
        raise ValueError("static int8 quantization needs calibration feeds (rows of the evaluation set)")
    if method == "static" and scheme.smooth_alpha is not None:
        model = smooth_activations(model, nodes, feeds, scheme.smooth_alpha)
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


def calibration_feeds(evaluation, items: int = CALIBRATION_ITEMS, tokenizer=None, max_length: int = 0) -> dict:
    """modality -> input feeds for the "static" method's activation ranges (and SmoothQuant's maxima), drawn from
    the export's verification set (the built-in items and the ``--data`` rows): ``items`` pictures, sounds and,
    given the ``tokenizer``, free-text sentences (the built-in ones and ``--data`` captions, cut at ``max_length``
    tokens) spread evenly over it, one per feed (a range does not depend on the batch). Sentences, not the label
    prompts: ranges taken from short prompts did not cover free text (``export.bundle.tower_precision``)."""
    from synergy.export.verify import text_feeds

    def spread(count: int) -> np.ndarray:
        return np.unique(np.linspace(0, count - 1, min(items, count)).round().astype(int))

    images = [{"pixel_values": evaluation.images[i : i + 1]} for i in spread(len(evaluation.images))]
    sounds = [
        {"waveform": evaluation.waveforms[i : i + 1], "waveform_lengths": evaluation.waveform_lengths[i : i + 1]}
        for i in spread(len(evaluation.waveforms))
    ]
    feeds = {"image": images, "audio": sounds}
    if tokenizer is not None and evaluation.texts:
        if max_length < 1:
            raise ValueError(f"calibration_feeds: max_length must be >= 1 with a tokenizer, not {max_length}")
        feeds["text"] = text_feeds(tokenizer, [evaluation.texts[i] for i in spread(len(evaluation.texts))], max_length)
    return feeds


def smooth_activations(
    model: onnx.ModelProto, nodes: Collection[str], feeds: Iterable[dict[str, np.ndarray]], alpha: float
) -> onnx.ModelProto:
    """SmoothQuant (Xiao et al. 2023): a copy of ``model`` where each input of the weight MatMuls ``nodes`` is
    divided per channel by s = max|x|^alpha / max|w|^(1-alpha) (a ``Mul`` by 1/s before them) and each weight's rows
    are multiplied by s, which leaves every product as it was in float and moves the activations' outlier channels
    into the weights, quantized per output channel. Maxima of x over ``feeds`` (onnxruntime, this graph); MatMuls
    that read one input (q, k and v) share one s, from the largest of their weights' rows.

    Written here rather than taken from onnxruntime's own ``SmoothQuant`` option, which needs Intel Neural
    Compressor (a large dependency) for these few lines of arithmetic."""
    import onnxruntime
    from onnx import helper, numpy_helper

    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    graph = smoothed.graph
    by_name = {n.name: n for n in graph.node}
    weights = {t.name: t for t in graph.initializer}
    uses = collections.Counter(name for node in graph.node for name in node.input)
    taken = set(weights) | {n.name for n in graph.node} | {v for n in graph.node for v in n.output}
    readers: dict[str, list[str]] = {}
    for name in nodes:
        readers.setdefault(by_name[name].input[0], []).append(name)
    # a weight shared with another node (tied) or made by a Constant node is left alone: scaling it would change
    # that other node, or is not a tensor to rewrite here; its MatMuls are quantized unsmoothed
    sources = sorted(
        source
        for source, names in readers.items()
        if all(by_name[n].input[1] in weights and uses[by_name[n].input[1]] == 1 for n in names)
    )
    if not sources:
        return smoothed

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in sources if name not in known
    )
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    maxima: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="synergy-smooth-") as folder:
        path = Path(folder) / "probe.onnx"  # a file, with external data: a proto over 2 GiB cannot be serialised
        onnx.save_model(probe, path, save_as_external_data=True, location="probe.onnx.data")
        del probe  # one copy of the graph fewer while the session runs
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for feed in feeds:
            for name, value in zip(sources, session.run(sources, feed)):
                channel_max = np.abs(value).reshape(-1, value.shape[-1]).max(0)
                maxima[name] = np.maximum(maxima.get(name, 0), channel_max)
    if not maxima:
        raise ValueError("SmoothQuant needs calibration feeds (rows of the evaluation set)")

    for source in sources:
        names = readers[source]
        arrays = [numpy_helper.to_array(weights[by_name[n].input[1]]) for n in names]  # [in, out]
        weight_max = np.max([np.abs(w).max(1) for w in arrays], 0)
        scale = maxima[source] ** alpha / np.maximum(weight_max, 1e-5) ** (1 - alpha)
        scale = np.clip(scale, 1e-5, None).astype(np.float32)
        for name, array in zip(names, arrays):
            tensor = weights[by_name[name].input[1]]
            tensor.CopyFrom(numpy_helper.from_array((array * scale[:, None]).astype(np.float32), tensor.name))
        inverse, output = f"{source}_smooth_inverse", f"{source}_smoothed"
        if {inverse, output, f"{source}_smooth"} & taken:
            raise ValueError(f"SmoothQuant: the graph already has a value or node named after {source!r}_smooth*")
        graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), inverse))
        first = min(i for i, n in enumerate(graph.node) if n.name in names)
        graph.node.insert(first, helper.make_node("Mul", [source, inverse], [output], name=f"{source}_smooth"))
        for name in names:
            by_name[name].input[0] = output
    return smoothed


def quantized_matmuls(
    model: onnx.ModelProto, keep_fp32: Collection[str], method: str, scheme: StaticScheme = StaticScheme()
) -> list[str]:
    """Names of the ``MatMul`` nodes :func:`quantize_int8` writes int8 with this method and scheme: the weight
    MatMuls, minus those the static scheme keeps float (``scheme.float_after``)."""
    nodes = weight_matmuls(model, keep_fp32)
    if method == "static" and scheme.float_after:
        fed = _fed_by(model, nodes, scheme.float_after)
        nodes = [n for n in nodes if n not in fed]
    return nodes


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


def _fed_by(model: onnx.ModelProto, nodes: Collection[str], op_types: Collection[str], depth: int = 5) -> set[str]:
    """Those of ``nodes`` whose first input is made by an op of ``op_types`` (a ``"Gelu"`` also counts in its
    decomposed forms, :data:`ACTIVATION_PARTS`), directly or through at most ``depth`` elementwise ops."""
    producer = {out: node for node in model.graph.node for out in node.output}
    by_name = {n.name: n for n in model.graph.node}
    wanted = frozenset().union(*(ACTIVATION_PARTS.get(t, {t}) for t in op_types))

    def made_by_activation(value: str) -> bool:
        frontier = [value]
        for _ in range(depth):
            made = [producer[v] for v in frontier if v in producer]
            if any(node.op_type in wanted for node in made):
                return True
            frontier = [v for node in made if node.op_type in _ELEMENTWISE for v in node.input]
        return False

    return {name for name in nodes if made_by_activation(by_name[name].input[0])}


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
