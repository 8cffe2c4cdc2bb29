"""`synergy serve` (HTTP), `synergy embed` (a corpus to parquet) and `synergy search` (cosine search of it): the
commands on the serve extra, each importing synergy.serve inside the function."""

from __future__ import annotations

import sys

import click

from .options import (
    BACKEND_CHOICES,
    DEFAULT_BUNDLE,
    EXIT_OK,
    EXIT_SOME_FAILED,
    UsageProblem,
    bundle_option,
    removed_model_option,
)


@click.command("serve")
@click.option(
    "--bundle",
    "bundles",
    multiple=True,
    metavar="[NAME=]DIR",
    help="Bundle folder from `synergy export`; repeatable: NAME=DIR serves it as model NAME (requests pick one by "
    f"their 'model' field), a bare DIR is named after its folder.  [default: {DEFAULT_BUNDLE}]",
)
@removed_model_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=int, help="Port; 0 picks a free one (printed).")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1), help="Items per model call.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0), help="Batch fill wait.")
@click.option(
    "--max-queue",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Waiting items per modality; beyond it requests get 503 + Retry-After.",
)
@click.option("--max-items", default=64, show_default=True, type=click.IntRange(min=1), help="Items per request.")
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(min=0.001), help="Body limit.")
@click.option(
    "--timeout",
    "timeout_s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="Seconds a request may take before it is answered 504.",
)
@click.option(
    "--labels",
    multiple=True,
    type=click.Path(dir_okay=False),
    help='A labels file requests may name by its stem ({"labels": "animals"} for animals.txt); repeatable.',
)
@click.option("--max-labels", default=1024, show_default=True, type=click.IntRange(min=1), help="Labels per request.")
@click.option("--label-cache", default=16_384, show_default=True, type=click.IntRange(min=1), help="Labels cached.")
@click.option(
    "--max-audio-seconds", default=1800.0, show_default=True, type=click.FloatRange(min=0.1), help="Audio per request."
)
@click.option("--max-megapixels", default=256.0, show_default=True, type=click.FloatRange(min=0.01), help="Per request")
@click.option(
    "--read-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0.01), help="Request send time."
)
@click.option("--threads", default=None, type=int, help="onnxruntime threads per tower (default: onnxruntime's).")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(BACKEND_CHOICES))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--drain-seconds", default=30.0, show_default=True, type=float, help="SIGTERM: time to finish requests.")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="SYNERGY_API_KEY",
    show_envvar=True,
    help="Require 'Authorization: Bearer KEY' on every route but /healthz and /readyz; repeatable (any one key is "
    "accepted; the variable, which keeps keys out of `ps`, holds them separated by spaces). No TLS: put a proxy in "
    "front for that.",
)
@click.option(
    "--metrics-public", is_flag=True, help="With --api-key: let /metrics be scraped without a key (keep it internal)."
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="A browser origin allowed to call the server (CORS), e.g. https://app.example.com; repeatable; '*' any.",
)
def serve_command(
    bundles,
    host,
    port,
    max_batch,
    max_wait_ms,
    max_queue,
    max_items,
    max_body_mb,
    timeout_s,
    labels,
    max_labels,
    label_cache,
    max_audio_seconds,
    max_megapixels,
    read_timeout,
    threads,
    backend,
    device,
    drain_seconds,
    api_keys,
    metrics_public,
    cors_origins,
):
    """Serve bundles over HTTP: /v1/embeddings, /v1/classify, /v1/models, /healthz, /readyz, /metrics (needs
    synergy-clip[serve]).

    Requests from all clients are micro-batched together; a full queue is answered 503 with Retry-After. SIGTERM
    finishes the requests in flight, then exits 0. Exit 2: usage or bundle error."""
    from synergy.runtime import BundleError, InferUsageError
    from synergy.serve import MissingExtra

    try:
        from synergy.serve.app import ServeLimits
        from synergy.serve.server import serve

        limits = ServeLimits(
            max_batch,
            max_wait_ms,
            max_queue,
            max_items,
            round(max_body_mb * 2**20),
            timeout_s,
            max_labels=max_labels,
            label_cache=label_cache,
            max_audio_seconds=max_audio_seconds,
            max_megapixels=max_megapixels,
            read_timeout_s=read_timeout,
        )
        code = serve(
            bundles or (DEFAULT_BUNDLE,),
            host,
            port,
            limits,
            labels,
            threads,
            backend,
            device,
            drain_seconds,
            api_keys=api_keys,
            cors_origins=cors_origins,
            metrics_public=metrics_public,
        )
    except (BundleError, InferUsageError, MissingExtra) as error:
        raise UsageProblem(str(error)) from error
    sys.exit(code)


