"""The GPU proof: install, every CUDA benchmark and the suite's requires_cuda tests, in one command, within 10
minutes on one H100/H200 (the parts' limits add up to 610 s), each part writing a JSON (device, versions, commit,
numbers) into --out.

    make gpu-proof OUT=proof                 # on the GPU machine (python3 benchmarks/gpu_proof.py --out proof)
    make gpu-proof DRY_RUN=1 OUT=dir         # every part at toy size on CPU (CI runs this: the script cannot rot)

Parts, in order, each under its own time limit (a part that fails or runs out of time is recorded, the next runs):
  install      pip install --no-deps --no-build-isolation -e . ; pip install --no-deps --no-index wheels/*.whl
  contrastive  bench_contrastive.py: fused vs reference vs materialised logits, bf16 and fp32, B from 1024 up, the
               largest B at D=512 under an 80 GiB allocator cap (measured, and predicted from the memory fit)
  attention    bench_attention.py: fused vs SDPA flash / masked, base geometries, 0% and 50% key padding
  train_step   bench_train_step.py: one base-geometry step, fused vs sdpa + torch loss: samples/s, peak memory
  tune         tune_contrastive.py: the loss's default tiles (forward and backward each its own) against single
               configs around them, B=32768, D=512, bf16
  tests        the suite's `requires_cuda` tests (the real kernels compiled, vs the PyTorch references) -> tests.json;
               last, after the numbers: the whole suite runs on CPU in CI (12 min on 2 cores, single process) and
               would not fit a 15-minute device lease
The GPU image has no package registry: soundfile and soxr come as wheels in wheels/ (benchmarks/README.md "GPU proof").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from provenance import git_commit, write_result  # benchmarks/provenance.py: this folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# the runtime's decoders, absent from the GPU image: cp312 manylinux x86_64 wheels (pycparser: cffi's, pure Python)
WHEELS = ("soundfile", "soxr", "cffi", "pycparser")
# measured on the H200 (benchmarks/results/gpu-h200-proof.json): install 10-13 s, contrastive 82 s, attention 38 s,
# train_step 51 s, the requires_cuda tests over 120 s with Triton's cache cold (64 s warm)
BUDGET_S = {"install": 60, "contrastive": 110, "attention": 60, "train_step": 80, "tune": 60, "tests": 240}  # 610 s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON files (created)")
    p.add_argument("--dry-run", action="store_true", help="every part at toy size on CPU, nothing installed")
    p.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="soundfile/soxr wheels (default: wheels/)")
    p.add_argument("--parts", nargs="+", default=list(BUDGET_S), choices=list(BUDGET_S))
    return p.parse_args(argv)


def environment() -> dict:
    """Versions without importing torch in this process (the install part may change what is importable)."""
    code = (
        "import json, platform, torch; import importlib.metadata as m\n"
        "v = lambda n: (m.version(n) if any(True for _ in m.distributions(name=n)) else None)\n"
        "d = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine()\n"
        "print(json.dumps(dict(device=d, torch=torch.__version__, cuda=torch.version.cuda, triton=v('triton'),\n"
        "  transformers=v('transformers'), onnxruntime=v('onnxruntime'), soundfile=v('soundfile'), soxr=v('soxr'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    env = json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr[-500:]}
    return dict(env, python=platform.python_version(), commit=git_commit(), host=platform.node())


def run(command: list[str], timeout: float, env: dict | None = None, log: Path | None = None) -> dict:
    """Run a part's command -> {command, returncode, seconds, timed_out, output_tail}; output also goes to log.

    The command runs in its own process group, and a timeout kills the whole group: pytest's interpreted-test
    children and torchrun workers would otherwise keep the CPU busy through the parts that follow."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        code, timed_out = process.returncode, False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()  # what it printed before the cut
        code, timed_out = None, True
    if log is not None:
        log.write_text(output)
    print(output[-3000:], flush=True)
    return dict(command=command, returncode=code, seconds=round(time.perf_counter() - start, 1), timed_out=timed_out,
                output_tail=output[-2000:])  # fmt: skip


def part_install(args, env) -> dict:
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    commands = [[sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]]
    if wheels:
        commands.append([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *map(str, wheels)])
    result = {"wheels": [w.name for w in wheels], "commands": commands}
    if args.dry_run:  # nothing is installed on CPU: check what the GPU run would rely on
        check = run([sys.executable, "-c", "import synergy.kernels, synergy.runtime; print('synergy imports')"], 60)
        return dict(result, status="dry-run" if check["returncode"] == 0 else "failed", check=check)
    runs = [run(c, BUDGET_S["install"], env) for c in commands]
    missing = [name for name in WHEELS if not any(w.name.startswith(f"{name}-") for w in wheels)]
    ok = all(r["returncode"] == 0 for r in runs) and not missing
    problem = f"missing wheels in {args.wheels}: {missing} (benchmarks/README.md: GPU proof)" if missing else None
    return dict(result, status="ok" if ok else "failed", runs=runs, problem=problem)


