"""Time the fused contrastive loss's tile configs on the local GPU, to choose `default_tile_config`'s by measurement.

    python benchmarks/tune_contrastive.py --out tune.json                     # B=32768, D=512, bf16, ~3 min on an H200
    TRITON_INTERPRET=1 python benchmarks/tune_contrastive.py --device cpu --batch 64 --check-batch 48 --dim 32 \\
        --configs 2 --out smoke.json                                         # the script's logic, interpreted

First the library's own choice (`gpu_tile_config`: forward and backward tiles of their own), then each tile config
(block_m, block_n, block_d, num_warps, num_stages; both directions) of CONFIGS or --config, in order: the loss and
its gradients at --check-batch against the PyTorch reference (a config that disagrees is recorded and not timed), then
at --batch the forward alone (lse and positives, under no_grad) and forward + backward (median of --iters after one
warm-up run; bench_contrastive's timer: CUDA events). The backward's share is their difference.
A config Triton cannot build (shared memory, registers) is recorded with its error. The JSON is rewritten after every
config, and no config starts after --budget-seconds, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_contrastive import DTYPES, Timer, environment, make_inputs  # this folder is on sys.path
from provenance import write_result

# (block_m, block_n, block_d, num_warps, num_stages): the default at the time of writing first, then larger tiles
# (fewer re-reads of the key tiles and of the backward's fp32 gradient rows), then fewer / more warps and stages
CONFIGS = (
    (64, 64, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (64, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 2),
    (128, 64, 128, 8, 2),
    (64, 128, 128, 8, 2),
    (64, 64, 128, 4, 2),
    (128, 128, 32, 8, 3),
    (128, 64, 32, 8, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 64, 64, 8, 4),
    (64, 128, 64, 8, 4),
    (256, 64, 64, 8, 2),
    (64, 256, 64, 8, 2),
    (128, 128, 128, 8, 2),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32768, help="timed batch B (default 32768, issue 11's shape)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--check-batch", type=int, default=2048, help="B of the check against the reference")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--configs", type=int, default=len(CONFIGS), help="only the first N of CONFIGS")
    p.add_argument("--config", action="append", default=None, help="BM,BN,BD,WARPS,STAGES instead of CONFIGS (repeat)")
    p.add_argument("--budget-seconds", type=float, default=200.0, help="start no config after this")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from synergy.kernels.contrastive import trimodal_contrastive_loss_reference
    from synergy.kernels.contrastive.triton import TileConfig, default_tile_config, trimodal_contrastive_triton

    dtype = DTYPES[args.dtype]
    scales = torch.tensor([1 / 0.07, 1 / 0.05, 1 / 0.06], device=args.device, requires_grad=True)
    default = default_tile_config(args.batch, args.batch, args.dim, dtype, torch.device(args.device))

    def loss(feats, tiles):
        masks = torch.ones(3, feats[0].shape[0], dtype=torch.bool, device=args.device)
        return trimodal_contrastive_triton(tuple(feats), scales, masks, None, masks, 0, tiles)

    timed = Timer(args.device)  # bench_contrastive's: CUDA events on a GPU

    # the reference at the check batch, once
    check = make_inputs(args.check_batch, args.dim, dtype, args.device)[0]
    ref_loss = trimodal_contrastive_loss_reference(*[f.float() for f in check], scales)
    ref_grads = torch.autograd.grad(ref_loss, [*check, scales])
    big = make_inputs(args.batch, args.dim, dtype, args.device)[0]

    report = {"benchmark": "contrastive tile configs: forward, forward+backward",
              "environment": environment(args.device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "args": {k: str(v) for k, v in vars(args).items()}, "default_config": _describe(default),
              "results": []}  # fmt: skip
    start = time.perf_counter()
    chosen = [tuple(int(v) for v in c.split(",")) for c in args.config] if args.config else CONFIGS[: args.configs]
    # the library's own choice first (gpu_tile_config: forward and backward tiles of their own), then each config for
    # both directions
    candidates = [("default", default)]
    candidates += [(list(c), TileConfig(*c[:4], default.max_programs, c[4])) for c in chosen]
    for label, tiles in candidates:
        if time.perf_counter() - start > args.budget_seconds:
            report["stopped"] = f"budget of {args.budget_seconds} s spent"
            break
        row = {"config": label, "tiles": _describe(tiles)}
        try:
            out = loss(check, tiles)
            grads = torch.autograd.grad(out, [*check, scales])
            row["check_loss_error"] = abs(out.item() - ref_loss.item()) / abs(ref_loss.item())
            row["check_grad_error"] = max(
                ((g.float() - r.float()).norm() / r.float().norm().clamp(min=1e-30)).item()
                for g, r in zip(grads, ref_grads)
            )
            row["check_ok"] = row["check_loss_error"] < 1e-3 and row["check_grad_error"] < 2e-2
            if row["check_ok"]:

                def forward(tiles=tiles):
                    with torch.no_grad():
                        loss(big, tiles)

                def forward_backward(tiles=tiles):
                    torch.autograd.grad(loss(big, tiles), [*big, scales])

                row["compile_and_first_s"] = timed(forward_backward)
                fwd = statistics.median(timed(forward) for _ in range(args.iters))
                both = statistics.median(timed(forward_backward) for _ in range(args.iters))
                row.update(forward_ms=fwd * 1e3, forward_backward_ms=both * 1e3, backward_ms=(both - fwd) * 1e3)
        except Exception as error:  # a config Triton cannot build is a result, not the end
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        report["results"].append(row)
        write_result(args.out, report)
        print(row, flush=True)
    timed_rows = [r for r in report["results"] if "forward_backward_ms" in r]
    if timed_rows:
        report["best_forward"] = min(timed_rows, key=lambda r: r["forward_ms"])["config"]
        report["best_backward"] = min(timed_rows, key=lambda r: r["backward_ms"])["config"]
        report["best_forward_backward"] = min(timed_rows, key=lambda r: r["forward_backward_ms"])["config"]
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_result(args.out, report)
    print({k: report.get(k) for k in ("best_forward", "best_backward", "best_forward_backward", "seconds")})
    return 0


def _fields(tiles) -> list[int]:
    return [tiles.block_m, tiles.block_n, tiles.block_d, tiles.num_warps, tiles.num_stages]


def _describe(tiles) -> dict:
    """{"forward": [BM, BN, BD, warps, stages], "backward": [...]} of a TileConfig."""
    return {"forward": _fields(tiles), "backward": _fields(tiles.backward or tiles)}


if __name__ == "__main__":
    if "--device" in sys.argv and "cpu" in sys.argv and "TRITON_INTERPRET" not in os.environ:
        print("on CPU set TRITON_INTERPRET=1 (the kernels run interpreted)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
