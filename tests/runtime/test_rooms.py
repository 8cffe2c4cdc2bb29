"""The runtime's rooms: the import floor (never torch), serve on public modules only, one opening line per module,
the backend registry and the bounded label cache."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from synergy.runtime import BackendError, Runtime
from synergy.runtime.towers import BACKENDS, check_choice, choose_backend
from synergy.runtime.zeroshot import LabelCache

from .conftest import LABELS, TEMPLATES

PACKAGE = Path(__file__).resolve().parents[2]
RUNTIME_MODULES = sorted(p.stem for p in (PACKAGE / "runtime").glob("*.py") if p.stem != "__init__")
FLOOR = {"numpy", "onnxruntime", "tokenizers", "soundfile", "soxr", "PIL"}


def test_importing_every_runtime_module_leaves_torch_out():
    """``import synergy.runtime`` and each of its modules: no torch, transformers or their kin in sys.modules."""
    code = textwrap.dedent(
        f"""
        import importlib, sys
        import synergy.runtime
        for name in {RUNTIME_MODULES!r}:
            importlib.import_module("synergy.runtime." + name)
        heavy = sorted(m for m in ("torch", "transformers", "torchaudio", "torchvision") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(PACKAGE.parent)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", [m for m in RUNTIME_MODULES if m != "infer"])  # infer: moving up to the CLI
def test_each_runtime_module_opens_with_one_line_and_imports_only_the_floor(module):
    path = PACKAGE / "runtime" / f"{module}.py"
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert doc and doc.splitlines()[0].strip().endswith((".", ":")) and len(doc.splitlines()[0]) <= 120, doc
    third_party = {name.split(".")[0] for name in _imports(path)} - set(sys.stdlib_module_names) - {"synergy"}
    lazy = {"tensorrt_backend": {"tensorrt", "cuda"}, "openvino_backend": {"openvino"}, "video": {"av"}}.get(
        module, set()
    )
    assert third_party <= FLOOR | lazy, f"runtime/{module}.py imports {sorted(third_party - FLOOR - lazy)}"


def test_serve_imports_only_public_runtime_modules():
    for path in (PACKAGE / "serve").glob("*.py"):
        private = {n for n in _imports(path) if n.startswith("synergy.runtime.") and n.split(".")[2].startswith("_")}
        assert not private, f"{path.name} imports {private}"
        assert "synergy.runtime.runtime" not in _imports(path), f"{path.name} imports the facade's module"


def test_backend_registry_names_and_checks():
    assert set(BACKENDS) == {"onnxruntime", "openvino", "openvino-bf16", "tensorrt"}
    assert BACKENDS["tensorrt"].runs_engines and not BACKENDS["onnxruntime"].runs_engines
    with pytest.raises(
        BackendError,
        match=r"backend 'vulkan' is not one of \('auto', 'onnxruntime', 'openvino', 'openvino-bf16', 'tensorrt'\)",
    ):
        check_choice("vulkan", "cpu")
    with pytest.raises(BackendError, match=r"device 'tpu' is not one of"):
        check_choice("auto", "tpu")
    with pytest.raises(BackendError, match=r"runs on device='cuda' only"):
        BACKENDS["tensorrt"].check("cpu")


def test_auto_picks_onnxruntime_for_onnx_graphs(runtime):
    assert choose_backend("auto", "cpu", runtime.manifest) == "onnxruntime"
    assert runtime.backend == "onnxruntime"


def test_label_cache_is_bounded_and_answers_past_its_bound(runtime):
    """The cache keeps at most ``max_labels`` (least recently used dropped); a request for more labels than that
    is still answered whole, with the same embeddings as an unbounded cache gives."""
    calls = []

    def embed_text(texts):
        calls.append(len(texts))
        return runtime.embed_text(texts)

    unbounded = LabelCache().embeddings(LABELS, TEMPLATES, runtime.embed_text)
    cache = LabelCache(max_labels=2)
    got = cache.embeddings(LABELS, TEMPLATES, embed_text)
    np.testing.assert_array_equal(got, unbounded)
    assert list(cache) == list(LABELS[-2:]) and len(cache) == 2
    again = cache.embeddings(LABELS[-1:], TEMPLATES, embed_text)  # cached: no new embedding
    assert calls == [len(LABELS) * len(TEMPLATES)]
    np.testing.assert_array_equal(again, unbounded[-1:])
    cache.embeddings(LABELS[:1], TEMPLATES, embed_text)  # a new label evicts the least recently used
    assert list(cache) == [LABELS[-1], LABELS[0]]


def test_runtime_facade_stays_small():
    """The facade reads in one sitting: the rooms hold the work."""
    lines = (PACKAGE / "runtime" / "runtime.py").read_text(encoding="utf-8").count("\n")
    assert lines < 320, lines
    assert Runtime.open.__doc__ and Runtime.classify.__doc__


def test_default_threads_are_the_physical_cores_this_process_may_use(tiny_bundle):
    from synergy.runtime.towers import physical_cores

    assert 1 <= physical_cores() <= os.cpu_count()
    with Runtime.open(tiny_bundle[0]) as runtime:
        runtime.embed_text(["dog"])
        session = runtime._towers.get("text").session
        assert session.get_session_options().intra_op_num_threads == physical_cores()
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity here: the restricted case needs it")
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
    code += "from synergy.runtime.towers import physical_cores; print(physical_cores())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(PACKAGE.parent)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.stdout.strip() == "1", result.stderr  # a taskset / container grant, not the machine's cores
