"""A bundle laid out as a Triton Inference Server model repository, for users who outgrow one process.

One model per tower, named ``synergy_<tower>``, each with a ``config.pbtxt`` and version ``1``::

    repository/
      manifest.json  tokenizer.json                 # Triton only looks at folders; the runtime reads these
      synergy_image/config.pbtxt  synergy_image/1/model.onnx
      synergy_text/...            synergy_audio/...

``platform``: "onnxruntime" (Triton's ONNX Runtime backend; ``1/model.onnx``, or when the weights are external the
directory layout ``1/model.onnx/model.onnx`` + its data file, which Triton copies as a unit) or "tensorrt"
(``1/model.plan``, engines built for the server's GPU). The batch dim is Triton's (``max_batch_size``), so the
configs list the other dims; variable dims are -1. A per-row scalar such as ``waveform_lengths`` [batch] has no
other dim: Triton needs at least one, so it is declared ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }`` (the
documented way to hand the model a [batch] tensor). Requests are batched server-side by ``dynamic_batching``;
Triton only batches requests whose shapes agree, so text clients should pad to the model's max length.
"""

from __future__ import annotations

from pathlib import Path

from synergy.export.tensorrt_engines import BatchProfile
from synergy.runtime.manifest import TensorSpec

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
MAX_QUEUE_DELAY_US = 1000


def model_name(modality: str) -> str:
    return f"synergy_{modality}"


def model_file(modality: str, platform: str, external_data: bool = False) -> str:
    """The tower's file inside the repository, relative to its root."""
    version = f"{model_name(modality)}/1"
    if platform == "tensorrt":
        return f"{version}/model.plan"
    return f"{version}/model.onnx/model.onnx" if external_data else f"{version}/model.onnx"


def model_config(
    modality: str,
    platform: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    batch: BatchProfile,
) -> str:
    """The ``config.pbtxt`` text of one tower (protobuf text format of ``inference.ModelConfig``)."""
    if platform not in PLATFORMS:
        raise ValueError(f"Triton platform {platform!r} is not one of {sorted(PLATFORMS)}")

    def tensors(specs: tuple[TensorSpec, ...]) -> str:
        blocks = []
        for spec in specs:
            if spec.shape[0] != "batch":
                raise ValueError(f"{spec.name}: Triton batching needs the batch dim first, got {spec.shape}")
            dims = ", ".join("-1" if isinstance(d, str) else str(d) for d in spec.shape[1:])
            reshape = "" if dims else "\n    reshape: { shape: [ ] }"  # [batch] -> Triton's [batch, 1] and back
            head = f'  {{\n    name: "{spec.name}"\n    data_type: {TRITON_DTYPES[spec.dtype]}\n'
            blocks.append(f"{head}    dims: [ {dims or '1'} ]{reshape}\n  }}")
        return ",\n".join(blocks)

    # one instance per GPU for engines; ONNX models go where Triton finds a device (GPU if any, else CPU)
    kind = "KIND_GPU" if platform == "tensorrt" else "KIND_AUTO"
    return (
        f"# Synergy {modality} tower -> L2-normalised embeddings [batch, D]; from `synergy export --format triton`\n"
        f'name: "{model_name(modality)}"\n'
        f'platform: "{PLATFORMS[platform]}"\n'
        f"max_batch_size: {batch.max}\n"
        f"input [\n{tensors(inputs)}\n]\n"
        f"output [\n{tensors(outputs)}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {batch.opt} ]\n"
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n"
        "}\n"
        "instance_group [\n"
        f"  {{\n    count: 1\n    kind: {kind}\n  }}\n"
        "]\n"
    )


def write_model_config(root: Path, modality: str, platform: str, inputs, outputs, batch: BatchProfile) -> Path:
    path = Path(root) / model_name(modality) / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(model_config(modality, platform, inputs, outputs, batch))
    return path
