"""Which implementation a kernel op runs: one rule for every op in `synergy.kernels`.

    impl = resolve_impl(impl, q.device, kernels="synergy.kernels.attention.triton")   # -> "triton" | "torch"

impl="auto"   -> "triton" when the tensors are on CUDA, nothing is being exported (torch.export, dynamo-ONNX,
                 TorchScript tracing, legacy ONNX), and triton really imports; "torch" (the reference) otherwise.
                 An installed triton that fails to import (a broken wheel, a missing libcuda, a version skew) is a
                 fallback with one warning in the log, not a crash.
impl="triton" -> "triton", or a RuntimeError that says why it cannot run and what to do instead: triton does not
                 import (with the import error), an export is tracing, or the tensors are on CPU and the op's kernels
                 were not compiled for the Triton interpreter (TRITON_INTERPRET=1 before triton is first imported).
impl="torch"  -> "torch".

Importing this module imports neither triton nor any kernel module; `resolve_impl` imports triton only when a CUDA
tensor (or an explicit "triton") asks for it, once per process.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

IMPLS = ("auto", "triton", "torch")

logger = logging.getLogger(__name__)


def is_exporting() -> bool:
    """True while torch.export / dynamo-ONNX, TorchScript tracing or legacy ONNX export trace the model."""
    return bool(torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


@functools.cache
def triton_import_error() -> str | None:
    """None when `import triton, triton.language` succeeds in this process, else why it failed (cached).

    A real import, not importlib.util.find_spec: find_spec only says a `triton` folder exists, and an installed
    triton that cannot load (no libcuda, an ABI mismatch with torch) must fall back under "auto", not crash it."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as error:  # a broken install raises anything: ImportError, OSError, AttributeError, ...
        return f"{type(error).__name__}: {error}"
    return None


@functools.cache
def _warn_fallback(reason: str) -> None:
    logger.warning("triton does not import (%s): impl='auto' runs the PyTorch reference on CUDA (logged once)", reason)


def resolve_impl(impl: str, device: torch.device, *, kernels: str) -> str:
    """impl: "auto" | "triton" | "torch"; device: the inputs' device; kernels: the module path of the op's Triton
    kernels (imported only for an explicit "triton" on CPU, to ask whether they run interpreted: its INTERPRETED).
    Returns "triton" or "torch"; raises ValueError for an unknown impl, RuntimeError for a "triton" that cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    cuda = torch.device(device).type == "cuda"
    if impl == "auto":
        if not cuda or is_exporting():
            return "torch"
        reason = triton_import_error()
        if reason is not None:
            _warn_fallback(reason)
            return "torch"
        return "triton"
    # an explicit "triton": run it, or say why not
    if is_exporting():
        raise RuntimeError(
            "impl='triton' cannot be exported (a Triton kernel is opaque to torch.export / ONNX); use impl='auto', "
            "which exports the PyTorch reference, or impl='torch'"
        )
    reason = triton_import_error()
    if reason is not None:
        raise RuntimeError(
            f"impl='triton' needs triton, which does not import here ({reason}); "
            "pip install 'synergy-clip[gpu]' (or fix the triton install), or use impl='torch'"
        )
    if not cuda and not importlib.import_module(kernels).INTERPRETED:
        raise RuntimeError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is first imported (the Triton "
            "interpreter, slow, for tests); use impl='torch' or move the tensors to a CUDA device"
        )
    return "triton"
