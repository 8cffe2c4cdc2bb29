"""Benchmark: Synergy's fused attention (Triton, key padding as lengths) against PyTorch SDPA.

    python benchmarks/bench_attention.py                       # CUDA, bf16, the four tower shapes, 0% and 50% padding
    python benchmarks/bench_attention.py --train-step          # + bench_train_step.py: base preset, fused vs sdpa
    python benchmarks/bench_attention.py --device cpu --shapes 2x2x33x32 --reps 2   # smoke run (interpreted kernel)

Implementations, per shape (B, H, N, d) and padding fraction f (every sequence keeps N - round(f*N) valid tokens):
  sdpa-flash  SDPA forced onto its flash backend, no mask: computes all N tokens (the padding included)
  sdpa-mask   SDPA with the boolean key-padding mask [B, 1, 1, N] (flash cannot take a mask: PyTorch picks another)
  synergy     fused_attention(..., lengths=...): skips the padded tiles
TFLOP/s count valid tokens only: forward 4*H*d*sum_b(L_b^2) FLOPs (two matmuls), forward+backward 3.5x that (the
backward is 5 matmuls to the forward's 2). Peak memory is the CUDA allocator's peak above the inputs during one
forward+backward. On CUDA the JSON goes to benchmarks/results/attention-<gpu>.json; a CPU run writes JSON only with
--out (CPU numbers are smoke, not results). CI never runs this.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from provenance import git_commit, write_result  # benchmarks/provenance.py: this folder is on sys.path

SHAPES = ["32x12x197x64", "16x12x852x64", "8x12x1214x64", "64x8x77x64"]  # ViT-B/16, AST Base, AST Large, text
IMPLS = ["sdpa-flash", "sdpa-mask", "synergy"]
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="BxHxNxd, default: %(default)s")
    p.add_argument("--pad", nargs="+", type=float, default=[0.0, 0.5], help="padding fractions, default: %(default)s")
    p.add_argument("--impl", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--causal", action="store_true", help="causal attention (text-tower style)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--train-step", action="store_true",
                   help="then time bench_train_step.py's training step (fused vs sdpa) at --train-preset")  # fmt: skip
    p.add_argument("--train-preset", default="base", help="model preset of --train-step, default: %(default)s")
    p.add_argument("--train-batch", type=int, default=64, help="samples per --train-step, default: %(default)s")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default on cuda: results/attention-<gpu>.json)")
    return p.parse_args(argv)


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup, reps) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn, device) -> float | None:
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def attention_call(impl, q, k, v, lengths, causal):
    """-> a function computing attention with `impl`, returning [B, H, N, d]."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from synergy.kernels.attention import fused_attention, key_padding_mask

    if impl == "sdpa-flash":
        backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

        def run():
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run
    if impl == "sdpa-mask":
        n = q.shape[-2]
        mask = key_padding_mask(lengths, n)[:, None, None, :]  # [B, 1, 1, N]
        if causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return lambda: fused_attention(q, k, v, lengths=lengths, causal=causal, impl="triton")


def bench_shape(shape, pad, impl, args, dtype) -> dict:
    import torch

    batch, heads, n, head_dim = shape
    device = args.device
    valid = n - round(pad * n)
    lengths = torch.full((batch,), valid, dtype=torch.int32, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, n, head_dim, generator=gen, device=device, dtype=dtype).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(batch, heads, n, head_dim, generator=gen, device=device, dtype=dtype)
    forward = attention_call(impl, q, k, v, lengths, args.causal)

    def forward_backward():
        torch.autograd.backward(forward(), grad)

    flops_fwd = 4 * heads * head_dim * batch * valid * valid * (0.5 if args.causal else 1.0)
    row = dict(impl=impl, batch=batch, heads=heads, n=n, head_dim=head_dim, pad=pad, valid_tokens=valid)
    try:
        with torch.no_grad():
            fwd_ms = time_ms(forward, device, args.warmup, args.reps)
        fwd_bwd_ms = time_ms(forward_backward, device, args.warmup, args.reps)
        row.update(
            fwd_ms=fwd_ms,
            fwd_bwd_ms=fwd_bwd_ms,
            fwd_tflops=flops_fwd / fwd_ms / 1e9,
            fwd_bwd_tflops=3.5 * flops_fwd / fwd_bwd_ms / 1e9,
            peak_mb=peak_memory_mb(forward_backward, device),
        )
    except RuntimeError as error:  # e.g. no flash backend for this dtype/device: report, keep going
        row["error"] = str(error).splitlines()[0][:200]
    return row


