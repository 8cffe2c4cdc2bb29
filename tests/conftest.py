"""Shared test set-up. Triton kernels run under the interpreter on machines without a GPU: TRITON_INTERPRET must be
set before triton is first imported, so it is decided here, before any test module loads."""

import os
import shutil

import pytest

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# interpreted kernels do their tile products in numpy: OpenBLAS threads thrash on a busy 2-core machine
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if any("requires_cuda" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="requires an NVIDIA GPU with CUDA; none is visible to torch on this machine")
        for item in items:
            if "requires_cuda" in item.keywords:
                item.add_marker(skip)
