"""The benchmarks still run against the current model and trainer APIs (tiny settings, no timing asserted)."""

import json

import pytest

from bench import bench_moe, bench_pretrain


def test_bench_moe_runs_every_method_and_writes_json(tmp_path):
    output = tmp_path / "moe.json"
    argv = ["--shapes", "small", "--experts", "4", "--top_k", "2", "--tokens", "128", "--repeats", "1"]
    argv += ["--warmup", "0", "--output", str(output)]
    assert bench_moe.main(argv) == 0
    payload = json.loads(output.read_text())
    (row,) = payload["rows"]
    assert (row["num_experts"], row["top_k"], row["tokens"]) == (4, 2, 128)
    measured = set(row["methods"]) | set(row["skipped"])
    assert measured == set(bench_moe.METHODS)
    for name, result in row["methods"].items():
        assert result["ms"] > 0 and result["peak_mb"] > 0, name
    assert row["methods"]["dense"]["ratio"] == 1.0


def test_bench_moe_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench_moe.main(["--methods", "loop"])
    assert "dense" in capsys.readouterr().err
    assert bench_moe.main(["--tokens", "100", "--shapes", "small"]) == 2


@pytest.mark.slow
def test_bench_pretrain_step_runs(tmp_path):
    output = tmp_path / "pretrain.json"
    argv = ["--quick", "--batch_size", "2", "--repeats", "1", "--warmup", "0", "--skip_data"]
    assert bench_pretrain.main([*argv, "--output", str(output)]) == 0
    steps = {row["name"]: row for row in json.loads(output.read_text())["steps"]}
    assert set(steps) == {"dense", "dense-2x", "moe8-top2"}
    assert steps["moe8-top2"]["reference"] == "dense-2x"
    assert steps["moe8-top2"]["parameters"] > steps["dense-2x"]["parameters"] > steps["dense"]["parameters"]
