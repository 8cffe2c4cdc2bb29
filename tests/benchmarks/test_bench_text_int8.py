"""benchmarks/bench_text_int8.py at smoke size in a subprocess: MiniLM exported at fp32 and int8, every configuration
measured, and the JSON says what the README quotes (the fp32 runtime embeds as torch does; int8 moves the vectors)."""

import json


def test_the_smoke_run_measures_every_configuration(tmp_path, run_benchmark):
    out = tmp_path / "text.json"
    done = run_benchmark("bench_text_int8.py", "--sentences", "16", "--budget", "0.2", "--rounds", "1", "--threads",
                         "1", "--work", str(tmp_path / "work"), "--out", str(out), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sentences"] == 16 and result["environment"]["commit"]
    rows = {row["config"]: row for row in result["rows"]}
    wanted = {"torch", "torch-bf16", "fp32@onnxruntime", "int8-dynamic@onnxruntime", "int8-static@onnxruntime",
              "int8-static-text@onnxruntime"}  # fmt: skip
    assert wanted <= set(rows)
    assert rows["torch"]["cosine_min"] > 0.99999 and rows["torch"]["speedup_vs_torch"] == 1.0
    assert rows["fp32@onnxruntime"]["cosine_min"] >= 0.9999  # the fp32 bundle embeds as torch does
    assert rows["int8-dynamic@onnxruntime"]["cosine_min"] < 0.99999  # int8 weights and activations move the vectors
    for row in rows.values():
        assert row["sentences_per_s"] > 0 and 0 <= row["nearest_agreement"] <= 1 and -1 <= row["cosine_mean"] <= 1
    for name in ("fp32", "int8-dynamic", "int8-static", "int8-static-text"):
        verification = result["exports"][name]["verification"][0]
        assert verification["precision"] == name.split("-")[0], verification
    # --int8-text: the text tower int8 (the static bundle's stays fp32, so it embeds as fp32 on onnxruntime)
    assert rows["int8-static-text@onnxruntime"]["cosine_min"] < 0.99999 <= rows["int8-static@onnxruntime"]["cosine_min"]
