"""Benchmark the tri-modal contrastive loss, forward + backward: Triton kernels vs the PyTorch reference (eager and
under torch.compile) vs the materialised-logits baseline (open_clip's loss: s * x @ y.T and F.cross_entropy both ways).

    python benchmarks/bench_contrastive.py                                  # the issue's sweep on the local GPU
    python benchmarks/bench_contrastive.py --impl triton --batch 32768 --dim 512
    python benchmarks/bench_contrastive.py --device cpu --batch 256 --dim 64 --impl torch    # smoke run, not saved

Per (impl, D, B): median forward+backward time over --iters runs after --warmup (CUDA events), peak memory above
the inputs (torch.cuda.max_memory_allocated; includes the feature gradients), achieved TFLOP/s counting
8 * B^2 * D per pair (the fused minimum: one product forward, recompute + two gradient products backward), and the
largest B of the sweep that ran before running out of memory. --memory-cap-gib caps the allocator (an 80 GB GPU on
an H200), --find-max-seconds stops the doubling before a run predicted (quadratic in B) to outlast the budget; each
impl's peak memory is fitted linearly in B to predict the largest B under the cap, reported beside the measured one.
Writes benchmarks/results/contrastive-<gpu>.json (device, versions, git commit, numbers; rewritten after every row)
on CUDA; CPU runs only print unless --out is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import git_commit  # benchmarks/provenance.py: this folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("triton", "torch", "torch-compile", "torch-ce")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_BATCHES = (4096, 16384, 32768, 65536, 131072, 262144, 1048576)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--impl",
        nargs="+",
        choices=IMPLS,
        default=list(IMPLS),
        help="triton: the fused kernels; torch: the reference, eager; torch-compile: the reference "
        "under torch.compile; torch-ce: materialised logits + F.cross_entropy (open_clip's loss) (default: all)",
    )
    parser.add_argument("--batch", nargs="+", type=int, default=list(DEFAULT_BATCHES), help="global batch sizes B")
    parser.add_argument("--dim", nargs="+", type=int, default=[512, 768], help="embedding dims D")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run: no memory numbers)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (torch.compile compiles here)")
    parser.add_argument("--iters", type=int, default=20, help="timed runs; the median is reported")
    parser.add_argument(
        "--slow-seconds",
        type=float,
        default=5.0,
        help="if a warm-up run takes longer, time only --slow-iters runs (the row says how many)",
    )
    parser.add_argument("--slow-iters", type=int, default=3)
    parser.add_argument(
        "--find-max",
        action="store_true",
        help="after the sweep, double B from the largest size that ran until out of memory (one run "
        "per size) to find each impl's largest B",
    )
    parser.add_argument("--find-max-limit", type=int, default=1 << 23, help="stop --find-max at this B")
    parser.add_argument(
        "--find-max-seconds",
        type=float,
        default=None,
        help="stop --find-max of an impl before a size whose run is predicted (time x 4 per doubling) to pass this",
    )
    parser.add_argument(
        "--memory-cap-gib", type=float, default=None, help="cap the CUDA allocator (e.g. 80: an 80 GB GPU on an H200)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default on CUDA: benchmarks/results/contrastive-<gpu>.json; CPU: none)",
    )
    return parser.parse_args(argv)


def make_inputs(batch: int, dim: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    shared = torch.randn(batch, dim, device=device, dtype=dtype, generator=gen)
    feats = []
    for _ in range(3):
        noise = torch.randn(batch, dim, device=device, dtype=dtype, generator=gen)
        feats.append(F.normalize(shared + noise, dim=-1).requires_grad_())
    del shared
    scales = torch.tensor([1 / 0.07] * 3, device=device, requires_grad=True)
    return feats, scales


def materialised_logits_loss(image, text, audio, logit_scale):
    """The loss as open_clip writes it, per pair: logits = s * x @ y.T [B, B] in the input dtype, then
    F.cross_entropy on the rows and on the columns. The usual PyTorch baseline: three B x B matrices (and their
    gradients) in memory."""
    feats = (image, text, audio)
    labels = torch.arange(image.shape[0], device=image.device)
    total = 0.0
    for p in range(3):
        logits = logit_scale[p] * feats[p] @ feats[(p + 1) % 3].T  # [B, B]
        total = total + 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return total


def loss_fn(impl: str):
    from synergy.kernels.contrastive import trimodal_contrastive_loss, trimodal_contrastive_loss_reference

    if impl == "triton":
        return lambda *a: trimodal_contrastive_loss(*a, impl="triton")
    if impl == "torch":
        return trimodal_contrastive_loss_reference
    if impl == "torch-ce":
        return materialised_logits_loss
    return torch.compile(trimodal_contrastive_loss_reference, dynamic=False)


class Timer:
    """Wall time of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_one(impl: str, batch: int, dim: int, dtype: torch.dtype, device: str, args, iters: int | None = None) -> dict:
    """Forward + backward of one configuration -> a result row (status "ok" or "oom")."""
    cuda = device.startswith("cuda")
    row = {"impl": impl, "batch": batch, "dim": dim, "dtype": str(dtype).replace("torch.", "")}
    feats = scales = None
    try:
        fn = loss_fn(impl)
        feats, scales = make_inputs(batch, dim, dtype, device)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()

        def step():
            for t in (*feats, scales):
                t.grad = None
            fn(*feats, scales).backward()

        timer = Timer(device)
        warmups = [timer(step) for _ in range(max(args.warmup, 1))]
        n = iters if iters is not None else args.iters
        if iters is None and warmups[-1] > args.slow_seconds:
            n = args.slow_iters
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = [timer(step) for _ in range(n)]
        seconds = statistics.median(times)
        flops = 3 * 8 * batch**2 * dim
        row.update(status="ok", iters=n, ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                   peak_extra_mib=(torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None)  # fmt: skip
    except Exception as error:  # out of memory is a result here; anything else is re-raised
        if not is_oom(error):
            raise
        row.update(status="oom")
    finally:
        feats = scales = None  # free the inputs before the next size
        if cuda:
            torch.cuda.empty_cache()
    return row


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["commit"] = git_commit()
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "multiprocessors": props.multi_processor_count,
                         "memory_gib": round(props.total_memory / 2**30, 1)}  # fmt: skip
    else:
        env["device"] = {"name": platform.processor() or platform.machine(), "cpu": True}
    return env