def junit_summary(path: Path) -> dict:
    """pytest's JUnit XML -> counts and the failing tests with their first message line."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skip_reasons = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        failed, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failed is not None or error is not None:
            counts["failed" if failed is not None else "errors"] += 1
            node = failed if failed is not None else error
            failures.append({"test": name, "message": (node.get("message") or "")[:300]})
        elif skipped is not None:
            counts["skipped"] += 1
            reason = (skipped.get("message") or "")[:120]
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return dict(counts, failures=failures, skip_reasons=skip_reasons)


def part_tests(args, env) -> dict:
    junit = args.out / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "-ra"]
    if args.dry_run:  # toy size: one test file, through the same pytest run and JUnit summary
        command.append("tests/kernels/test_dispatch.py")
    else:
        # test_spoken.py needs espeak-ng, which the GPU image lacks (its collection fails, as CI wants, without it);
        # it has no requires_cuda test
        command += ["-m", "requires_cuda", "--ignore=tests/train/datasets/test_spoken.py", "tests"]
    result = run(command, BUDGET_S["tests"], env, log=args.out / "tests.log")
    summary = junit_summary(junit) if junit.exists() else {}
    ok = result["returncode"] == 0 and summary.get("passed", 0) > 0
    return dict(result, status="ok" if ok else "failed", summary=summary)


def run_benchmark(args, env, part: str, script: str, flags: list[str]) -> dict:
    """A benchmark part: benchmarks/<script> with ``flags`` and ``--out <out>/<script's stem>.json``, under the part's
    time limit -> run()'s report + status + results_file."""
    out = args.out / f"{Path(script).stem}.json"
    result = run([sys.executable, str(BENCH / script), *flags, "--out", str(out)], BUDGET_S[part], env)
    return dict(result, status="ok" if result["returncode"] == 0 else "failed", results_file=out.name)


def part_contrastive(args, env) -> dict:
    if args.dry_run:
        flags = ["--device", "cpu", "--impl", "triton", "torch", "torch-ce", "--dtype", "fp32", "--batch", "64",
                 "128", "--dim", "32", "--warmup", "1", "--iters", "1"]  # fmt: skip
    else:  # bf16 and fp32 from 1k; then the largest B at D=512 as an 80 GB GPU would hold it
        flags = ["--impl", "triton", "torch", "torch-ce", "--dtype", "bf16", "fp32", "--dim", "512", "--batch",
                 "1024", "4096", "16384", "32768", "65536", "--warmup", "2", "--iters", "5", "--slow-seconds", "1",
                 "--slow-iters", "2", "--find-max", "--find-max-seconds", "8", "--memory-cap-gib", "80"]  # fmt: skip
    return run_benchmark(args, env, "contrastive", "bench_contrastive.py", flags)


def part_attention(args, env) -> dict:
    if args.dry_run:
        flags = ["--device", "cpu", "--shapes", "2x2x33x32", "--warmup", "1", "--reps", "1"]
    else:
        flags = ["--warmup", "5", "--reps", "20"]  # the default shapes: ViT-B/16, AST Base, AST Large, text
    return run_benchmark(args, env, "attention", "bench_attention.py", flags)


def part_train_step(args, env) -> dict:
    if args.dry_run:
        flags = ["--device", "cpu", "--preset", "tiny", "--batch", "4", "--warmup", "1", "--steps", "1"]
    else:
        flags = ["--preset", "base", "--batch", "64", "--warmup", "2", "--steps", "5"]
    return run_benchmark(args, env, "train_step", "bench_train_step.py", flags)


def part_tune(args, env) -> dict:
    if args.dry_run:  # the interpreter computes bf16 dots wrongly: fp32 at toy size
        flags = ["--device", "cpu", "--dtype", "fp32", "--batch", "64", "--check-batch", "48", "--dim", "32",
                 "--configs", "1", "--iters", "1"]  # fmt: skip
    else:  # the default, the best single configs of each direction on the H200, and the tiles before them
        flags = ["--config", "64,128,64,8,3", "--config", "64,128,64,4,3", "--config", "64,64,64,8,3",
                 "--iters", "5", "--budget-seconds", "45"]  # fmt: skip
    return run_benchmark(args, env, "tune", "tune_contrastive.py", flags)


PARTS = {"install": part_install, "contrastive": part_contrastive, "attention": part_attention,
         "train_step": part_train_step, "tune": part_tune, "tests": part_tests}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"  # the toy parts run the Triton kernels interpreted, on CPU
    elif not shutil.which("nvidia-smi"):
        print("no nvidia-smi: this is the GPU proof; run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    start = time.perf_counter()
    statuses = {}
    for name in args.parts:
        print(f"=== {name} ({'dry run' if args.dry_run else f'limit {BUDGET_S[name]} s'})", flush=True)
        part_start = time.perf_counter()
        report = PARTS[name](args, env)
        report.update(part=name, dry_run=args.dry_run, environment=environment(),
                      seconds=round(time.perf_counter() - part_start, 1))  # fmt: skip
        write_result(args.out / f"{name}.json", report)
        statuses[name] = report["status"]
        print(f"=== {name}: {report['status']} in {report['seconds']} s", flush=True)
    total = round(time.perf_counter() - start, 1)
    summary = dict(dry_run=args.dry_run, seconds=total, parts=statuses, environment=environment())
    write_result(args.out / "summary.json", summary)
    print(f"GPU proof {'dry run ' if args.dry_run else ''}done in {total} s: {statuses} -> {args.out}")
    return 0 if all(s in ("ok", "dry-run") for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
