"""checkpoint -> bundle: ONNX graphs, TensorRT engines or a Triton model repository, verified against PyTorch.

    from synergy.export import export_bundle
    print(export_bundle("runs/demo/checkpoint", "runs/demo/bundle", fmt="onnx", precision="fp16"))

The bundle format (``manifest.json``) is defined once, in ``synergy.runtime.manifest``.
"""

from synergy.export.bundle import FORMATS, PRECISIONS, TRITON_PLATFORMS, export_bundle
from synergy.export.errors import ExportError
from synergy.export.tensorrt_engines import BatchProfile

__all__ = ["FORMATS", "PRECISIONS", "TRITON_PLATFORMS", "BatchProfile", "ExportError", "export_bundle"]
