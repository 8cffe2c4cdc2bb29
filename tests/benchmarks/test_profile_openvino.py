"""benchmarks/profile_openvino.py at smoke size (the tiny preset, batch 2) in a subprocess: every configuration
compiled and timed, the breakdown summed from OpenVINO's per-node counters."""

import json


def test_the_smoke_run_profiles_every_configuration(tmp_path, run_benchmark):
    out = tmp_path / "profile.json"
    done = run_benchmark("profile_openvino.py", "--preset", "tiny", "--batch", "2", "--seconds", "0.5", "--threads",
                         "1", "--square", "512", "--out", str(out), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["commit"] and result["args"]["batch"] == "2"
    rows = result["rows"]
    assert set(rows) == {"fp32", "int8-static", "int8-static, two streams", "int8-static, snippets disabled"}
    for name, row in rows.items():
        assert row["clips_per_s"] > 0 and row["calls"] >= 2, name
        assert ("seconds_by_layer" in row) == ("two streams" not in name)  # counters of one request, one stream
    # the static graph's weight MatMuls run as OpenVINO's quantized FullyConnected; the fp32 graph has none
    quantized = {m: [k for k in rows[m]["seconds_by_layer"] if k.startswith("FullyConnectedQuantized")] for m in rows
                 if "two streams" not in m}  # fmt: skip
    assert quantized["int8-static"] and quantized["int8-static, snippets disabled"] and not quantized["fp32"]
    # the int8 MatMuls' rate: the tower's Linear operations over their counted seconds, beside lone int8 GEMMs
    assert result["int8_ops"] > 0 and result["int8_matmuls_tops"] > 0
    shapes = [g["shape"] for g in result["reference_gemms"]]
    assert shapes[1] == [512, 512, 512] and shapes[0][0] % 2 == 0  # --square; a batch of 2 clips' rows
    for gemm in result["reference_gemms"]:  # each ran as an int8 kernel
        int8 = [k for k in gemm["kernels"] if k.startswith("FullyConnected") and k.lower().endswith("_i8)")]
        assert gemm["tops_call"] > 0 and int8, gemm
    assert result["reference_gemms"][1]["tops"] > 0  # the kernel's counter (the smoke layer's may read 0 us)