# --- report -----------------------------------------------------------------------------------------------------


def environment(device) -> dict:
    import torch
    import transformers

    env = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        transformers=transformers.__version__,
        python=platform.python_version(),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["commit"] = git_commit()
    return env


def print_table(rows):
    header = f"{'shape BxHxNxd':>16} {'pad':>4} {'impl':>10} {'fwd ms':>8} {'TFLOP/s':>8} {'f+b ms':>8} {'TFLOP/s':>8} "
    print(header + f"{'peak MB':>8}  vs sdpa-flash / sdpa-mask (f+b)")
    by_key = {(r["batch"], r["heads"], r["n"], r["head_dim"], r["pad"], r["impl"]): r for r in rows}
    for r in rows:
        shape = f"{r['batch']}x{r['heads']}x{r['n']}x{r['head_dim']}"
        if "error" in r:
            print(f"{shape:>16} {r['pad']:>4.2f} {r['impl']:>10}  error: {r['error']}")
            continue
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        ratios = ""
        if r["impl"] == "synergy":
            for base in ("sdpa-flash", "sdpa-mask"):
                other = by_key.get((r["batch"], r["heads"], r["n"], r["head_dim"], r["pad"], base))
                ratios += f" {other['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if other and "error" not in other else " -"
        print(f"{shape:>16} {r['pad']:>4.2f} {r['impl']:>10} {r['fwd_ms']:>8.3f} {r['fwd_tflops']:>8.1f} "
              f"{r['fwd_bwd_ms']:>8.3f} {r['fwd_bwd_tflops']:>8.1f} {peak:>8} {ratios}")  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernel runs interpreted
    if args.train_step:
        import bench_train_step  # benchmarks/: the one training-step measurement (gpu_proof runs it on its own)

        bench_train_step.interpret_on_cpu(args.device)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch; use --device cpu for a smoke run")
    dtype = _torch_dtype(args.dtype or ("bf16" if args.device == "cuda" else "fp32"))
    rows = []
    for spec in args.shapes:
        shape = tuple(int(x) for x in spec.lower().split("x"))
        for pad in args.pad:
            for impl in args.impl:
                rows.append(bench_shape(shape, pad, impl, args, dtype))
    print_table(rows)
    train_rows = []
    if args.train_step:
        train_args = bench_train_step.parse_args(
            ["--device", args.device, "--preset", args.train_preset, "--batch", str(args.train_batch),
             "--warmup", str(min(args.warmup, 3)), "--steps", str(min(args.reps, 10))]
        )  # fmt: skip
        print(f"training step: preset {args.train_preset}, batch {args.train_batch} (bench_train_step.py)")
        train_rows, _ = bench_train_step.bench_configs(train_args)

    out = args.out
    if out is None and args.device == "cuda":
        gpu = torch.cuda.get_device_name().lower().replace("nvidia", "").strip().replace(" ", "-")
        out = RESULTS / f"attention-{gpu}.json"
    if out is not None:
        report = dict(
            environment=environment(args.device), dtype=str(dtype).removeprefix("torch."), causal=args.causal,
            flop_counting="valid tokens only; fwd = 4*H*d*sum(L^2), fwd+bwd = 3.5x fwd", attention=rows,
            base_training_step=train_rows,
        )  # fmt: skip
        write_result(out, report)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