@click.command("embed")
@click.argument("inputs", nargs=-1, required=True)
@bundle_option()
@click.option("--out", "out_path", required=True, help="Parquet file to write (an existing one is resumed).")
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=None, type=int, help="onnxruntime threads per runtime (default: onnxruntime's).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="--engine ray: actors.")
@click.option("--ray-address", default=None, help="--engine ray: the cluster to join (default: a local instance).")
@click.option("--build-index", is_flag=True, help="Also write OUT.usearch, an approximate index for synergy search.")
def embed_command(inputs, bundle, out_path, engine, batch_size, threads, workers, ray_address, build_index):
    """Embed a corpus into a parquet file: INPUTS are manifest CSVs, folders (recursive) or globs of audio, image and
    video files (a video: its frames and soundtrack, fused). One row per file (path, modality, embedding, error);
    resumable; bad files are rows with their error. Exit codes: 0 all embedded, 1 some files failed (listed), 2 usage
    or bundle error."""
    from synergy.runtime import BundleError, InferUsageError
    from synergy.serve import MissingExtra

    try:
        from synergy.serve.corpus import embed_corpus

        summary = embed_corpus(
            inputs,
            bundle,
            out_path,
            engine=engine,
            batch_size=batch_size,
            threads=threads,
            workers=workers,
            ray_address=ray_address,
            build_index=build_index,
        )
    except (BundleError, InferUsageError, MissingExtra) as error:
        raise UsageProblem(str(error)) from error
    if summary["failed"]:
        import pyarrow.parquet as pq

        for error in pq.read_table(summary["out"], columns=["error"]).column("error").to_pylist():
            if error is not None:
                click.echo(f"failed: {error}", err=True)  # the message names the file
    click.echo(
        f"synergy embed: {summary['items']} files, {summary['skipped']} already done, {summary['embedded']} embedded, "
        f"{summary['failed']} failed in {summary['seconds']:.1f} s -> {summary['out']} ({summary['rows']} rows)",
        err=True,
    )
    sys.exit(EXIT_SOME_FAILED if summary["failed"] else EXIT_OK)


@click.command("search")
@click.option("--index", "index_path", required=True, help="Embeddings parquet written by `synergy embed`.")
@bundle_option("Bundle that embeds the query (the index's).")
@click.option("--text", default=None, help="Query text.")
@click.option("--audio", default=None, help="Query audio file.")
@click.option("--image", default=None, help="Query image file.")
@click.option("--top-k", default=10, show_default=True, type=int)
@click.option(
    "--modality", default=None, type=click.Choice(["audio", "image", "video"]), help="Only rows of this modality."
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines (rank, path, modality, score) instead of a table.")
@click.option("--exact", is_flag=True, help="Scan every row even when an index from --build-index is beside it.")
def search_command(index_path, bundle, text, audio, image, top_k, modality, as_json, exact):
    """Cosine search of an embeddings parquet by text, audio or image: an exact blocked numpy scan, or the approximate
    index `synergy embed --build-index` wrote beside it (while it is up to date; --exact scans anyway).

    Exit codes: 0 ok, 1 the query could not be embedded, 2 usage, index or bundle error."""
    from synergy.runtime import BundleError, InferUsageError
    from synergy.serve import MissingExtra

    try:
        from synergy.serve.search import run

        code = run(index_path, bundle, text, audio, image, top_k, modality, as_json, exact=exact)
    except (BundleError, InferUsageError, MissingExtra) as error:
        raise UsageProblem(str(error)) from error
    sys.exit(code)
