"""Benchmark one training step of the whole model: fused (Synergy's Triton attention in all three towers + the fused
tri-modal loss) vs sdpa + the PyTorch reference loss. Reports samples/s and the CUDA allocator's peak memory.

    python benchmarks/bench_train_step.py                                       # CUDA, preset base, batch 64, bf16
    python benchmarks/bench_train_step.py --device cpu --preset tiny --batch 4 --steps 1    # smoke (interpreted)
    python benchmarks/bench_attention.py --train-step           # the attention benchmark, then this one's step

BASE GEOMETRY, RANDOM WEIGHTS: `create_model(preset)` with no pretrained folders, a synthetic batch (random pixels,
token ids with padded text of random lengths, noise waveforms of the preset's clip length); one step = forward
(bf16 autocast on CUDA) + loss + backward + AdamW. Speed does not depend on the weights' values. The median step
time over --steps timed steps after --warmup is reported; on CPU the Triton kernels run interpreted (a smoke run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench_attention import environment  # benchmarks/: this folder is on sys.path
from provenance import write_result

CONFIGS = {  # name -> (attention implementation of the towers, loss impl)
    "fused": ("synergy", "triton"),
    "sdpa": ("sdpa", "torch"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=64, help="samples per step (each has all three modalities)")
    p.add_argument("--config", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    return p.parse_args(argv)


def make_batch(config, batch: int, device: str) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    size, text = config.image.image_size, config.text
    lengths = torch.randint(2, text.max_length + 1, (batch,), generator=g)
    samples = round(config.audio.sample_rate * config.audio.clip_seconds)
    cpu = dict(
        pixel_values=torch.randn(batch, 3, size, size, generator=g),
        input_ids=torch.randint(3, text.vocab_size, (batch, text.max_length), generator=g),
        attention_mask=(torch.arange(text.max_length)[None, :] < lengths[:, None]).long(),
        waveform=0.1 * torch.randn(batch, samples, generator=g),
    )
    return {k: v.to(device) for k, v in cpu.items()}


def bench_config(name: str, args) -> dict:
    import torch

    from synergy.core.model import create_model
    from synergy.kernels.contrastive import trimodal_contrastive_loss

    attn, loss_impl = CONFIGS[name]
    device = args.device
    torch.manual_seed(0)
    model = create_model(args.preset, attn_implementation=attn).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = make_batch(model.config, args.batch, device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            image, text, audio, scales = model(**batch)
        loss = trimodal_contrastive_loss(image.float(), text.float(), audio.float(), scales, impl=loss_impl)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def timed() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        timed()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(timed() for _ in range(args.steps))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    row = dict(config=name, attention=attn, loss=loss_impl, preset=args.preset, batch=args.batch, steps=args.steps,
               step_ms=seconds * 1e3, samples_per_s=args.batch / seconds, peak_mib=peak)  # fmt: skip
    return row  # the model and optimiser go with this frame: main empties the CUDA cache before the next config


def bench_configs(args) -> tuple[list[dict], float | None]:
    """Each of --config in turn, printed as it ends -> (rows, fused / sdpa samples/s or None). bench_attention.py
    --train-step calls this too."""
    import torch

    rows = []
    for name in args.config:
        rows.append(bench_config(name, args))
        if args.device == "cuda":
            torch.cuda.empty_cache()
        r = rows[-1]
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
        print(f"{name:>6} ({r['attention']} attention, {r['loss']} loss): {r['step_ms']:.1f} ms/step, "
              f"{r['samples_per_s']:.1f} samples/s, peak {peak}")  # fmt: skip
    by_name = {r["config"]: r for r in rows}
    speedup = None
    if "fused" in by_name and "sdpa" in by_name:
        speedup = by_name["fused"]["samples_per_s"] / by_name["sdpa"]["samples_per_s"]
        print(f"fused / sdpa samples/s: {speedup:.2f}x")
    return rows, speedup


def interpret_on_cpu(device: str) -> None:
    """On CPU the fused configuration runs the Triton kernels interpreted (a smoke run). Call it before triton and
    synergy.kernels.attention are imported: both read their variable once."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("SYNERGY_ATTENTION_IMPL", "triton")  # "auto" would pick SDPA on CPU


def main(argv=None) -> int:
    args = parse_args(argv)
    interpret_on_cpu(args.device)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    rows, speedup = bench_configs(args)
    if args.out is not None:
        report = dict(benchmark="one training step (forward, loss, backward, AdamW)",
                      environment=environment(args.device), args={k: str(v) for k, v in vars(args).items()},
                      results=rows, fused_over_sdpa=speedup)  # fmt: skip
        write_result(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
