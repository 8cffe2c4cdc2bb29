"""benchmarks/bench_text_int8_schemes.py at smoke size in a subprocess: every scheme built from MiniLM's fp32 graph,
run, and measured against it; the JSON says what the README quotes."""

import json


def test_the_smoke_run_measures_every_scheme(tmp_path, run_benchmark):
    out = tmp_path / "schemes.json"
    done = run_benchmark("bench_text_int8_schemes.py", "--sentences", "16", "--reps", "1", "--threads", "1", "--work",
                         str(tmp_path / "work"), "--out", str(out), timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sentences"] == 16 and result["environment"]["commit"] and result["smoothquant_alpha"] == 0.6
    rows = {row["scheme"]: row for row in result["rows"]}
    assert set(rows) == {"fp32", "dynamic", "static", "static+smooth", "static+smooth, ffn-out fp32", "weight-only",
                         "weight-only@onnxruntime", "per-token+smooth (sim)"}  # fmt: skip
    assert rows["fp32"]["cosine_min"] >= 0.999  # OpenVINO bf16 on the fp32 graph: bf16 rounding only
    assert rows["weight-only@onnxruntime"]["cosine_min"] < 0.99999  # int8 weights move the vectors
    assert rows["per-token+smooth (sim)"]["sentences_per_s"] is None  # a float simulation is not timed
    for row in rows.values():
        assert -1 <= row["cosine_min"] <= row["cosine_mean"] <= 1 and row["meets_0.995"] == (row["cosine_min"] >= 0.995)
        assert row["sentences_per_s"] is None or row["sentences_per_s"] > 0
