"""`synergy export`: a checkpoint to a verified bundle (ONNX graphs, TensorRT engines or a Triton repository)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import UsageProblem, check_checkpoint, check_csv, removed_checkpoint_argument, removed_eval_data_option


@click.command("export")
@click.option("--checkpoint", "checkpoint_dir", help="Checkpoint folder from `synergy train`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(["onnx", "trt", "triton"]))
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "fp16", "int8"]),
    help="int8: the transformer layers' weight MatMuls quantized (onnxruntime's tools), refused below the accuracy "
    "gate.",
)
@click.option(
    "--quantize",
    "int8_method",
    default=None,
    type=click.Choice(["static", "dynamic"]),
    help="--precision int8: static QDQ (activation scales calibrated on the verification set and --data rows; "
    "the fastest on OpenVINO, and the only one TensorRT builds; the text tower stays fp32 unless --int8-text) or "
    "dynamic "
    "(onnxruntime's fastest). Default: static for trt, and for onnx where the openvino extra is installed; else "
    "dynamic.",
)
@click.option(
    "--fp32-towers",
    default="",
    metavar="TOWERS",
    help="Comma-separated towers (image, text, audio) kept fp32 in an fp16 or int8 bundle, e.g. a pretrained text "
    "tower whose int8 graph misses the gate (a refused export names them); the others keep --precision.",
)
@click.option(
    "--int8-text",
    is_flag=True,
    help="--precision int8 --quantize static: quantize the text tower too (SmoothQuant, the MLPs' GELU-fed MatMuls "
    "float), which static bundles keep fp32: all-MiniLM-L6-v2 then keeps min cosine 0.997 to fp32 on real sentences "
    "and 91% of their nearest neighbours (bf16: 97.5%), for 6-11% more speed on OpenVINO here.",
)
@click.option(
    "--opset",
    default=None,
    type=int,
    help="ONNX opset, >= 18 (default: 23 for --format onnx, fused attention; 18 for trt and triton).",
)
@click.option("--force", is_flag=True, help="Replace an existing --out bundle.")
@click.option(
    "--data",
    default=None,
    help="Manifest CSV (e.g. the synthetic val.csv) for the zero-shot agreement check (default: a built-in set).",
)
@click.option(
    "--min-cosine",
    default=None,
    type=click.FloatRange(-1.0, 1.0),
    help="Accuracy gate: least cosine to PyTorch fp32 of any item (default: fp32 0.9999, fp16 0.999, int8 0.99).",
)
@click.option(
    "--min-agreement",
    default=None,
    type=click.FloatRange(0.0, 1.0),
    help="Accuracy gate: least zero-shot top-1 agreement with PyTorch fp32, 0..1 (default: fp16 and int8 0.99).",
)
@click.option("--external-data", is_flag=True, help="Keep weights in <graph>.onnx.data files (automatic above 1 GiB).")
@click.option("--min-batch", default=1, show_default=True, type=int, help="TensorRT profile: smallest batch.")
@click.option("--opt-batch", default=8, show_default=True, type=int, help="TensorRT profile / Triton preferred batch.")
@click.option("--max-batch", default=64, show_default=True, type=int, help="TensorRT profile / Triton max_batch_size.")
@click.option(
    "--triton-platform",
    default="onnxruntime",
    show_default=True,
    type=click.Choice(["onnxruntime", "tensorrt"]),
    help="--format triton: ONNX models for Triton's ONNX Runtime backend, or TensorRT plans (needs TensorRT).",
)
@click.option(
    "--no-openvino-check",
    is_flag=True,
    help="Skip the OpenVINO bf16 check (run where the openvino extra is installed; --backend auto then runs "
    "the bundle on OpenVINO bf16 only if it passed).",
)
@removed_checkpoint_argument
@removed_eval_data_option
def export_command(
    checkpoint_dir,
    out,
    fmt,
    precision,
    opset,
    force,
    data,
    external_data,
    min_batch,
    opt_batch,
    max_batch,
    triton_platform,
    min_cosine,
    min_agreement,
    int8_method,
    no_openvino_check,
    fp32_towers,
    int8_text,
):
    """Export a checkpoint to a verified bundle (ONNX graphs, TensorRT engines or a Triton model repository)."""
    checkpoint = check_checkpoint(checkpoint_dir)
    if data:
        check_csv(data)
    from synergy.export import BatchProfile, ExportError, export_bundle  # torch-free until export_bundle runs
    from synergy.export.bundle import check_output

    try:  # the export checks it again; here the error comes before torch loads
        check_output(checkpoint, Path(out), force)
    except ExportError as error:
        raise UsageProblem(str(error)) from error

    try:
        report = export_bundle(
            checkpoint,
            out,
            fmt=fmt,
            precision=precision,
            opset=opset,
            force=force,
            eval_data=data,
            external_data=True if external_data else None,
            batch=BatchProfile(min_batch, opt_batch, max_batch),
            triton_platform=triton_platform,
            min_cosine=min_cosine,
            min_agreement=min_agreement,
            int8_method=int8_method,
            openvino_check=False if no_openvino_check else None,
            fp32_towers=[name.strip() for name in fp32_towers.split(",") if name.strip()],
            int8_text=int8_text,
        )
    except ExportError as error:
        raise UsageProblem(str(error)) from error
    click.echo(report)
