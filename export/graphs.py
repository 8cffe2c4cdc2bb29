"""PyTorch towers -> ONNX graphs: one graph per tower, dynamic batch (and text/audio length), checked and saved.

Exporter: ``torch.onnx.export(dynamo=True)``, i.e. ``torch.export`` then ONNX translation. The dynamic dims are
``torch.export.Dim`` symbols, so a tower that quietly specialises one (a Python ``if`` on a length, an int baked
from ``x.shape``) makes the export fail instead of shipping a graph that is only right at the example's shape.
The TorchScript tracer (``dynamo=False``) is ~20x faster here but records one execution: on transformers 5.23 it
warns that it bakes the mask padding test in ``masking_utils`` and SDPA's ``is_causal`` decision as constants,
which happen to be right for these towers today; it is also deprecated since torch 2.9. The slow part of the
dynamo path is paid once per process and checkpoint (:func:`export_tower_graphs` caches the graphs).

Graph contract (``synergy.runtime.manifest``): inputs ``pixel_values`` [batch, 3, S, S] float32, ``input_ids`` +
``attention_mask`` [batch, length] int64, ``waveform`` [batch, samples] float32 + ``waveform_lengths`` [batch]
int64 (real samples per row: the front end pads in the log-mel domain past them); output ``embedding`` [batch, D].
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from synergy.core.model import SynergyModel
from synergy.runtime.manifest import TensorSpec

OUTPUT_NAME = "embedding"
FORBIDDEN_OPS = frozenset({"STFT", "DFT"})  # patchy in TensorRT and some EPs: the front end is a Conv1d instead
MIN_OPSET = 18  # the torch.export-based exporter's floor
# Two default opsets, by what reads the bundle. At 18, SDPA exports as MatMul + Softmax with the padding mask's NaN
# guard (IsNaN + Where after Softmax): onnxruntime's CPU optimiser fuses no attention there (nor in the mask-free
# image graph: its AttentionFusion matches BERT's exporter patterns only). At 23 it is ONNX's own Attention op, which
# onnxruntime (>= 1.23, CPU) runs as one kernel and OpenVINO reads; the MLPs' Gelu becomes one op too (BiasGelu
# after onnxruntime's fusions). See docs/runtime.md for what that measured.
PORTABLE_OPSET = 18  # TensorRT 10.0+, onnxruntime >= 1.14 and Triton's ORT backend all read it
RUNTIME_OPSET = 23  # bundles for synergy's own runtime (onnxruntime >= 1.23, OpenVINO): fused attention
EXTERNAL_DATA_BYTES = 1 << 30  # graphs above 1 GiB keep their weights in a side file (protobuf stops at 2 GiB)
_ONNX_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT16: "float16"}


class ImageGraph(nn.Module):
    def __init__(self, model: SynergyModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values)


class TextGraph(nn.Module):
    def __init__(self, model: SynergyModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode_text(input_ids, attention_mask)


class AudioGraph(nn.Module):
    def __init__(self, model: SynergyModel):
        super().__init__()
        self.model = model

    def forward(self, waveform: Tensor, waveform_lengths: Tensor) -> Tensor:
        return self.model.encode_audio(waveform, waveform_lengths)


GRAPH_MODULES = {"image": ImageGraph, "text": TextGraph, "audio": AudioGraph}


@dataclass(frozen=True)
class TowerGraph:
    """One exported tower. ``fp32_nodes``: nodes that must stay float32 in a float16 graph (the audio front end)."""

    modality: str
    model: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    fp32_nodes: frozenset[str] = frozenset()


def default_opset(fmt: str) -> int:
    """The opset a bundle of format ``fmt`` is exported at unless asked: ``RUNTIME_OPSET`` for "onnx" (read by
    synergy's runtime), ``PORTABLE_OPSET`` for TensorRT engines ("trt") and Triton repositories ("triton"), whose
    parsers and onnxruntime backend may predate opset 23."""
    return RUNTIME_OPSET if fmt == "onnx" else PORTABLE_OPSET


def tower_specs(model: SynergyModel) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    """modality -> (inputs, outputs) as the manifest lists them; strings name the dynamic dims."""
    size = model.config.image.image_size  # the processor's output (DINOv2's differs from its config's)
    output = (TensorSpec(OUTPUT_NAME, "float32", ("batch", model.config.embed_dim)),)
    return {
        "image": ((TensorSpec("pixel_values", "float32", ("batch", 3, size, size)),), output),
        "text": (
            (
                TensorSpec("input_ids", "int64", ("batch", "length")),
                TensorSpec("attention_mask", "int64", ("batch", "length")),
            ),
            output,
        ),
        "audio": (
            (
                TensorSpec("waveform", "float32", ("batch", "samples")),
                TensorSpec("waveform_lengths", "int64", ("batch",)),
            ),
            output,
        ),
    }


def example_inputs(model: SynergyModel) -> dict[str, tuple[Tensor, ...]]:
    """Batches of 2 (1 would let torch.export specialise the batch dim) with a padded text row and a short audio
    row, so the export traces the masking paths rather than the no-padding shortcuts."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    size = model.config.image.image_size  # the processor's output (DINOv2's differs from its config's)
    length = config.text.max_length
    vocab = model.text_tower.config.vocab_size
    ids = torch.randint(4, vocab, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.int64)
    mask[1, length // 2 :] = 0
    samples = round(config.audio.clip_seconds * config.audio.sample_rate)
    return {
        "image": (torch.randn(2, 3, size, size, generator=generator),),
        "text": (ids, mask),
        "audio": (0.1 * torch.randn(2, samples, generator=generator), torch.tensor([samples, samples // 2])),
    }


def _dynamic_shapes(modality: str, model: SynergyModel) -> dict:
    batch = torch.export.Dim("batch", min=1)
    if modality == "image":
        return {"pixel_values": {0: batch}}
    if modality == "text":
        # positions beyond max_length have no position embedding: the graph's length is bounded by it
        length = torch.export.Dim("length", min=1, max=model.config.text.max_length)
        return {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    return {"waveform": {0: batch, 1: torch.export.Dim("samples", min=1)}, "waveform_lengths": {0: batch}}


_CACHE: dict[tuple, dict[str, TowerGraph]] = {}
_CACHE_MAX_BYTES = 256 << 20


def export_tower_graphs(model: SynergyModel, opset: int, cache_key: tuple | None = None) -> dict[str, TowerGraph]:
    """Export the three towers of ``model`` (eval mode, float32) to ONNX, fp32, in memory.

    ``cache_key`` (e.g. the checkpoint's sha256 + opset): graphs of small models are kept for the life of the
    process, so exporting one checkpoint in several formats pays torch.export once; every export still verifies
    the graphs it writes against PyTorch.
    """
    key = (cache_key, opset, torch.__version__) if cache_key is not None else None
    if key in _CACHE:
        return _CACHE[key]
    model = model.eval()
    specs = tower_specs(model)
    examples = example_inputs(model)
    graphs = {}
    for modality, module_type in GRAPH_MODULES.items():
        inputs, outputs = specs[modality]
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                module_type(model).eval(),
                examples[modality],
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=_dynamic_shapes(modality, model),
                input_names=[t.name for t in inputs],
                optimize=True,
                verbose=False,
            )
        _name_output(program.model.graph, OUTPUT_NAME)
        proto = program.model_proto
        _drop_constant_masks(proto)
        fp32_nodes = audio_frontend_nodes(proto) if modality == "audio" else frozenset()
        _set_io_shapes(proto, inputs, outputs)
        for node in proto.graph.node:  # stack traces and FX dumps: bulky, and they hold local paths
            del node.metadata_props[:]
        graphs[modality] = TowerGraph(modality, proto, inputs, outputs, fp32_nodes)
    if key is not None and sum(g.model.ByteSize() for g in graphs.values()) <= _CACHE_MAX_BYTES:
        _CACHE.clear()
        _CACHE[key] = graphs
    return graphs


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter that says nothing about this export: its registry's "torchvision is not
    installed" log lines, the renaming note when text inputs share their dims, and a pytree deprecation."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        registry.setLevel(level)


def _name_output(graph, name: str) -> None:
    """Name the graph output ``name``. The exporter names values after the aten op that made them, so a folded
    constant can already be called ``embedding`` (CLIP's position-embedding lookup): rename that one first."""
    output = graph.outputs[0]
    for value in [*graph.initializers.values(), *(v for node in graph for v in node.outputs)]:
        if value.name == name and value is not output:
            value.name = f"{name}_internal"
    output.name = name


def _drop_constant_masks(proto: onnx.ModelProto) -> int:
    """Remove the attention mask input of every ``Attention`` node whose mask is a constant "attend everywhere"
    (all True, broadcast with ``Expand``), then the nodes that fed only it. -> masks removed.

    transformers builds such a mask for towers that never pad (AST, ViT): it changes no score, but it keeps
    OpenVINO on its masked attention path (an IsNaN + Select guard per layer) and onnxruntime on its masked
    kernel. Only constant masks are dropped: a text tower's mask comes from its input and stays."""
    from onnx import numpy_helper
    from onnxscript.optimizer import remove_unused_nodes

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute})
    dropped = 0
    for node in graph.node:
        if node.op_type != "Attention" or len(node.input) < 4 or not node.input[3]:
            continue
        mask = producer.get(node.input[3])
        source = mask.input[0] if mask is not None and mask.op_type == "Expand" else node.input[3]
        tensor = constants.get(source)
        if tensor is None or tensor.data_type != onnx.TensorProto.BOOL or not numpy_helper.to_array(tensor).all():
            continue
        if len(node.input) == 4:
            del node.input[3]
        else:
            node.input[3] = ""  # an optional input in the middle stays, empty
        dropped += 1
    if dropped:
        remove_unused_nodes(proto)
    return dropped


def _set_io_shapes(proto: onnx.ModelProto, inputs, outputs) -> None:
    """Write the manifest's dim names onto the graph I/O (the exporter's symbols are s0, s1, ...)."""
    for values, specs in ((proto.graph.input, inputs), (proto.graph.output, outputs)):
        by_name = {spec.name: spec for spec in specs}
        if sorted(by_name) != sorted(v.name for v in values):
            raise RuntimeError(f"exported graph I/O {[v.name for v in values]} != expected {sorted(by_name)}")
        for value in values:
            dims = value.type.tensor_type.shape.dim
            for dim, want in zip(dims, by_name[value.name].shape):
                if isinstance(want, str):
                    dim.dim_param = want
                else:
                    dim.dim_value = want


def audio_frontend_nodes(proto: onnx.ModelProto) -> frozenset[str]:
    """Names of the nodes that compute the audio front end's features: every ancestor of the values that the
    nodes the exporter tagged with the ``audio_frontend`` module scope hand to the rest of the graph. (Walking
    back from the boundary also catches nodes the optimiser made without a scope, like a fused ``Split``.)"""
    graph = proto.graph
    tagged = set()
    for node in graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes" and any(
                scope.rsplit(".", 1)[-1] == "audio_frontend" for scope in ast.literal_eval(prop.value)
            ):
                tagged.add(node.name)
    if not tagged:
        raise RuntimeError("no node of the audio graph carries the audio_frontend scope; cannot keep it in fp32")
    producer = {out: node for node in graph.node for out in node.output}
    boundary = set()
    for node in graph.node:
        if node.name not in tagged:
            boundary.update(n for n in node.input if n in producer and producer[n].name in tagged)
    ancestors, stack = set(), list(boundary)
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in ancestors:
            continue
        ancestors.add(node.name)
        stack.extend(node.input)
    return frozenset(ancestors)


def save_graph(proto: onnx.ModelProto, path: Path, external_data: bool | None = None) -> list[Path]:
    """Write ``proto`` to ``path``; weights go to ``<name>.data`` beside it when ``external_data`` (None: when
    the graph is over 1 GiB). Returns the files written."""
    path = Path(path)
    if external_data is None:
        external_data = proto.ByteSize() > EXTERNAL_DATA_BYTES
    if not external_data:
        onnx.save_model(proto, path)
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(
        proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024
    )
    return [path, data]


def external_data_files(path: Path, root: Path) -> list[Path]:
    """The side files ``path``'s graph reads its weights from. Raises ``ValueError`` if one lies outside ``root``
    (an absolute location or ``..``) or is missing: a bundle must be self-contained and relocatable."""
    path, root = Path(path), Path(root).resolve()
    model = onnx.load_model(path, load_external_data=False)
    files = set()
    tensors = list(model.graph.initializer)
    tensors += [a.t for node in model.graph.node for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        file = (path.parent / location).resolve()
        if not location or os.path.isabs(location) or root not in file.parents:
            raise ValueError(f"{path.name}: tensor {tensor.name!r} reads weights from {location!r}, outside the bundle")
        if not file.is_file():
            raise ValueError(f"{path.name}: tensor {tensor.name!r} reads weights from {location!r}, which is missing")
        files.add(file)
    return sorted(files)


def check_graph(path: Path, root: Path, inputs, outputs) -> None:
    """``onnx.checker`` with ``full_check`` (types and shapes inferred strictly), no STFT/DFT op, external data
    inside ``root``, and the I/O names and dtypes of the manifest. Raises ``ValueError`` naming the problem."""
    path = Path(path)
    external_data_files(path, root)
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load_model(path, load_external_data=False)
    forbidden = sorted({node.op_type for node in model.graph.node} & FORBIDDEN_OPS)
    if forbidden:
        raise ValueError(f"{path.name}: contains {forbidden}; the audio front end must export as a Conv1d")
    for values, specs, kind in ((model.graph.input, inputs, "input"), (model.graph.output, outputs, "output")):
        got = [(v.name, _ONNX_TYPES.get(v.type.tensor_type.elem_type, "?")) for v in values]
        want = [(s.name, s.dtype) for s in specs]
        if got != want:
            raise ValueError(f"{path.name}: graph {kind}s {got} but the bundle contract says {want}")


def graph_op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load_model(path, load_external_data=False).graph.node}
