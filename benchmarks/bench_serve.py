"""Benchmark: `synergy serve` on loopback against the library in the same run, single audio items.

    python benchmarks/bench_serve.py --bundle runs/demo/bundle          # the demo model (after `make demo`)
    python benchmarks/bench_serve.py                                    # no bundle: builds the tests' tiny bundle
    python benchmarks/bench_serve.py --clients 1 8 --budget 5           # quicker
    python benchmarks/bench_serve.py --geometry base-audio --budget 60 --requests 4 --timeout 600
                                        # where the model dominates: the `base` preset's AST (12 x 768, 10.24 s
                                        # clips) with random weights, exported once (minutes) to
                                        # runs/bench-serve/base-audio/bundle and reused by later runs

What it measures, each phase bounded by --budget seconds and --requests requests per client:

library-single   Runtime.embed_batch("audio", [wav bytes]) one item per call, in this process: the throughput an
                 application gets calling the library once per clip (decode + model).
library-batched  the same clips, --max-batch items per call (decode + model): the best the model can do here.
serve-N          a `synergy serve` child process (--max-batch, --max-wait-ms, the same --threads), N client threads
                 each on its own keep-alive connection sending one base64 WAV per POST /v1/embeddings, for N in
                 --clients. Latency p50/p99 per request; throughput = requests / wall time.
where the time goes, per request: the client's base64 + JSON encode, the server's parse (body, JSON, base64 decode:
the `parse` entry of the Server-Timing header), the wait in the queue (`queue`), the batch (decode + model, `batch`,
shared by the batch's items), and the rest of the latency (HTTP, the event loop, thread hand-offs, response JSON);
measured once in-process, decode alone (soundfile + soxr on the bytes) vs model alone (the batch as arrays); and the
HTTP floor: one client's GET /healthz round trip (no batcher, no model).

The library phases run first and again last (drift check: both are in the JSON). The clients run in this process
(threads, the GIL), on the same CPUs as the server: on a 2-core machine the client side takes a share of the CPU
the server would otherwise have, so serve numbers are a lower bound. The load average is recorded before and after
every phase: other processes on a shared machine disturb every number here. CI never runs this.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from provenance import git_commit, write_result  # benchmarks/provenance.py: this folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="Bundle folder (default: build the tests' tiny bundle in a temp folder).")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=200, help="At most this many requests per client.")
    parser.add_argument("--budget", type=float, default=10.0, help="At most this many seconds per phase.")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (server and library alike).")
    parser.add_argument(
        "--backend",
        default="auto",
        help="The runtime's backend, server and library alike (auto: the server's choice, Runtime.open(long_lived)).",
    )
    parser.add_argument("--clip-seconds", type=float, default=None, help="Clip length (default: the model's clip).")
    parser.add_argument("--describe", default=None, help="What the bundle is, for the JSON (default: its path).")
    parser.add_argument(
        "--geometry",
        choices=["tiny", "base-audio"],
        default="tiny",
        help="Without --bundle: the tests' tiny bundle, or the base preset's audio tower (random weights) exported.",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="Server --timeout and client socket timeout.")
    parser.add_argument("--out", default=str(RESULTS / "serve-cpu.json"))
    return parser.parse_args(argv)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def per_second(count: float, seconds: float) -> float:
    """A rate to 4 significant digits: the base geometry runs at under 1 item/s, where 1 decimal hid the ratios."""
    return float(f"{count / seconds:.4g}")


def percentiles(latencies: list[float]) -> dict:
    values = np.asarray(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p99_ms": round(float(np.percentile(values, 99)), 3)}


def tiny_bundle(folder: Path) -> Path:
    spec = importlib.util.spec_from_file_location("runtime_fixtures", ROOT / "tests" / "runtime" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_bundle(folder)
    return folder


def base_audio_bundle(folder: Path) -> Path:
    """The `base` preset's audio tower (AST 12 x 768, 10.24 s clips at 16 kHz) with random weights, tiny image and
    text towers, through `synergy export` (ONNX fp32, verified against torch): only the audio path is measured.
    Built once into ``folder`` (the export and its verification take minutes on CPU); an existing bundle is reused."""
    if (folder / "bundle" / "manifest.json").is_file():
        print(f"reusing {folder / 'bundle'}", flush=True)
        return folder / "bundle"
    from bench_runtime import random_audio_model  # this folder is on sys.path

    from synergy.core.checkpoint import save_checkpoint
    from synergy.core.tokenizer import train_tokenizer
    from synergy.export.bundle import export_bundle

    model = random_audio_model("base")
    text = model.config.text
    corpus = [t.format(w) for w in ("dog", "cat", "rain", "piano", "engine") for t in model.config.prompt_templates]
    tokenizer = train_tokenizer(corpus * 4, text.vocab_size, text.max_length)
    save_checkpoint(folder / "checkpoint", model, tokenizer)
    print(export_bundle(folder / "checkpoint", folder / "bundle", force=True), flush=True)
    return folder / "bundle"


def make_clips(rate: int, seconds: float, count: int = 16) -> list[bytes]:
    import soundfile

    rng = np.random.default_rng(0)
    t = np.arange(round(rate * seconds)) / rate
    clips = []
    for _ in range(count):
        wave = 0.02 * rng.standard_normal(t.size)
        for _ in range(3):
            wave += rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(100, rate / 3) * t)
        buffer = io.BytesIO()
        soundfile.write(buffer, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
        clips.append(buffer.getvalue())
    return clips


def timed_calls(fn, budget: float, limit: int) -> tuple[list[float], float]:
    """Call fn() until budget seconds or limit calls -> (per-call seconds, wall seconds)."""
    fn()  # warm-up
    latencies, start = [], time.perf_counter()
    while len(latencies) < limit and time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t0)
    return latencies, time.perf_counter() - start


def library_phases(runtime, clips: list[bytes], args) -> dict:
    counter = iter(range(10**9))

    def single():
        runtime.embed_batch("audio", [clips[next(counter) % len(clips)]])

    batch = [clips[i % len(clips)] for i in range(args.max_batch)]
    before = load()
    latencies, wall = timed_calls(single, args.budget, args.requests * 8)
    out = {
        "library-single": {
            "items": len(latencies),
            "items_per_s": per_second(len(latencies), wall),
            **percentiles(latencies),
            "load_before": before,
            "load_after": load(),
        }
    }
    before = load()
    latencies, wall = timed_calls(lambda: runtime.embed_batch("audio", batch), args.budget, args.requests)
    out["library-batched"] = {
        "batch": args.max_batch,
        "items": len(latencies) * args.max_batch,
        "items_per_s": per_second(len(latencies) * args.max_batch, wall),
        "batch_" + "p50_ms": percentiles(latencies)["p50_ms"],
        "load_before": before,
        "load_after": load(),
    }
    return out


def components(runtime, clips: list[bytes], args) -> dict:
    """Decode alone and model alone, per item, in-process; base64 and JSON per request."""
    from synergy.runtime.audio import load_audio

    rate = runtime.manifest.audio.sample_rate
    decode, _ = timed_calls(lambda: [load_audio(c, rate) for c in clips], min(args.budget, 3), 50)
    waves = [(load_audio(c, rate), rate) for c in clips]
    batch = [waves[i % len(waves)] for i in range(args.max_batch)]
    model_batch, _ = timed_calls(lambda: runtime.embed_batch("audio", batch), min(args.budget, 3), 50)
    model_single, _ = timed_calls(lambda: runtime.embed_batch("audio", [waves[0]]), min(args.budget, 3), 200)
    encode, _ = timed_calls(
        lambda: json.dumps({"modality": "audio", "input": [base64.b64encode(clips[0]).decode()]}),
        1,
        2000,
    )
    body = json.dumps({"modality": "audio", "input": [base64.b64encode(clips[0]).decode()]})
    parse, _ = timed_calls(lambda: base64.b64decode(json.loads(body)["input"][0], validate=True), 1, 2000)
    return {
        "decode_ms_per_item": round(statistics.median(decode) / len(clips) * 1000, 3),
        "model_ms_per_item_batched": round(statistics.median(model_batch) / args.max_batch * 1000, 3),
        "model_ms_single": round(statistics.median(model_single) * 1000, 3),
        "client_b64_json_encode_ms": round(statistics.median(encode) * 1000, 4),
        "server_json_b64_decode_ms": round(statistics.median(parse) * 1000, 4),
        "wav_bytes": len(clips[0]),
        "request_bytes": len(body),
    }


class ServerProcess:
    def __init__(self, bundle: str, args):
        command = [sys.executable, "-m", "synergy.cli", "serve", "--bundle", bundle, "--port", "0"]
        command += ["--threads", str(args.threads), "--max-batch", str(args.max_batch)]
        command += ["--max-wait-ms", str(args.max_wait_ms), "--max-queue", "1024", "--max-items", "64"]
        command += ["--timeout", str(args.timeout), "--backend", args.backend]
        self.timeout = args.timeout + 30  # the client waits longer than the server's own 504
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        line = self.process.stderr.readline()
        if "listening on http://" not in line:
            raise RuntimeError(f"the server did not start: {line}")
        host_port = line.split("http://")[1].split()[0]
        self.engine = line.rsplit(" on ", 1)[-1].split(")")[0].split(",")[0]  # "(bundles x=path on openvino-bf16)"
        self.host, self.port = host_port.rsplit(":", 1)
        deadline = time.monotonic() + 60
        while self.get("/readyz")[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.1)

    def get(self, path: str) -> tuple[int, str]:
        try:
            connection = http.client.HTTPConnection(self.host, int(self.port), timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        except OSError:
            return 0, ""

    def metric(self, prefix: str) -> float:
        text = self.get("/metrics")[1]
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=60)
        self.process.stderr.close()
        return code


def server_timing(header: str) -> dict:
    out = {}
    for part in header.split(","):
        name, *fields = part.strip().split(";")
        for field in fields:
            key, value = field.split("=", 1)
            out[name] = float(value) / 1000 if key == "dur" else int(value)
    return out


def http_floor(server: ServerProcess, args) -> dict:
    """One client, keep-alive, GET /healthz: HTTP + the event loop + Starlette, no batcher and no model."""
    connection = http.client.HTTPConnection(server.host, int(server.port), timeout=server.timeout)

    def ping():
        connection.request("GET", "/healthz")
        connection.getresponse().read()

    before = load()
    latencies, wall = timed_calls(ping, min(args.budget, 3), 1000)
    connection.close()
    return {"requests_per_s": per_second(len(latencies), wall), **percentiles(latencies), "load_before": before}


def serve_phase(server: ServerProcess, clients: int, clips: list[bytes], args) -> dict:
    """N clients, one keep-alive connection each, one clip per request, until --requests each or --budget."""
    bodies = [json.dumps({"modality": "audio", "input": [base64.b64encode(c).decode()]}).encode() for c in clips]
    records: list[tuple[float, dict]] = []
    failures: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def client(worker: int) -> None:
        connection = http.client.HTTPConnection(server.host, int(server.port), timeout=server.timeout)
        headers = {"Content-Type": "application/json"}
        mine = []
        start_gate.wait()
        for n in range(args.requests):
            if time.perf_counter() > stop_at[0]:
                break
            t0 = time.perf_counter()
            connection.request("POST", "/v1/embeddings", bodies[(worker + n) % len(bodies)], headers)
            response = connection.getresponse()
            payload = response.read()
            elapsed = time.perf_counter() - t0
            if response.status != 200:
                with lock:
                    failures.append(f"{response.status} {payload[:200]!r}")
                continue
            mine.append((elapsed, server_timing(response.getheader("Server-Timing", ""))))
        connection.close()
        with lock:
            records.extend(mine)

    warm = http.client.HTTPConnection(server.host, int(server.port), timeout=server.timeout)
    warm.request("POST", "/v1/embeddings", bodies[0], {"Content-Type": "application/json"})
    warm.getresponse().read()
    batches0 = server.metric('synergy_batch_size_count{modality="audio",')  # then model="...": one bundle served
    items0 = server.metric('synergy_batch_size_sum{modality="audio",')
    before = load()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at.append(time.perf_counter() + args.budget)
    start_gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies = [r[0] for r in records]
    batches = server.metric('synergy_batch_size_count{modality="audio",') - batches0
    items = server.metric('synergy_batch_size_sum{modality="audio",') - items0

    def mean_ms(key: str) -> float:
        values = [t[key] for _, t in records if key in t]
        return round(statistics.fmean(values) * 1000, 3) if values else float("nan")

    parse, queue, batch = mean_ms("parse"), mean_ms("queue"), mean_ms("batch")
    latency_mean = statistics.fmean(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(records),
        "failed": len(failures),
        "failures_sample": failures[:3],
        "items_per_s": per_second(len(records), wall),
        "wall_s": round(wall, 3),
        **percentiles(latencies),
        "mean_ms": round(latency_mean, 3),
        "mean_batch_size": round(items / batches, 2) if batches else None,
        "time_per_request_ms": {
            "parse (body + JSON + base64)": parse,
            "queue (waiting for a batch)": queue,
            "batch (decode + model, whole batch)": batch,
            "rest (HTTP, event loop, hand-offs, response JSON)": round(latency_mean - parse - queue - batch, 3),
        },
        "load_before": before,
        "load_after": load(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime

    from synergy.runtime import Runtime

    with tempfile.TemporaryDirectory() as scratch:
        if args.bundle:
            bundle, bundle_name = args.bundle, args.describe or args.bundle
        elif args.geometry == "base-audio":
            bundle = str(base_audio_bundle(ROOT / "runs" / "bench-serve" / "base-audio"))
            bundle_name = args.describe or "base preset audio tower (AST 12 x 768, 10.24 s), random weights, ONNX fp32"
        else:
            bundle = str(tiny_bundle(Path(scratch) / "tiny"))
            bundle_name = args.describe or "the tests' tiny bundle (D=21)"
        runtime = Runtime.open(bundle, args.backend, threads=args.threads, batch_size=args.max_batch, long_lived=True)
        audio = runtime.manifest.audio
        clips = make_clips(audio.sample_rate, args.clip_seconds or audio.clip_seconds)
        report = {
            "benchmark": "bench_serve",
            "bundle": bundle_name,
            "clip": {"seconds": args.clip_seconds or audio.clip_seconds, "sample_rate": audio.sample_rate},
            "settings": {
                k: getattr(args, k) for k in ("clients", "requests", "budget", "max_batch", "max_wait_ms", "timeout")
            },
            "backend": {"asked": args.backend, "library": runtime.backend},
            "environment": {
                "python": platform.python_version(),
                "onnxruntime": onnxruntime.__version__,
                "commit": git_commit(),
                "cpu": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "threads": args.threads,
                "load_average_at_start": load(),
                "note": "shared machine: other engineers' processes ran during this benchmark (see the load averages)",
            },
        }
        print(f"bundle: {bundle_name}; load average {load()}", flush=True)
        report["library"] = library_phases(runtime, clips, args)
        report["components"] = components(runtime, clips, args)
        print(json.dumps(report["library"]), json.dumps(report["components"]), sep="\n", flush=True)
        server = ServerProcess(bundle, args)
        report["backend"]["server"] = server.engine
        report["serve"] = []
        try:
            report["http_floor"] = http_floor(server, args)  # the cheapest round trip: GET /healthz
            print(json.dumps(report["http_floor"]), flush=True)
            for clients in args.clients:
                result = serve_phase(server, clients, clips, args)
                report["serve"].append(result)
                print(json.dumps(result), flush=True)
        finally:
            report["server_exit_code"] = server.stop()
        report["library_again"] = library_phases(runtime, clips, args)  # drift: the same numbers, measured last
        runtime.close()

    single = report["library"]["library-single"]["items_per_s"]
    batched = report["library"]["library-batched"]["items_per_s"]
    batch_ms = report["library"]["library-batched"]["batch_p50_ms"]
    report["summary"] = [
        {
            "clients": r["clients"],
            "items_per_s": r["items_per_s"],
            "p50_ms": r["p50_ms"],
            "p99_ms": r["p99_ms"],
            "vs_library_single": round(r["items_per_s"] / single, 3),
            "vs_library_batched": round(r["items_per_s"] / batched, 3),
            "p99_under_max_wait_plus_3_batches": r["p99_ms"] < args.max_wait_ms + 3 * batch_ms,
        }
        for r in report["serve"]
    ]
    report["environment"]["load_average_at_end"] = load()
    write_result(Path(args.out), report)
    print(f"\nlibrary one at a time: {single} items/s; batched ({args.max_batch}): {batched} items/s")
    print(f"{'clients':>7}  {'items/s':>8}  {'p50 ms':>8}  {'p99 ms':>8}  {'vs single':>9}  {'vs batched':>10}")
    for row in report["summary"]:
        print(
            f"{row['clients']:>7}  {row['items_per_s']:>8}  {row['p50_ms']:>8}  {row['p99_ms']:>8}  "
            f"{row['vs_library_single']:>8}x  {row['vs_library_batched']:>9}x"
        )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