def print_table(rows: list[dict]) -> None:
    header = f"{'impl':<14}{'D':>6}{'B':>10}{'ms':>12}{'TFLOP/s':>10}{'peak MiB':>11}{'iters':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['impl']:<14}{r['dim']:>6}{r['batch']:>10}{r['status']:>12}")
            continue
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        print(f"{r['impl']:<14}{r['dim']:>6}{r['batch']:>10}{r['ms']:>12.2f}{r['tflops']:>10.1f}{peak:>11}"
              f"{r['iters']:>7}")  # fmt: skip


def memory_fit(rows: list[dict], cap_bytes: float | None, dim: int, dtype: torch.dtype) -> dict | None:
    """Least-squares fit of peak memory (beyond the inputs) against B over the rows that ran, and the largest B
    whose inputs (3 x [B, D] features + their gradients) plus that peak fit under cap_bytes. None without two sizes."""
    points = [(r["batch"], r["peak_extra_mib"] * 2**20) for r in rows if r["status"] == "ok" and r["peak_extra_mib"]]
    if len(points) < 2 or cap_bytes is None:
        return None
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    slope = sum((b - mean_b) * (m - mean_m) for b, m in points) / var if var else 0.0
    intercept = mean_m - slope * mean_b
    per_row = slope + 2 * 3 * dim * torch.finfo(dtype).bits // 8  # + inputs and their .grad
    return {"bytes_per_row": per_row, "intercept_bytes": intercept,
            "predicted_largest_batch": int((cap_bytes - intercept) / per_row) if per_row > 0 else None,
            "fitted_on": [b for b, _ in points]}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    cap_bytes = None
    if args.device.startswith("cuda"):
        index = torch.device(args.device).index  # set_per_process_memory_fraction wants an index, not "cuda"
        index = torch.cuda.current_device() if index is None else index
        total = torch.cuda.get_device_properties(index).total_memory
        cap_bytes = total if args.memory_cap_gib is None else min(total, args.memory_cap_gib * 2**30)
        torch.cuda.set_per_process_memory_fraction(cap_bytes / total, index)
    rows, largest = [], {}
    report = {"benchmark": "trimodal_contrastive_loss forward+backward", "flops_per_pair": "8 * B^2 * D",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(args.device), "args": {k: str(v) for k, v in vars(args).items()},
              "memory_cap_gib": None if cap_bytes is None else cap_bytes / 2**30,
              "results": rows, "largest_batch": largest}  # fmt: skip
    out = args.out
    if out is None and args.device.startswith("cuda"):
        slug = re.sub(r"[^a-z0-9]+", "-", report["environment"]["device"]["name"].lower()).strip("-")
        out = ROOT / "benchmarks" / "results" / f"contrastive-{slug}.json"

    def save() -> None:  # after every row: a run cut short (time limit, a crash) keeps what it measured
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(report, indent=2, allow_nan=False, default=lambda x: None if x is None else str(x))
            out.write_text(text + "\n")

    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for impl in args.impl:
            for dim in args.dim:
                key = f"{impl}/{dtype_name}/D={dim}"
                entry = largest.setdefault(key, {"largest_ok": None, "oom_at": None, "stopped": None})
                for batch in sorted(args.batch):
                    if entry["oom_at"] is not None:
                        rows.append(
                            {"impl": impl, "batch": batch, "dim": dim, "dtype": dtype_name, "status": "skipped"}
                        )
                        continue
                    row = run_one(impl, batch, dim, dtype, args.device, args)
                    rows.append(row)
                    print_table([row])
                    if row["status"] == "ok":
                        entry["largest_ok"], entry["last_ms"] = batch, row["ms"]
                    else:
                        entry["oom_at"] = batch
                    save()
                if args.find_max and entry["largest_ok"] and entry["oom_at"] is None:
                    batch = entry["largest_ok"] * 2
                    while batch <= args.find_max_limit:
                        predicted_s = entry["last_ms"] / 1e3 * (batch / entry["largest_ok"]) ** 2
                        if args.find_max_seconds is not None and predicted_s > args.find_max_seconds:
                            entry["stopped"] = f"B={batch} predicted to take {predicted_s:.0f} s per run"
                            break
                        row = run_one(impl, batch, dim, dtype, args.device, args, iters=1)
                        row["find_max"] = True
                        rows.append(row)
                        print_table([row])
                        if row["status"] != "ok":
                            entry["oom_at"] = batch
                            break
                        entry["largest_ok"], entry["last_ms"] = batch, row["ms"]
                        batch *= 2
                        save()
                ran = [r for r in rows if r.get("impl") == impl and r["dim"] == dim and r["dtype"] == dtype_name]
                entry["memory_fit"] = memory_fit(ran, cap_bytes, dim, dtype)
                save()
    print()
    print_table(rows)
    print()
    for key, entry in largest.items():
        oom = "no OOM in the sweep" if entry["oom_at"] is None else f"OOM at B={entry['oom_at']}"
        stopped = f"; stopped: {entry['stopped']}" if entry["stopped"] else ""
        fit = entry.get("memory_fit") or {}
        predicted = fit.get("predicted_largest_batch")
        fitted = f"; linear memory fit predicts {predicted}" if predicted else ""
        print(f"largest B {key}: {entry['largest_ok']} ({oom}{stopped}{fitted})")
    save()
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
