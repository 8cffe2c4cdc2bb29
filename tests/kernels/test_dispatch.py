"""One dispatch for every kernel op (synergy.kernels.dispatch): importing an op leaves triton alone, "auto" falls back
to the reference when triton is installed but does not import, an explicit "triton" says why it cannot run, and
nothing exports a Triton kernel."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from synergy.kernels import dispatch

ATTENTION = "synergy.kernels.attention.triton"
CUDA = torch.device("cuda")  # a device, not a tensor: the rule is testable on a machine without a GPU


def test_auto_picks_triton_only_for_cuda_outside_export(monkeypatch):
    pytest.importorskip("triton")
    assert dispatch.resolve_impl("auto", torch.device("cpu"), kernels=ATTENTION) == "torch"
    assert dispatch.resolve_impl("auto", CUDA, kernels=ATTENTION) == "triton"
    assert dispatch.resolve_impl("torch", CUDA, kernels=ATTENTION) == "torch"
    assert dispatch.resolve_impl("triton", CUDA, kernels=ATTENTION) == "triton"
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch.resolve_impl("cuda", CUDA, kernels=ATTENTION)
    # while an exporter traces, "auto" is the reference (both ops: the loss used to skip this check) and an
    # explicit "triton" is an error rather than an opaque kernel inside the graph
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert dispatch.resolve_impl("auto", CUDA, kernels=ATTENTION) == "torch"
    with pytest.raises(RuntimeError, match="cannot be exported"):
        dispatch.resolve_impl("triton", CUDA, kernels=ATTENTION)


BROKEN_TRITON = """
import logging, sys, torch
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
from synergy.kernels import dispatch
import synergy.kernels.attention as attention
import synergy.kernels.contrastive as contrastive

cuda = torch.device("cuda")
for kernels in (attention.KERNELS, contrastive.KERNELS):
    assert dispatch.resolve_impl("auto", cuda, kernels=kernels) == "torch"
    try:
        dispatch.resolve_impl("triton", cuda, kernels=kernels)
    except RuntimeError as error:
        assert "OSError: libcuda.so.1: cannot open shared object file" in str(error), error
    else:
        raise AssertionError("impl='triton' with a broken triton did not raise")
q = torch.randn(1, 1, 5, 32)
x = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
for call in (lambda: attention.fused_attention(q, q, q, impl="triton"),
             lambda: contrastive.trimodal_contrastive_loss(x, x, x, torch.ones(3), impl="triton")):
    try:
        call()
    except RuntimeError as error:
        assert "does not import here (OSError: libcuda.so.1" in str(error), error
    else:
        raise AssertionError("the public op with impl='triton' and a broken triton did not raise")
print("ok")
"""


def test_broken_triton_falls_back_under_auto_and_explains_under_triton(tmp_path):
    """An installed triton whose import fails (here: libcuda missing) is found by importlib.util.find_spec, which is
    what both ops used to check: "auto" then chose the kernels and crashed. The dispatch really imports it."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise OSError("libcuda.so.1: cannot open shared object file")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BROKEN_TRITON)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # one warning for the fallback, however many calls fell back
    assert result.stdout.count("triton does not import") == 1, result.stdout
    assert result.stdout.strip().endswith("ok")


# each op: its module, inputs on CPU, and a call with {impl}
NO_INTERPRETER = {
    "attention": (
        "synergy.kernels.attention",
        "x = torch.randn(1, 1, 5, 32)",
        "op.fused_attention(x, x, x, impl={impl!r})",
    ),
    "contrastive": (
        "synergy.kernels.contrastive",
        "x = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)",
        "op.trimodal_contrastive_loss(x, x, x, torch.ones(3), impl={impl!r})",
    ),
}


@pytest.mark.parametrize("op", list(NO_INTERPRETER))
def test_import_leaves_triton_alone_and_cpu_triton_without_interpreter_raises(op):
    """In a fresh process without TRITON_INTERPRET (as on a GPU machine, or a CPU one where nobody asked for the
    interpreter): importing the op and running impl="torch" leave triton unimported, and impl="triton" on CPU tensors
    says what to do."""
    module, inputs, call = NO_INTERPRETER[op]
    code = textwrap.dedent(
        f"""
        import sys, torch
        import {module} as op
        assert "triton" not in sys.modules, "importing {module} imported triton"
        {inputs}
        {call.format(impl="torch")}
        assert "triton" not in sys.modules, "impl='torch' imported triton"
        try:
            {call.format(impl="triton")}
        except RuntimeError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
        else:
            raise AssertionError("impl='triton' on CPU without the interpreter did not raise")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
