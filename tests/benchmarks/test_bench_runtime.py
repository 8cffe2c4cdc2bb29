"""benchmarks/bench_runtime.py at smoke size in a subprocess, on the image and text towers (the tiny preset's
geometry, random weights): each tower exported, quantized the way the export does it and timed on torch, onnxruntime
and OpenVINO, interleaved, with its accuracy against torch fp32."""

import json


def test_the_smoke_run_measures_image_and_text_towers(tmp_path, run_benchmark):
    out = tmp_path / "runtime.json"
    configs = ["torch", "torch-bf16", "ort", "ort-fused", "ort-int8-static", "openvino-int8-bf16"]
    done = run_benchmark("bench_runtime.py", "--models", "tiny-image", "tiny-text", "--skip-cold", "--configs",
                         *configs, "--batches", "1", "2", "--budget", "0.2", "--rounds", "1", "--base-clips", "4",
                         "--text-tokens", "8", "--threads", "1", "--out", str(out), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["commit"]
    image, text = result["throughput"]["tiny-image"], result["throughput"]["tiny-text"]
    assert image["modality"] == "image" and image["item_shape"][0] == 3 and len(image["item_shape"]) == 3
    assert text["modality"] == "text" and text["item_shape"] == [8]  # --text-tokens tokens a sentence
    for tower in (image, text):
        rows = {(r["config"], r["batch"]): r for r in tower["rows"]}
        assert set(rows) == {(c, b) for c in configs for b in (1, 2)}
        for (config, _), row in rows.items():
            assert row["items_per_s"] > 0 and row["eval_clips"] == 4, (config, row)
            assert row["speedup_vs_torch"] > 0 and row["speedup_vs_torch_bf16"] > 0
            # every engine embeds the items as torch fp32 does, to within its precision
            assert row["cosine_min"] > (0.999 if "int8" in config or "bf16" in config else 0.99999), (config, row)
        assert rows[("ort-fused", 1)]["fused_ops"]  # onnxruntime's optimizer fused something in each tower
    # the text tower's static int8 is the scheme --int8-text writes; the image tower's the plain one
    static = {m: next(r for r in t["rows"] if r["config"] == "ort-int8-static") for m, t in (("i", image), ("t", text))}
    assert (
        static["t"]["int8_scheme"].startswith("SmoothQuant") and static["i"]["int8_scheme"] == "per-tensor ranges only"
    )
    # six weight MatMuls a layer (q, k, v, out, two MLP); the text scheme keeps each layer's GELU-fed one float
    assert static["i"]["int8_matmuls"] == 6 * image["geometry"]["layers"]
    assert static["t"]["int8_matmuls"] == 5 * text["geometry"]["layers"]
